"""``vitkd.rollout`` against hand computations (explicit loops) on small toy tensors."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from vitkd.models import build_model
from vitkd.rollout import attention_rollout, fuse_heads, gradient_rollout

pytestmark = pytest.mark.timeout(60)

# Two blocks, two heads, three tokens (CLS + 2 patches); rows sum to 1, no ties within a fused map.
TOY = np.array([
    [  # block 0
        [[0.07, 0.12, 0.81], [0.10, 0.44, 0.46], [0.11, 0.72, 0.17]],
        [[0.40, 0.36, 0.24], [0.57, 0.02, 0.41], [0.40, 0.10, 0.50]],
    ],
    [  # block 1
        [[0.04, 0.79, 0.17], [0.08, 0.19, 0.73], [0.13, 0.52, 0.35]],
        [[0.63, 0.06, 0.31], [0.33, 0.23, 0.44], [0.15, 0.60, 0.25]],
    ],
])


def hand_rollout(blocks: np.ndarray, fusion: str, discard_ratio: float) -> np.ndarray:
    """Rollout of one image by explicit loops: fuse, drop the lowest non-CLS entries, add I/2, row-normalise."""
    _, H, T, _ = blocks.shape
    result = np.eye(T)
    for attn in blocks:
        fused = np.zeros((T, T))
        for i in range(T):
            for j in range(T):
                values = [attn[h, i, j] for h in range(H)]
                fused[i, j] = {"mean": sum(values) / H, "max": max(values), "min": min(values)}[fusion]
        if discard_ratio > 0:
            entries = sorted((fused[i, j], i, j) for i in range(T) for j in range(1, T))  # CLS column excluded
            for _, i, j in entries[:int(T * T * discard_ratio)]:
                fused[i, j] = 0.0
        mixed = [[0.5 * fused[i, j] + (0.5 if i == j else 0.0) for j in range(T)] for i in range(T)]
        mixed = np.array([[v / sum(row) for v in row] for row in mixed])
        new = np.zeros((T, T))
        for i in range(T):
            for j in range(T):
                new[i, j] = sum(mixed[i, m] * result[m, j] for m in range(T))
        result = new
    return result


def timm_probs_and_grads(model: torch.nn.Module, images: torch.Tensor,
                         classes: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per block, attention probabilities [B, H, T, T] and d(sum_b logit[b, classes[b]])/dA, from timm itself.

    A private copy runs timm's own unfused attention (``fused_attn`` off on that copy only); a forward
    hook on each block's ``attn_drop`` (identity in eval) keeps the probabilities the forward used.
    Nothing from vitkd.attention is involved.
    """
    model = copy.deepcopy(model).double().eval()
    probs: list[torch.Tensor] = []
    for blk in model.blocks:
        blk.attn.fused_attn = False
        blk.attn.attn_drop.register_forward_hook(lambda _m, _i, out: probs.append(out))
    logits = model(images.double())
    score = sum(logits[b, c] for b, c in enumerate(classes))
    grads = torch.autograd.grad(score, probs)
    return [a.detach().numpy() for a in probs], [g.numpy() for g in grads]


def hand_gradient_rollout(probs: list[np.ndarray], grads: list[np.ndarray], image: int) -> np.ndarray:
    """Class-specific relevance of one image by explicit loops (Chefer et al. 2021, as the module states it):
    ``R = I``; per block, ``Abar[i, j] = mean_h A[h, i, j] * max(dy/dA[h, i, j], 0)`` and ``R <- R + Abar R``."""
    _, H, T, _ = probs[0].shape
    relevance = [[1.0 if i == j else 0.0 for j in range(T)] for i in range(T)]
    for attn, grad in zip(probs, grads, strict=True):
        a, g = attn[image], grad[image]
        abar = [[sum(a[h, i, j] * max(g[h, i, j], 0.0) for h in range(H)) / H for j in range(T)] for i in range(T)]
        relevance = [[relevance[i][j] + sum(abar[i][m] * relevance[m][j] for m in range(T)) for j in range(T)]
                     for i in range(T)]
    return np.array(relevance)


def _as_probs(blocks: np.ndarray, batch: int = 1) -> list[torch.Tensor]:
    return [torch.tensor(b, dtype=torch.float32)[None].expand(batch, -1, -1, -1) for b in blocks]


