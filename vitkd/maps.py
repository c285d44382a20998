"""Attention maps on the patch grid and their overlays: per head, fused, rollout, block comparisons.

Each model's maps are drawn on its own patch grid (``ModelAnalysis.layout``) and upsampled to the
image, so a teacher and a student with different grids show side by side. A query patch is chosen
on the finer grid (``query_grid``) and each model uses its patch covering the same image point
(``model_query``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .analysis import ImageAnalysis, ModelAnalysis
from .attention import TokenLayout
from .headmap import HeadMap, _heads_text
from .overlay import add_border, add_caption, encode_png, enlarge_image, overlay, tile_images
from .rollout import fuse_heads

__all__ = ["cls_attention_maps", "fused_map", "rollout_map", "render_map", "mark_patch", "mark_query", "Tile",
           "HeadComparison", "compare_heads", "blocks_overview", "comparison_png", "taught_by", "teaches",
           "paired_teacher_block", "heads_text", "query_grid", "patch_at", "model_query", "SCALES", "HIGHLIGHT",
           "STUDENT_MARK"]

SCALES = ("map", "model", "shared")  # colour scale per map, per model, or one for both models
HIGHLIGHT = (255, 196, 0)  # frame colour of distilled heads (and of the teacher's query patch)
STUDENT_MARK = (0, 200, 255)  # frame colour of the student's query patch when the grids differ


def _query_token(layout: TokenLayout, query: tuple[int, int] | None) -> int | None:
    """Token index of the query row: the first prefix (CLS) token, or patch (row, col); None: mean of patches."""
    if query is None:
        return 0 if layout.num_prefix_tokens > 0 else None
    gh, gw = layout.grid_size
    row, col = int(query[0]), int(query[1])
    if not (0 <= row < gh and 0 <= col < gw):
        raise ValueError(f"query patch ({row}, {col}) outside the {gh}x{gw} grid")
    return layout.num_prefix_tokens + row * gw + col


def cls_attention_maps(probs: np.ndarray, layout: TokenLayout, query: tuple[int, int] | None = None) -> np.ndarray:
    """[H, T, T] -> [H, gh, gw]: how much the query token (CLS, or patch ``(row, col)``) attends to each patch.

    Prefix tokens are dropped from the keys, so maps need not sum to one. A model without a
    prefix token uses the mean over all patch queries when ``query`` is None.
    """
    p = np.asarray(probs)
    if p.ndim != 3 or p.shape[1] != layout.num_tokens or p.shape[2] != layout.num_tokens:
        raise ValueError(f"expected [H, {layout.num_tokens}, {layout.num_tokens}] attention, got {p.shape}")
    gh, gw = layout.grid_size
    token = _query_token(layout, query)
    rows = p[:, layout.num_prefix_tokens:, :].mean(axis=1) if token is None else p[:, token, :]
    return rows[:, layout.num_prefix_tokens:].reshape(p.shape[0], gh, gw).copy()


def fused_map(probs: np.ndarray, layout: TokenLayout, head_fusion: str = "mean",
              query: tuple[int, int] | None = None) -> np.ndarray:
    """[H, T, T] -> [gh, gw]: the heads' query-to-patch maps fused by mean, max or min."""
    maps = torch.from_numpy(cls_attention_maps(probs, layout, query))[None]  # [1, H, gh, gw]
    return fuse_heads(maps, head_fusion)[0].numpy()


def rollout_map(rollout: np.ndarray, layout: TokenLayout, query: tuple[int, int] | None = None) -> np.ndarray:
    """[T, T] rollout -> [gh, gw]: the query token's (default CLS) row over the patch tokens."""
    return cls_attention_maps(np.asarray(rollout)[None], layout, query)[0]


