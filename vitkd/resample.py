"""A teacher's attention maps resampled onto a student's token grid (different patch sizes).

A map ``[B, P, T, T]`` has a query axis (rows) and a key axis (columns), each laid out as
``num_prefix_tokens`` (CLS, registers) then a row-major patch grid. Resampling maps the
teacher's patch grid onto the student's on both axes and keeps the prefix tokens:

- the query axis: a student patch query's row is a weighted mean of the teacher's patch query
  rows (``R``, below); prefix query rows (the CLS row) are kept, so their patch keys are
  resampled along the key axis only;
- the key axis: the student's patch keys are the teacher's patch keys resampled with the same
  ``R``; prefix key columns are kept, so the CLS column is resampled along the query axis only.

``R`` (student cells x teacher cells) is separable, one matrix per grid axis (``kron(R_h, R_w)``
on the row-major grid); each of its rows sums to 1:

- student axis coarser (fewer cells): **area averaging**, each student cell the mean of the
  teacher cells it covers, weighted by the covered length. When the teacher's size divides
  evenly (8 -> 4, 14 -> 7) that is the plain mean of ``k`` whole cells (``F.avg_pool2d``).
  Otherwise a teacher cell straddling two student cells is split between them by length.
  (Bilinear sampling would skip whole teacher cells when shrinking by more than 2x: attention
  on such a patch would vanish.)
- student axis finer: **bilinear**, half-pixel centres, edges clamped (``F.interpolate``
  ``mode="bilinear", align_corners=False``).
- same size: the identity.

What is resampled depends on the loss:

- ``ce``/``kl`` (distributions): probabilities ``softmax(logits)`` are resampled. A student patch
  key gets its share of the teacher's patch-key mass: after ``R`` the patch keys of each row are
  rescaled so they hold exactly the mass the teacher's patch keys held in that (query-averaged)
  row, and the prefix keys keep theirs, so every row sums to 1 and the CLS key's probability is
  unchanged. (With even area averaging the rescale is the constant ``N_teacher / N_student``:
  a student key holds the summed mass of the ``k`` teacher keys it covers.) The result is
  returned as log-probabilities, which the losses' ``log_softmax`` gives back unchanged.
- ``mse`` (logits): the logits are resampled with the same operator on both axes, no
  renormalisation: ``Q L Q^T`` with ``Q`` the identity on prefix tokens and ``R`` on patches. As
  ``q . k`` is bilinear, the mean of a cell's logits is the logit between the cell's mean query
  and mean key (with area averaging). Masked keys (``-inf``, a Locality Self-Attention teacher's
  diagonal) are left out of the means; an entry is ``-inf`` only when every logit it averages is.

The teacher side is a fixed target: ``resample_attention`` runs under ``no_grad``.
"""

from __future__ import annotations

import math

import torch

from .attention import TokenLayout
from .errors import IncompatibleModelsError

__all__ = ["axis_resample_matrix", "grid_resample_matrix", "token_resample_matrix", "check_resamplable",
           "resample_attention"]


def axis_resample_matrix(src: int, dst: int) -> torch.Tensor:
    """Weights ``[dst, src]`` (float64) taking ``src`` cells of one grid axis to ``dst`` cells; rows sum to 1.

    Area averaging when ``dst < src`` (exact covered lengths), bilinear with half-pixel centres
    when ``dst > src``, the identity when equal.
    """
    if src < 1 or dst < 1:
        raise ValueError(f"grid sizes must be positive, got {src} -> {dst}")
    if dst == src:
        return torch.eye(src, dtype=torch.float64)
    weights = torch.zeros(dst, src, dtype=torch.float64)
    scale = src / dst  # teacher cells per student cell
    if dst < src:
        for j in range(dst):
            lo, hi = j * scale, (j + 1) * scale
            for i in range(math.floor(lo), min(src, math.ceil(hi))):
                weights[j, i] = (min(hi, i + 1) - max(lo, i)) / scale
        return weights
    for j in range(dst):
        x = max((j + 0.5) * scale - 0.5, 0.0)  # source coordinate of the student cell's centre
        i0 = min(math.floor(x), src - 1)
        i1 = min(i0 + 1, src - 1)
        frac = x - i0
        weights[j, i0] += 1.0 - frac
        weights[j, i1] += frac
    return weights


def grid_resample_matrix(src_grid: tuple[int, int], dst_grid: tuple[int, int]) -> torch.Tensor:
    """``R`` ``[dst_h * dst_w, src_h * src_w]`` (float64) on row-major grids: ``kron(R_h, R_w)``."""
    return torch.kron(axis_resample_matrix(src_grid[0], dst_grid[0]), axis_resample_matrix(src_grid[1], dst_grid[1]))