def test_uniform_two_token_rollout_by_hand() -> None:
    # A = [[.5, .5], [.5, .5]] -> M = [[.75, .25], [.25, .75]]; M @ M = [[.625, .375], [.375, .625]].
    probs = [torch.full((1, 1, 2, 2), 0.5)] * 2
    expected = torch.tensor([[[0.625, 0.375], [0.375, 0.625]]])
    assert torch.allclose(attention_rollout(probs), expected, atol=1e-7)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.3, 0.5])
def test_rollout_matches_hand_loops(fusion: str, discard_ratio: float) -> None:
    for block in TOY:  # ties would make "the lowest k" ambiguous
        fused = {"mean": block.mean(0), "max": block.max(0), "min": block.min(0)}[fusion][:, 1:].ravel()
        assert len(set(fused.round(6))) == fused.size
    got = attention_rollout(_as_probs(TOY, batch=2), head_fusion=fusion, discard_ratio=discard_ratio)
    expected = hand_rollout(TOY, fusion, discard_ratio)
    assert got.shape == (2, 3, 3)
    for b in range(2):
        np.testing.assert_allclose(got[b].numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1).numpy(), 1.0, atol=1e-6)  # each step is row-stochastic


@pytest.mark.parametrize("discard_ratio", [0.5, 0.99])
def test_discard_never_touches_cls_column(discard_ratio: float) -> None:
    """CLS-column entries are the smallest here, yet survive any discard ratio."""
    attn = np.array([[[[0.01, 0.40, 0.59], [0.02, 0.70, 0.28], [0.03, 0.33, 0.64]]]])  # 1 block, 1 head
    got = attention_rollout(_as_probs(attn), head_fusion="mean", discard_ratio=discard_ratio)
    np.testing.assert_allclose(got[0].numpy(), hand_rollout(attn, "mean", discard_ratio), atol=1e-6)
    # A rollout of one block is rownorm(0.5 A' + 0.5 I): a zeroed CLS entry would leave (i, 0) at 0.
    assert (got[0, :, 0] > 0).all()


def test_fuse_heads_and_errors() -> None:
    probs = torch.tensor(TOY[0], dtype=torch.float32)[None]
    assert torch.equal(fuse_heads(probs, "max"), torch.maximum(probs[:, 0], probs[:, 1]))
    assert torch.equal(fuse_heads(probs, "min"), torch.minimum(probs[:, 0], probs[:, 1]))
    assert torch.allclose(fuse_heads(probs, "mean"), (probs[:, 0] + probs[:, 1]) / 2)
    with pytest.raises(ValueError, match="head_fusion"):
        fuse_heads(probs, "median")
    with pytest.raises(ValueError):
        attention_rollout([])


def test_gradient_rollout_batch_equals_single_and_leaves_model_untouched() -> None:
    torch.manual_seed(0)
    model = build_model("seed-student", 10, depth=2).eval()
    images = torch.randn(3, 3, 32, 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    batched = gradient_rollout(model, images, class_index=[1, 4, 7])
    assert batched.shape == (3, 17, 17)
    for i, cls in enumerate([1, 4, 7]):
        single = gradient_rollout(model, images[i:i + 1], class_index=cls)
        assert torch.allclose(batched[i], single[0], atol=1e-6, rtol=1e-5)
    same_class = gradient_rollout(model, images, class_index=4)
    assert torch.allclose(same_class[1], batched[1], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(same_class[0], batched[0])  # the class actually matters

    assert all(p.grad is None for p in model.parameters())
    assert not model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert not images.requires_grad and images.grad is None


def test_gradient_rollout_matches_hand_loops_on_timm_gradients() -> None:
    torch.manual_seed(0)
    model = build_model("seed-student", 10, depth=2)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # noise, so attention is far from uniform and gradients have both signs
        for name, p in model.named_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * ((1 / p.shape[1]) ** 0.5 if name.endswith("qkv.weight")
                                                          else 0.05))
    model.eval()
    images = torch.randn(2, 3, 32, 32, generator=gen)
    classes = [1, 4]

    got = gradient_rollout(model, images, class_index=classes)
    probs, grads = timm_probs_and_grads(model, images, classes)
    assert all((g < 0).any() and (g > 0).any() for g in grads)  # clamping matters
    for b in range(2):
        expected = hand_gradient_rollout(probs, grads, b)
        assert np.abs(expected - np.eye(17)).max() > 1e-2  # the blocks add relevance well above the tolerance
        np.testing.assert_allclose(got[b].numpy(), expected, rtol=1e-4, atol=1e-6)
