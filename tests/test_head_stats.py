"""Per-head summaries against hand computations and a loop-by-loop reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from vitkd.attention import TokenLayout
from vitkd.head_stats import (
    attention_entropy,
    head_stats,
    mean_attention_distance,
    prefix_share,
    self_share,
    uniform_stats,
)


def test_uniform_attention_on_a_2x2_grid_by_hand() -> None:
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(2, 2))
    probs = np.full((5, 5), 0.2)  # every token attends to all five equally
    # From any patch of a 2x2 grid of 4 px patches: itself at 0, two neighbours at 4 px, the corner at 4*sqrt(2).
    assert mean_attention_distance(probs, layout, (8, 8)) == pytest.approx((0 + 4 + 4 + 4 * math.sqrt(2)) / 4)
    assert attention_entropy(probs, layout) == pytest.approx(math.log2(5))
    assert self_share(probs, layout) == pytest.approx(0.2)
    assert prefix_share(probs, layout) == pytest.approx(0.2)
    flat = uniform_stats(layout, (8, 8))  # the same numbers, from the layout alone
    assert (flat.distance_px, flat.entropy_bits, flat.self_share, flat.prefix_share) == pytest.approx(
        ((4 + 4 + 4 * math.sqrt(2)) / 4, math.log2(5), 0.2, 0.2))


def test_a_head_that_only_looks_right_and_one_that_only_looks_at_cls() -> None:
    layout = TokenLayout(num_prefix_tokens=1, grid_size=(1, 3))  # three patches in a row, 10 px wide, 5 px tall
    right = np.zeros((4, 4))
    right[0, 0] = 1.0  # the CLS row is not a patch query: ignored
    right[1, 2] = right[2, 3] = 1.0  # patch 0 -> patch 1, patch 1 -> patch 2 (10 px each)
    right[3, 3] = 1.0  # the last patch looks at itself
    cls_only = np.zeros((4, 4))
    cls_only[:, 0] = 1.0
    probs = np.stack([right, cls_only])  # [heads, T, T]
    stats = head_stats(probs, layout, (5, 30))
    np.testing.assert_allclose(stats.distance_px, [20 / 3, 0.0])  # (10 + 10 + 0) / 3; no patch mass -> 0
    np.testing.assert_allclose(stats.entropy_bits, [0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(stats.self_share, [1 / 3, 0.0])
    np.testing.assert_allclose(stats.prefix_share, [0.0, 1.0])


def test_random_attention_against_loops() -> None:
    rng = np.random.default_rng(0)
    layout = TokenLayout(num_prefix_tokens=2, grid_size=(3, 4))
    logits = rng.normal(size=(2, 3, 14, 14)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    img = (24, 40)  # 8 x 10 px patches
    stats = head_stats(probs, layout, img)
    for b in range(2):
        for h in range(3):
            dist, ent, own, pre = [], [], [], []
            for q in range(12):
                row = probs[b, h, 2 + q]
                qy, qx = divmod(q, 4)
                d = sum(row[2 + k] * math.dist((qy * 8, qx * 10), ((k // 4) * 8, (k % 4) * 10)) for k in range(12))
                dist.append(d / row[2:].sum())
                ent.append(-sum(v * math.log2(v) for v in row))
                own.append(row[2 + q])
                pre.append(row[0] + row[1])
            assert stats.distance_px[b, h] == pytest.approx(np.mean(dist))
            assert stats.entropy_bits[b, h] == pytest.approx(np.mean(ent))
            assert stats.self_share[b, h] == pytest.approx(np.mean(own))
            assert stats.prefix_share[b, h] == pytest.approx(np.mean(pre))


def test_shape_mismatch_is_refused() -> None:
    with pytest.raises(ValueError, match="17 tokens"):
        attention_entropy(np.ones((4, 5, 5)) / 5, TokenLayout(1, (4, 4)))
