"""How alike two attention distributions are: one Jensen-Shannon divergence, in bits (0 to 1).

The head-agreement heatmap (student head x teacher head), the distilled pairs' divergence
and the scan's rollout divergence all use ``js_divergence``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .analysis import ImageAnalysis

__all__ = ["js_divergence", "head_divergence", "pair_divergences"]


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


def pair_divergences(analysis: ImageAnalysis) -> list[dict[str, Any]]:
    """For each distilled pair of the student's head map: the heads, their JS divergence on this image, and
    ``rank``: 1 when the taught teacher head is the closest (lowest JS) of its block to the student head."""
    if analysis.head_map is None:
        return []
    rows = []
    for p in analysis.head_map.pairs:
        to_block = head_divergence(analysis.student.attn_probs[p.student_block, p.student_head][None],
                                   analysis.teacher.attn_probs[p.teacher_block])[0]  # [Ht]
        js = float(to_block[p.teacher_head])
        rows.append({"teacher_block": p.teacher_block, "teacher_head": p.teacher_head,
                     "student_block": p.student_block, "student_head": p.student_head, "js": js,
                     "rank": 1 + int((to_block < js).sum()), "teacher_heads": int(to_block.size)})
    return rows
