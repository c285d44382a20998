"""How alike two attention distributions are: one Jensen-Shannon divergence, in bits (0 to 1).

The head-agreement heatmap (student head x teacher head), the distilled pairs' divergence
and the scan's rollout divergence all use ``js_divergence``. Models with different patch grids
are compared on the coarser one (``ImageAnalysis.layout``): the finer model's attention is
resampled onto it with ``vitkd.resample`` (area averaging, prefix tokens kept, rows still
distributions), the operator training uses for its targets. Same grids: nothing is resampled.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .analysis import ImageAnalysis
from .attention import TokenLayout
from .distill import merge_head_group
from .resample import grid_resample_matrix, resample_attention

__all__ = ["js_divergence", "head_divergence", "probs_on_layout", "patches_on_grid", "compared_probs",
           "block_divergence", "group_probs", "pair_divergences"]


def js_divergence(p: torch.Tensor, q: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Jensen-Shannon divergence in bits (0 to 1) over the last axis; inputs broadcast and are renormalised."""
    p = p.double().clamp(min=0)
    q = q.double().clamp(min=0)
    p = p / p.sum(-1, keepdim=True).clamp(min=eps)
    q = q / q.sum(-1, keepdim=True).clamp(min=eps)
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # 0 * log(0 / x) is 0 by convention; where a > 0, b >= a / 2 > 0.
        return torch.where(a > 0, a * (a.clamp(min=eps) / b.clamp(min=eps)).log2(), torch.zeros_like(a)).sum(-1)

    return (0.5 * kl(p, m) + 0.5 * kl(q, m)).clamp(0.0, 1.0)


def head_divergence(student_probs: np.ndarray, teacher_probs: np.ndarray) -> np.ndarray:
    """[Hs, T, T] x [Ht, T, T] -> [Hs, Ht]: ``js_divergence`` (bits) between each student head's and each
    teacher head's attention rows, averaged over query rows."""
    s = torch.as_tensor(np.asarray(student_probs, dtype=np.float64))
    t = torch.as_tensor(np.asarray(teacher_probs, dtype=np.float64))
    if s.ndim != 3 or t.ndim != 3 or s.shape[1:] != t.shape[1:]:
        raise ValueError(f"expected [Hs, T, T] and [Ht, T, T] with the same T, got {tuple(s.shape)} and "
                         f"{tuple(t.shape)}")
    # one student head at a time keeps memory at [Ht, T, T]
    return torch.stack([js_divergence(s_head[None], t).mean(-1) for s_head in s]).numpy()


def probs_on_layout(probs: np.ndarray, layout: TokenLayout, target: TokenLayout) -> np.ndarray:
    """Attention probabilities [..., T, T] on ``layout`` resampled onto ``target``'s patch grid (same prefix
    tokens): ``resample_attention``'s distribution path, rows still sum to 1. ``probs`` itself (not a copy)
    when the layouts are equal, so same-grid numbers are exactly those of the unresampled maps."""
    if layout == target:
        return probs
    with np.errstate(divide="ignore"):  # probability 0 (a masked key) is logit -inf: softmax gives 0 back
        logits = torch.from_numpy(np.log(np.asarray(probs, dtype=np.float64)))
    return resample_attention(logits, layout, target, "kl").exp().numpy()


def patches_on_grid(patch_probs: torch.Tensor, grid: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """A distribution over patches [..., gh * gw] resampled onto ``target``'s patches, renormalised.

    The key axis of ``probs_on_layout`` for one query row: the resampling matrix ``R`` of
    ``vitkd.resample`` (``p R^T``), rescaled to the patches' mass (here 1). The input when the grids match.
    """
    if tuple(grid) == tuple(target):
        return patch_probs
    matrix = grid_resample_matrix(tuple(grid), tuple(target)).to(patch_probs.device, patch_probs.dtype)
    out = patch_probs @ matrix.T
    return out / out.sum(-1, keepdim=True).clamp(min=torch.finfo(out.dtype).tiny)


def compared_probs(analysis: ImageAnalysis, role: str, probs: np.ndarray) -> np.ndarray:
    """``role``'s attention [..., T, T] on the layout both models are compared on (``analysis.layout``)."""
    return probs_on_layout(probs, analysis.model(role).layout, analysis.layout)


def block_divergence(analysis: ImageAnalysis, teacher_block: int, student_block: int) -> np.ndarray:
    """[Hs, Ht]: ``head_divergence`` between a student block's and a teacher block's heads, on the compared
    layout (the coarser grid)."""
    return head_divergence(compared_probs(analysis, "student", analysis.student.attn_probs[student_block]),
                           compared_probs(analysis, "teacher", analysis.teacher.attn_probs[teacher_block]))


def group_probs(block_probs: np.ndarray, heads: tuple[int, ...]) -> np.ndarray:
    """[H, T, T] -> [T, T]: what a student head taught by ``heads`` follows, the mean of their probabilities
    (``vitkd.distill.merge_head_group``, the training target); one head: its own map, untouched."""
    if len(heads) == 1:
        return block_probs[heads[0]]
    with np.errstate(divide="ignore"):
        logits = torch.from_numpy(np.log(np.asarray(block_probs[list(heads)], dtype=np.float64)))
    return merge_head_group(logits, "kl", dim=0).exp().numpy()


def pair_divergences(analysis: ImageAnalysis) -> list[dict[str, Any]]:
    """For each student head of the student's head map: its teacher heads, the JS divergence to what it was
    taught on this image, and ``rank``: 1 when that target is closer (lower JS) than every single head of
    its teacher block.

    ``teacher_head`` is one index, or the list of a group's heads (as ``HeadMap.to_list`` writes them):
    a group's target is its heads' mean in probability space (``group_probs``), on the teacher's grid,
    then resampled like every map onto the compared layout. ``teacher_heads`` counts the block's heads.
    """
    if analysis.head_map is None:
        return []
    rows = []
    for g in analysis.head_map.groups:
        student = compared_probs(analysis, "student", analysis.student.attn_probs[g.student_block, g.student_head])
        block = analysis.teacher.attn_probs[g.teacher_block]
        to_block = head_divergence(student[None], compared_probs(analysis, "teacher", block))[0]  # [Ht]
        if len(g.teacher_heads) == 1:
            js = float(to_block[g.teacher_heads[0]])
        else:
            target = compared_probs(analysis, "teacher", group_probs(block, g.teacher_heads))
            js = float(head_divergence(student[None], target[None])[0, 0])
        heads: int | list[int] = g.teacher_heads[0] if len(g.teacher_heads) == 1 else list(g.teacher_heads)
        rows.append({"teacher_block": g.teacher_block, "teacher_head": heads,
                     "student_block": g.student_block, "student_head": g.student_head, "js": js,
                     "rank": 1 + int((to_block < js).sum()), "teacher_heads": int(to_block.size)})
    return rows
