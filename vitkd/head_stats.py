"""Per-head summaries of attention: how far each head looks and how it spends its attention.

One number per head makes blocks and models comparable at a glance, where maps need a look each:
a student head that looks far where its teacher looks near, a head that stares at itself or at
the CLS token. All functions take probabilities ``[..., T, T]`` (any leading axes, e.g. blocks
and heads) laid out as ``layout`` and average over the *patch* queries (prefix-token rows are
left out: they have no place on the image).

- ``mean_attention_distance``: Dosovitskiy et al. 2021 (Fig. 7): per query patch, the distance in
  pixels from its centre to each key patch's centre weighted by the attention the key gets,
  over patch keys only (the row renormalised over them; prefix tokens have no position).
- ``attention_entropy``: Shannon entropy of each query row in bits, over every key.
- ``self_share`` / ``prefix_share``: the attention a patch gives itself / the prefix tokens.
  A Locality Self-Attention block (``vitkd.sl_layers``) masks the diagonal: its self share is 0.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from .attention import TokenLayout

__all__ = ["HeadStats", "patch_distances", "mean_attention_distance", "attention_entropy", "self_share",
           "prefix_share", "head_stats", "uniform_stats"]


class HeadStats(NamedTuple):
    """Each field has the probabilities' leading shape (e.g. ``[blocks, heads]``)."""

    distance_px: np.ndarray
    entropy_bits: np.ndarray
    self_share: np.ndarray
    prefix_share: np.ndarray


def patch_distances(grid: tuple[int, int], patch_px: tuple[float, float]) -> np.ndarray:
    """``[N, N]`` distances in pixels between the centres of a row-major grid's patches."""
    rows, cols = np.divmod(np.arange(grid[0] * grid[1]), grid[1])
    y, x = rows * patch_px[0], cols * patch_px[1]
    return np.hypot(y[:, None] - y[None, :], x[:, None] - x[None, :])


def _patch_rows(probs: np.ndarray, layout: TokenLayout) -> np.ndarray:
    if probs.shape[-2:] != (layout.num_tokens, layout.num_tokens):
        raise ValueError(f"attention of shape {probs.shape} does not match {layout.num_tokens} tokens")
    return np.asarray(probs, dtype=np.float64)[..., layout.num_prefix_tokens:, :]


def mean_attention_distance(probs: np.ndarray, layout: TokenLayout, img_size: tuple[int, int]) -> np.ndarray:
    """Attention-weighted distance (pixels at input size ``(H, W)``) from each query patch to the key patches."""
    p = layout.num_prefix_tokens
    patch_px = (img_size[0] / layout.grid_size[0], img_size[1] / layout.grid_size[1])
    to_patches = _patch_rows(probs, layout)[..., p:]
    mass = to_patches.sum(-1)
    weighted = (to_patches * patch_distances(layout.grid_size, patch_px)).sum(-1)
    # A row with no attention on any patch (all on prefix tokens) has no distance: it counts as 0.
    per_query = np.divide(weighted, mass, out=np.zeros_like(weighted), where=mass > 0)
    return per_query.mean(-1)


def attention_entropy(probs: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Mean over query patches of the entropy (bits) of their attention over all keys (``0 log 0 = 0``)."""
    rows = _patch_rows(probs, layout)
    logs = np.log2(rows, out=np.zeros_like(rows), where=rows > 0)
    return -(rows * logs).sum(-1).mean(-1)


def self_share(probs: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Mean over query patches of the attention each patch gives itself."""
    rows = _patch_rows(probs, layout)
    return np.diagonal(rows[..., layout.num_prefix_tokens:], axis1=-2, axis2=-1).mean(-1)


def prefix_share(probs: np.ndarray, layout: TokenLayout) -> np.ndarray:
    """Mean over query patches of the attention on the prefix tokens (CLS, a DeiT token)."""
    return _patch_rows(probs, layout)[..., :layout.num_prefix_tokens].sum(-1).mean(-1)


def head_stats(probs: np.ndarray, layout: TokenLayout, img_size: tuple[int, int]) -> HeadStats:
    """All four summaries of ``probs`` [..., T, T]."""
    return HeadStats(mean_attention_distance(probs, layout, img_size), attention_entropy(probs, layout),
                     self_share(probs, layout), prefix_share(probs, layout))


def uniform_stats(layout: TokenLayout, img_size: tuple[int, int]) -> HeadStats:
    """What attention spread evenly over every token scores (scalars): the flat baseline a head is read against."""
    even = np.full((layout.num_tokens, layout.num_tokens), 1.0 / layout.num_tokens)
    return head_stats(even, layout, img_size)