def render_map(image_rgb: np.ndarray, attn_map: np.ndarray, size: int, alpha: float = 0.5,
               colormap: str = "inferno", vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """The crop enlarged to ``size`` x ``size`` with ``attn_map`` upsampled and blended over it."""
    lo = float(np.min(attn_map)) if vmin is None else vmin
    hi = float(np.max(attn_map)) if vmax is None else vmax
    return overlay(enlarge_image(image_rgb, size), attn_map, alpha, colormap, lo, hi)


def _frame_patch(big: np.ndarray, grid: tuple[int, int], patch: tuple[int, int], color: Sequence[int],
                 width: int = 2) -> None:
    """Draw a frame inside patch ``(row, col)`` of ``grid`` on the enlarged crop ``big`` (in place)."""
    size_h, size_w = big.shape[:2]
    gh, gw = grid
    top, bottom = round(patch[0] * size_h / gh), round((patch[0] + 1) * size_h / gh)
    left, right = round(patch[1] * size_w / gw), round((patch[1] + 1) * size_w / gw)
    big[top:bottom, left:right] = add_border(big[top:bottom, left:right], color, width)


def mark_patch(image_rgb: np.ndarray, layout: TokenLayout, query: tuple[int, int] | None, size: int,
               color: Sequence[int] = HIGHLIGHT) -> np.ndarray:
    """The crop enlarged to ``size`` with a frame around query patch ``(row, col)`` (none for the CLS query)."""
    big = enlarge_image(image_rgb, size)
    if query is None:
        return big
    _query_token(layout, query)  # validates the patch
    _frame_patch(big, layout.grid_size, query, color)
    return big


def query_grid(analysis: ImageAnalysis) -> tuple[int, int]:
    """The grid a query patch is chosen on: the finer of the two models' grids (on each axis the more cells),
    so every patch of the finer model can be picked."""
    (th, tw), (sh, sw) = analysis.teacher.layout.grid_size, analysis.student.layout.grid_size
    return max(th, sh), max(tw, sw)


def patch_at(patch: tuple[int, int], grid: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """The patch of ``target`` covering the centre of ``patch`` of ``grid`` (both grids span the same image):
    on each axis ``floor((i + 0.5) * target / grid)``, in integers. The patch itself when the grids match."""
    gh, gw = grid
    row, col = int(patch[0]), int(patch[1])
    if not (0 <= row < gh and 0 <= col < gw):
        raise ValueError(f"query patch ({row}, {col}) outside the {gh}x{gw} grid")
    return (2 * row + 1) * target[0] // (2 * gh), (2 * col + 1) * target[1] // (2 * gw)


def model_query(analysis: ImageAnalysis, role: str, query: tuple[int, int] | None) -> tuple[int, int] | None:
    """``role``'s query patch for ``query`` on ``query_grid(analysis)`` (``patch_at``); None (CLS) stays None."""
    if query is None:
        return None
    return patch_at(query, query_grid(analysis), analysis.model(role).layout.grid_size)


def mark_query(analysis: ImageAnalysis, query: tuple[int, int] | None, size: int) -> np.ndarray:
    """The crop enlarged to ``size`` with each model's query patch framed: the teacher's in ``HIGHLIGHT``, the
    student's in ``STUDENT_MARK`` (one ``HIGHLIGHT`` frame when the grids are the same)."""
    big = enlarge_image(analysis.image_rgb, size)
    if query is None:
        return big
    teacher, student = analysis.teacher.layout.grid_size, analysis.student.layout.grid_size
    _frame_patch(big, teacher, model_query(analysis, "teacher", query), HIGHLIGHT, 2 if analysis.same_grid else 3)
    if not analysis.same_grid:
        _frame_patch(big, student, model_query(analysis, "student", query), STUDENT_MARK)
    return big


class Tile(NamedTuple):
    """One rendered map with its caption; ``highlighted`` marks heads that take part in distillation."""

    image: np.ndarray
    caption: str
    highlighted: bool


@dataclass(frozen=True)
class HeadComparison:
    """Rendered maps of one teacher block and one student block (one tile per head, or one fused tile)."""

    teacher_block: int
    student_block: int
    teacher: tuple[Tile, ...]
    student: tuple[Tile, ...]


def heads_text(heads: int | Sequence[int]) -> str:
    """``3`` for one head, ``{0,1}`` for a group: the ``head:`` syntax, as ``HeadMap.describe`` writes it."""
    return _heads_text((int(heads),) if isinstance(heads, int | np.integer) else tuple(int(h) for h in heads))


def taught_by(head_map: HeadMap | None, student_block: int) -> dict[int, tuple[int, tuple[int, ...]]]:
    """``{student_head: (teacher_block, teacher_heads)}`` for one student block: every teacher head that taught
    it (one, or a group whose mean it follows)."""
    if head_map is None:
        return {}
    return {g.student_head: (g.teacher_block, g.teacher_heads) for g in head_map.groups
            if g.student_block == student_block}


def teaches(head_map: HeadMap | None, teacher_block: int) -> dict[int, list[tuple[int, int]]]:
    """``{teacher_head: [(student_block, student_head), ...]}`` for one teacher block."""
    out: dict[int, list[tuple[int, int]]] = {}
    if head_map is not None:
        for p in head_map.pairs:
            if p.teacher_block == teacher_block:
                out.setdefault(p.teacher_head, []).append((p.student_block, p.student_head))
    return out


def paired_teacher_block(head_map: HeadMap | None, student_block: int, teacher_depth: int,
                         student_depth: int) -> int:
    """The teacher block that taught ``student_block`` (the most frequent one), else the depth-proportional one."""
    taught = [tb for tb, _ in taught_by(head_map, student_block).values()]
    if taught:
        return Counter(taught).most_common(1)[0][0]
    return min(teacher_depth - 1, max(0, round((student_block + 1) * teacher_depth / student_depth) - 1))


def _ranges(maps: Sequence[np.ndarray], groups: Sequence[int], scale: str) -> list[tuple[float, float]]:
    """(vmin, vmax) per map: its own range, its group's (model's), or one for all maps."""
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if scale == "map":
        return [(float(m.min()), float(m.max())) for m in maps]
    if scale == "shared":
        lo, hi = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
        return [(lo, hi)] * len(maps)
    bounds: dict[int, tuple[float, float]] = {}
    for m, g in zip(maps, groups, strict=True):
        lo, hi = bounds.get(g, (np.inf, -np.inf))
        bounds[g] = (min(lo, float(m.min())), max(hi, float(m.max())))
    return [bounds[g] for g in groups]


def compare_heads(analysis: ImageAnalysis, teacher_block: int, student_block: int,
                  query: tuple[int, int] | None = None, head_fusion: str | None = None, alpha: float = 0.5,
                  colormap: str = "inferno", scale: str = "model", size: int = 160) -> HeadComparison:
    """Overlays of a teacher block beside a student block: per head, or fused when ``head_fusion`` is given.

    Each model's maps are on its own grid, ``query`` on ``query_grid(analysis)`` (``model_query``).
    Student captions name the teacher heads that taught them (``S2.h0 <- taught by T4.h0``, a group
    ``S2.h0 <- taught by T4.h{0,1}``), teacher captions the student heads they taught; all of them
    are ``highlighted`` and framed, so a student head taught by a group is framed with each of its heads.
    """
    for role, block, depth in (("teacher", teacher_block, analysis.teacher.depth),
                               ("student", student_block, analysis.student.depth)):
        if not 0 <= block < depth:
            raise ValueError(f"{role} block {block} out of range: the {role} has {depth} blocks")
    t_probs, s_probs = analysis.teacher.attn_probs[teacher_block], analysis.student.attn_probs[student_block]
    t_layout, s_layout = analysis.teacher.layout, analysis.student.layout
    t_query, s_query = model_query(analysis, "teacher", query), model_query(analysis, "student", query)
    if head_fusion is None:
        t_maps = list(cls_attention_maps(t_probs, t_layout, t_query))
        s_maps = list(cls_attention_maps(s_probs, s_layout, s_query))
        taught, taught_heads = teaches(analysis.head_map, teacher_block), taught_by(analysis.head_map, student_block)
        t_caps = [f"T{teacher_block}.h{h}" + ("".join(f" -> S{sb}.h{sh}" for sb, sh in taught[h])
                                               if h in taught else "") for h in range(len(t_maps))]
        s_caps = [f"S{student_block}.h{h}" + (f" <- taught by T{taught_heads[h][0]}.h{heads_text(taught_heads[h][1])}"
                                               if h in taught_heads else "") for h in range(len(s_maps))]
        t_marks = [h in taught for h in range(len(t_maps))]
        s_marks = [h in taught_heads for h in range(len(s_maps))]
    else:
        t_maps = [fused_map(t_probs, t_layout, head_fusion, t_query)]
        s_maps = [fused_map(s_probs, s_layout, head_fusion, s_query)]
        t_caps, s_caps = [f"T{teacher_block} {head_fusion} of heads"], [f"S{student_block} {head_fusion} of heads"]
        t_marks, s_marks = [False], [False]
    ranges = _ranges(t_maps + s_maps, [0] * len(t_maps) + [1] * len(s_maps), scale)
    big = enlarge_image(analysis.image_rgb, size)
    images = [overlay(big, m, alpha, colormap, lo, hi) for m, (lo, hi) in zip(t_maps + s_maps, ranges, strict=True)]
    tiles = [Tile(add_border(img, HIGHLIGHT) if mark else img, cap, mark)
             for img, cap, mark in zip(images, t_caps + s_caps, t_marks + s_marks, strict=True)]
    return HeadComparison(teacher_block, student_block, tuple(tiles[:len(t_maps)]), tuple(tiles[len(t_maps):]))


def blocks_overview(result: ModelAnalysis, image_rgb: np.ndarray, query: tuple[int, int] | None = None,
                    alpha: float = 0.6, colormap: str = "inferno", size: int = 64,
                    highlight: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset()) -> np.ndarray:
    """One image: a block x head grid of small overlays (each on its own scale), on the model's own grid
    (``query`` is a patch of it: ``model_query``); ``highlight`` (block, head) cells get a frame."""
    small = enlarge_image(image_rgb, size)
    tiles = []
    for block in range(result.depth):
        for head, m in enumerate(cls_attention_maps(result.attn_probs[block], result.layout, query)):
            tile = overlay(small, m, alpha, colormap)
            tiles.append(add_border(tile, HIGHLIGHT, 2) if (block, head) in highlight else tile)
    return tile_images(tiles, result.num_heads, pad=2)


def comparison_png(comparison: HeadComparison, extra: Sequence[Tile] = ()) -> bytes:
    """PNG bytes of the shown overlays: teacher tiles on the first row(s), student tiles below, ``extra`` last."""
    def captioned(tiles: Sequence[Tile]) -> list[np.ndarray]:
        return [add_caption(t.image, t.caption) for t in tiles]

    columns = max(len(comparison.teacher), len(comparison.student), len(extra), 1)
    rows = [tile_images(captioned(group), columns) for group in (comparison.teacher, comparison.student, extra)
            if group]
    width = max(r.shape[1] for r in rows)
    padded = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return encode_png(np.concatenate(padded, axis=0))