def token_resample_matrix(teacher_layout: TokenLayout, student_layout: TokenLayout) -> torch.Tensor:
    """``Q`` ``[T_student, T_teacher]`` (float64): the identity on prefix tokens, ``R`` on the patch grid."""
    check_resamplable(teacher_layout, student_layout)
    n = teacher_layout.num_prefix_tokens
    q = torch.zeros(student_layout.num_tokens, teacher_layout.num_tokens, dtype=torch.float64)
    q[:n, :n] = torch.eye(n, dtype=torch.float64)
    q[n:, n:] = grid_resample_matrix(teacher_layout.grid_size, student_layout.grid_size)
    return q


def check_resamplable(teacher_layout: TokenLayout, student_layout: TokenLayout) -> None:
    """Raise ``IncompatibleModelsError`` unless the teacher's maps can be resampled onto the student's tokens."""
    if teacher_layout.num_prefix_tokens != student_layout.num_prefix_tokens:
        raise IncompatibleModelsError(
            f"the teacher's maps have {teacher_layout.num_prefix_tokens} prefix token(s) and the student's "
            f"{student_layout.num_prefix_tokens}: maps are resampled between patch grids, but prefix tokens (CLS, "
            "registers) must match one to one (a DeiT student's distillation token aside); pick a student with "
            "the teacher's prefix tokens")
    if min(*teacher_layout.grid_size, *student_layout.grid_size) < 1:
        raise IncompatibleModelsError(f"cannot resample between patch grids {teacher_layout.grid_size} and "
                                      f"{student_layout.grid_size}: both models need a known, non-empty grid")


def _masked_mean(logits: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``Q L Q^T`` over the finite logits only (weights renormalised); ``-inf`` where none is finite.

    Without ``-inf`` the denominator ``Q 1 Q^T`` is 1 (rows of ``Q`` sum to 1): plain ``Q L Q^T``.
    """
    finite = torch.isfinite(logits)
    num = q @ torch.where(finite, logits, 0.0) @ q.T
    den = q @ finite.to(logits.dtype) @ q.T
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(logits.dtype).tiny), -math.inf)


@torch.no_grad()
def resample_attention(teacher_logits: torch.Tensor, teacher_layout: TokenLayout, student_layout: TokenLayout,
                       kind: str, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """Teacher maps ``[B, P, T_t, T_t]`` (pre-softmax logits) on the student's tokens: ``[B, P, T_s, T_s]``.

    For ``ce``/``kl`` the result holds log-probabilities (rows sum to 1 after ``exp``); for
    ``mse`` resampled logits (see the module docstring). Same layouts: ``teacher_logits`` itself.
    ``matrix``: ``token_resample_matrix(teacher_layout, student_layout)``, built once by a caller
    that resamples every step. Computed in float32 (float64 stays), without gradient.
    """
    if teacher_logits.shape[-2:] != (teacher_layout.num_tokens, teacher_layout.num_tokens):
        raise IncompatibleModelsError(f"teacher maps {tuple(teacher_logits.shape)} do not match the teacher's "
                                      f"{teacher_layout.num_tokens} tokens")
    if kind not in ("mse", "ce", "kl"):
        raise ValueError(f"unknown attention loss {kind!r}")
    check_resamplable(teacher_layout, student_layout)
    if teacher_layout == student_layout:
        return teacher_logits
    dtype = torch.promote_types(teacher_logits.dtype, torch.float32)
    x = teacher_logits.to(dtype)
    q = (token_resample_matrix(teacher_layout, student_layout) if matrix is None else matrix).to(x.device, dtype)
    with torch.autocast(x.device.type, enabled=False):  # under --bf16 too: matmuls in float32
        return _resample(x, q, teacher_layout.num_prefix_tokens, kind)


def _resample(x: torch.Tensor, q: torch.Tensor, n: int, kind: str) -> torch.Tensor:
    if kind == "mse":  # no data-dependent branch on -inf: one graph under torch.compile
        return _masked_mean(x, q)
    rows = q @ x.softmax(dim=-1)                      # query axis: [B, P, T_s, T_t], rows still sum to 1
    patch_mass = rows[..., n:].sum(-1, keepdim=True)  # what the teacher's patch keys hold in each row
    patch = rows[..., n:] @ q[n:, n:].T               # key axis: [B, P, T_s, N_s]
    patch = patch * (patch_mass / patch.sum(-1, keepdim=True).clamp(min=torch.finfo(x.dtype).tiny))
    return torch.cat([rows[..., :n], patch], dim=-1).log()
