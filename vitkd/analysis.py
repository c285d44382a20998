"""Results the app and the CLI share: checkpoint evaluation, teacher/student pairs and per-image analysis.

Everything here is a pure function of its arguments (models are only read, never
mutated), so one cached model pair can serve many threads at once. Arrays handed to
callers are numpy: attention probabilities [H, T, T] per block, maps [gh, gw] on the
patch grid, images RGB uint8 [H, W, 3].
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image

from .attention import TokenLayout, capture_attention, token_layout
from .checkpoint import load_checkpoint
from .data import load_split, split_class_names
from .distill import HeadMap
from .errors import ConfigError, IncompatibleModelsError
from .images import preprocess
from .models import describe_model
from .overlay import add_border, add_caption, encode_png, enlarge_image, overlay, tile_images, upsample_map
from .rollout import HEAD_FUSIONS, attention_rollout, fuse_heads, gradient_rollout
from .train import evaluate, resolve_device

__all__ = [
    "evaluate_checkpoint",
    # pairs
    "ModelPair", "check_pair", "load_pair", "model_summary",
    # per image
    "Prediction", "ModelAnalysis", "ImageAnalysis", "analyze_image", "analyze_pair", "recompute_rollout",
    "class_rollout",
    # maps and overlays
    "cls_attention_maps", "fused_map", "rollout_map", "upsample_map", "overlay", "render_map", "mark_patch", "Tile",
    "HeadComparison", "compare_heads", "blocks_overview", "SCALES",
    # agreement
    "head_divergence", "pair_divergences", "paired_teacher_block", "taught_by", "teaches",
    "PredictionFlag", "flag_predictions",
    # export
    "analysis_to_json", "analysis_to_csv", "comparison_png", "encode_png",
]

SCALES = ("map", "model", "shared")  # colour scale per map, per model, or one for both models
HIGHLIGHT = (255, 196, 0)  # frame colour of distilled heads


def evaluate_checkpoint(path: str | Path, data: str | None = None, split: str = "test", batch_size: int = 512,
                        device: str = "auto", cache_dir: str | None = None) -> dict[str, Any]:
    """Top-1 accuracy of a checkpoint on a split of its own (or the given) data source.

    Raises ``ConfigError`` before decoding anything when the data's class names (or their order)
    are not the checkpoint's: label i must mean the class the model's output i was trained on.
    """
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    source = data or meta.get("data")
    if not source:
        raise ConfigError(f"checkpoint {path} records no data source: pass --data")
    data_names = split_class_names(source, split, cache_dir)
    model_names = tuple(str(n) for n in meta.get("class_names") or ())
    mismatch = model_names != data_names if model_names else len(data_names) != int(model.num_classes)
    if mismatch:
        recorded = _names_preview(model_names) if model_names else f"{model.num_classes} unnamed classes"
        order = ""
        if sorted(model_names) == sorted(data_names):
            i = next(i for i, (a, b) in enumerate(zip(model_names, data_names, strict=True)) if a != b)
            order = (f" (the same names in another order: class {i} is {model_names[i]!r} in the checkpoint, "
                     f"{data_names[i]!r} in the data)")
        raise ConfigError(f"checkpoint {path} was trained on {recorded} but {source} {split} has "
                          f"{_names_preview(data_names)}{order}: evaluate it on the data it was trained on")
    split_data = load_split(source, split, int(meta.get("img_size") or model.patch_embed.img_size[0]), cache_dir,
                            progress=False)
    # Normalise with the statistics the model was trained with, not the split's.
    split_data = dataclasses.replace(split_data, mean=tuple(meta.get("mean", split_data.mean)),
                                     std=tuple(meta.get("std", split_data.std)))
    metrics = evaluate(model, split_data, batch_size, dev)
    return {"checkpoint": str(path), "data": source, "split": split, **metrics}


# ----------------------------------------------------------------------------------------------- pairs

def _img_size(model: torch.nn.Module, meta: Mapping[str, Any]) -> int:
    return int(meta.get("img_size") or model.patch_embed.img_size[0])


def _class_names(model: torch.nn.Module, meta: Mapping[str, Any]) -> tuple[str, ...]:
    names = meta.get("class_names")
    if names:
        return tuple(str(n) for n in names)
    return tuple(f"class {i}" for i in range(int(model.num_classes)))


def _norm_stats(meta: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # vitkd checkpoints always record these; 0.5 is timm's default for ViTs without them.
    return tuple(meta.get("mean") or (0.5, 0.5, 0.5)), tuple(meta.get("std") or (0.5, 0.5, 0.5))


def _describe_layout(layout: TokenLayout) -> str:
    gh, gw = layout.grid_size
    return (f"a {gh}x{gw} patch grid with {layout.num_prefix_tokens} prefix token(s) "
            f"({layout.num_tokens} tokens)")


def _names_preview(names: Sequence[str]) -> str:
    shown = ", ".join(names[:4])
    return f"{len(names)} classes ({shown}{', ...' if len(names) > 4 else ''})"


@dataclass(frozen=True, eq=False)
class ModelPair:
    """A teacher and a student that can be compared head by head: same token layout, input size and classes.

    ``head_map`` is the student's recorded map (which teacher head taught which student head),
    or None for a baseline student or a map that does not fit this teacher (see ``notes``).
    """

    teacher: torch.nn.Module
    teacher_meta: Mapping[str, Any]
    student: torch.nn.Module
    student_meta: Mapping[str, Any]
    layout: TokenLayout
    img_size: int
    class_names: tuple[str, ...]
    head_map: HeadMap | None
    notes: tuple[str, ...] = ()


def check_pair(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
               student_meta: Mapping[str, Any]) -> ModelPair:
    """Validate that two models can be compared; raise ``IncompatibleModelsError`` saying what differs."""
    try:
        teacher_layout = token_layout(teacher)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"teacher: {exc}") from exc
    try:
        student_layout = token_layout(student)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"student: {exc}") from exc
    if teacher_layout != student_layout:
        raise IncompatibleModelsError(
            f"token grids differ: the teacher has {_describe_layout(teacher_layout)} but the student has "
            f"{_describe_layout(student_layout)}; attention can only be compared between models with the same "
            "token layout: pick a student built for this teacher's input and patch size")
    teacher_size, student_size = _img_size(teacher, teacher_meta), _img_size(student, student_meta)
    if teacher_size != student_size:
        raise IncompatibleModelsError(
            f"input sizes differ: the teacher reads {teacher_size}x{teacher_size} images and the student "
            f"{student_size}x{student_size}; pick models trained at the same resolution")
    teacher_names, student_names = _class_names(teacher, teacher_meta), _class_names(student, student_meta)
    if teacher_names != student_names:
        raise IncompatibleModelsError(
            f"classes differ: the teacher predicts {_names_preview(teacher_names)} and the student "
            f"{_names_preview(student_names)}; pick two models trained on the same data")
    notes: list[str] = []
    head_map = None
    rows = student_meta.get("head_map")
    if rows:
        t_desc, s_desc = describe_model(teacher), describe_model(student)
        try:
            head_map = HeadMap.from_list(rows).validate(t_desc["blocks"], t_desc["heads"], s_desc["blocks"],
                                                        s_desc["heads"])
        except ConfigError as exc:
            notes.append(f"the student's head map does not fit this teacher ({exc}); distilled pairs are not shown")
    return ModelPair(teacher, teacher_meta, student, student_meta, teacher_layout, teacher_size, teacher_names,
                     head_map, tuple(notes))


def load_pair(teacher_path: str | Path, student_path: str | Path, device: str | torch.device = "cpu") -> ModelPair:
    """Load two checkpoints and check they can be compared (``CheckpointError``/``IncompatibleModelsError``)."""
    teacher, teacher_meta = load_checkpoint(teacher_path, device)
    student, student_meta = load_checkpoint(student_path, device)
    return check_pair(teacher, teacher_meta, student, student_meta)


def model_summary(model: torch.nn.Module, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a user needs to know about one checkpoint at a glance (JSON-able)."""
    desc = describe_model(model)
    metrics = meta.get("metrics") or {}
    teacher = meta.get("teacher") or {}
    rows = meta.get("head_map")
    return {
        **desc,
        "kind": meta.get("kind", "unknown"),
        "data": meta.get("data"),
        "epoch": meta.get("epoch"),
        "accuracy": metrics.get("accuracy"),
        "class_names": list(_class_names(model, meta)),
        "head_map": HeadMap.from_list(rows).describe() if rows else None,
        "teacher": teacher.get("path"),
    }


# ----------------------------------------------------------------------------------------------- per image

class Prediction(NamedTuple):
    index: int
    name: str
    prob: float


@dataclass(frozen=True, eq=False)
class ModelAnalysis:
    """One model's view of one image.

    ``attn_probs`` [L, H, T, T] holds every block's attention probabilities; ``rollout``
    [T, T] the attention rollout with the analysis' head fusion and discard ratio;
    ``inputs`` [1, 3, S, S] the normalised input (for ``class_rollout``).
    """

    role: str
    logits: np.ndarray
    probs: np.ndarray
    top_k: tuple[Prediction, ...]
    attn_probs: np.ndarray
    rollout: np.ndarray
    inputs: torch.Tensor

    @property
    def predicted(self) -> int:
        return self.top_k[0].index

    @property
    def depth(self) -> int:
        return int(self.attn_probs.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.attn_probs.shape[1])


@dataclass(frozen=True)
class PredictionFlag:
    """Do the models agree, and (when the true label is known) which of them is right."""

    agree: bool
    teacher_correct: bool | None
    student_correct: bool | None

    @property
    def status(self) -> str:
        """One of ``agree``, ``disagree`` (label unknown), ``both-right``, ``both-wrong``, ``teacher-wrong``,
        ``student-wrong``."""
        if self.teacher_correct is None:
            return "agree" if self.agree else "disagree"
        if self.teacher_correct and self.student_correct:
            return "both-right"
        if not self.teacher_correct and not self.student_correct:
            return "both-wrong"
        return "student-wrong" if self.teacher_correct else "teacher-wrong"

    def message(self) -> str:
        return {
            "agree": "Teacher and student agree",
            "disagree": "Teacher and student disagree",
            "both-right": "Both models are right",
            "both-wrong": "Both models are wrong" + ("" if self.agree else " (and disagree)"),
            "teacher-wrong": "They disagree: the teacher is wrong, the student is right",
            "student-wrong": "They disagree: the student is wrong, the teacher is right",
        }[self.status]


def flag_predictions(teacher_pred: int, student_pred: int, true_label: int | None = None) -> PredictionFlag:
    """Agreement of two predicted class indices, and correctness when ``true_label`` is given."""
    if true_label is None:
        return PredictionFlag(teacher_pred == student_pred, None, None)
    return PredictionFlag(teacher_pred == student_pred, teacher_pred == true_label, student_pred == true_label)


@dataclass(frozen=True, eq=False)
class ImageAnalysis:
    """Teacher and student on one image; ``image_rgb`` [S, S, 3] is the crop both models saw."""

    image_rgb: np.ndarray
    class_names: tuple[str, ...]
    layout: TokenLayout
    head_map: HeadMap | None
    teacher: ModelAnalysis
    student: ModelAnalysis
    true_label: int | None
    head_fusion: str
    discard_ratio: float

    @property
    def flag(self) -> PredictionFlag:
        return flag_predictions(self.teacher.predicted, self.student.predicted, self.true_label)

    def model(self, role: str) -> ModelAnalysis:
        if role not in ("teacher", "student"):
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        return self.teacher if role == "teacher" else self.student


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _analyze_model(role: str, model: torch.nn.Module, meta: Mapping[str, Any], image: Image.Image | np.ndarray,
                   img_size: int, class_names: Sequence[str], top_k: int, head_fusion: str,
                   discard_ratio: float) -> tuple[ModelAnalysis, np.ndarray]:
    mean, std = _norm_stats(meta)
    prep = preprocess(image, img_size, mean, std)
    inputs = prep.tensor.to(_model_device(model))
    with torch.inference_mode():
        out = capture_attention(model, inputs)  # one pass: logits and every block's attention
        blocks = sorted(out.attn_probs)
        probs_per_block = [out.attn_probs[b].float() for b in blocks]
        rollout = attention_rollout(probs_per_block, head_fusion, discard_ratio)[0]
        logits = out.class_logits[0].float()
        probs = logits.softmax(-1)
        k = min(top_k, probs.numel())
        top_p, top_i = probs.topk(k)
        attn = torch.stack([p[0] for p in probs_per_block]).cpu().numpy()
    top = tuple(Prediction(int(i), class_names[int(i)], float(p))
                for p, i in zip(top_p.tolist(), top_i.tolist(), strict=True))
    result = ModelAnalysis(role=role, logits=logits.cpu().numpy(), probs=probs.cpu().numpy(), top_k=top,
                           attn_probs=attn, rollout=rollout.cpu().numpy(), inputs=prep.tensor)
    return result, prep.rgb


def analyze_pair(pair: ModelPair, image: Image.Image | np.ndarray, true_label: int | None = None, top_k: int = 5,
                 head_fusion: str = "mean", discard_ratio: float = 0.0) -> ImageAnalysis:
    """Predictions, every block's attention and the attention rollout of both models for one image."""
    if head_fusion not in HEAD_FUSIONS:
        raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")
    if true_label is not None and not 0 <= int(true_label) < len(pair.class_names):
        raise ValueError(f"true_label {true_label} out of range for {len(pair.class_names)} classes")
    teacher, crop = _analyze_model("teacher", pair.teacher, pair.teacher_meta, image, pair.img_size,
                                   pair.class_names, top_k, head_fusion, discard_ratio)
    student, _ = _analyze_model("student", pair.student, pair.student_meta, image, pair.img_size,
                                pair.class_names, top_k, head_fusion, discard_ratio)
    return ImageAnalysis(image_rgb=crop, class_names=pair.class_names, layout=pair.layout, head_map=pair.head_map,
                         teacher=teacher, student=student, true_label=None if true_label is None else int(true_label),
                         head_fusion=head_fusion, discard_ratio=float(discard_ratio))


def analyze_image(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
                  student_meta: Mapping[str, Any], image: Image.Image | np.ndarray, true_label: int | None = None,
                  top_k: int = 5, head_fusion: str = "mean", discard_ratio: float = 0.0) -> ImageAnalysis:
    """``analyze_pair`` for two loose models (checked with ``check_pair`` first)."""
    pair = check_pair(teacher, teacher_meta, student, student_meta)
    return analyze_pair(pair, image, true_label, top_k, head_fusion, discard_ratio)


def recompute_rollout(result: ModelAnalysis, head_fusion: str = "mean", discard_ratio: float = 0.0) -> np.ndarray:
    """Attention rollout [T, T] from already captured attention (no model call): for rollout sliders."""
    probs = torch.from_numpy(result.attn_probs)[:, None]  # [L, 1, H, T, T]: a batch of one per block
    return attention_rollout(list(probs), head_fusion, discard_ratio)[0].numpy()


def class_rollout(model: torch.nn.Module, image_tensor: torch.Tensor, class_index: int) -> np.ndarray:
    """Class-specific gradient rollout [T, T] for one normalised image [1, 3, S, S] (model is not mutated)."""
    num_classes = int(model.num_classes)
    if not 0 <= int(class_index) < num_classes:
        raise ValueError(f"class_index {class_index} out of range for {num_classes} classes")
    inputs = image_tensor.to(_model_device(model))
    return gradient_rollout(model, inputs, int(class_index))[0].detach().cpu().numpy()


# ----------------------------------------------------------------------------------------------- maps

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


def mark_patch(image_rgb: np.ndarray, layout: TokenLayout, query: tuple[int, int] | None, size: int,
               color: Sequence[int] = HIGHLIGHT) -> np.ndarray:
    """The crop enlarged to ``size`` with a frame around query patch ``(row, col)`` (none for the CLS query)."""
    big = enlarge_image(image_rgb, size)
    if query is None:
        return big
    _query_token(layout, query)  # validates the patch
    gh, gw = layout.grid_size
    top, bottom = round(query[0] * size / gh), round((query[0] + 1) * size / gh)
    left, right = round(query[1] * size / gw), round((query[1] + 1) * size / gw)
    big[top:bottom, left:right] = add_border(big[top:bottom, left:right], color, 2)  # frame inside the patch
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


def taught_by(head_map: HeadMap | None, student_block: int) -> dict[int, tuple[int, int]]:
    """``{student_head: (teacher_block, teacher_head)}`` for one student block."""
    if head_map is None:
        return {}
    return {p.student_head: (p.teacher_block, p.teacher_head) for p in head_map.pairs
            if p.student_block == student_block}


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

    Student captions name the teacher head that taught them (``S2.h0 <- taught by T4.h0``),
    teacher captions the student heads they taught; both are ``highlighted`` and framed.
    """
    for role, block, depth in (("teacher", teacher_block, analysis.teacher.depth),
                               ("student", student_block, analysis.student.depth)):
        if not 0 <= block < depth:
            raise ValueError(f"{role} block {block} out of range: the {role} has {depth} blocks")
    t_probs, s_probs = analysis.teacher.attn_probs[teacher_block], analysis.student.attn_probs[student_block]
    if head_fusion is None:
        t_maps = list(cls_attention_maps(t_probs, analysis.layout, query))
        s_maps = list(cls_attention_maps(s_probs, analysis.layout, query))
        taught, taught_heads = teaches(analysis.head_map, teacher_block), taught_by(analysis.head_map, student_block)
        t_caps = [f"T{teacher_block}.h{h}" + ("".join(f" -> S{sb}.h{sh}" for sb, sh in taught[h])
                                               if h in taught else "") for h in range(len(t_maps))]
        s_caps = [f"S{student_block}.h{h}" + (f" <- taught by T{taught_heads[h][0]}.h{taught_heads[h][1]}"
                                               if h in taught_heads else "") for h in range(len(s_maps))]
        t_marks = [h in taught for h in range(len(t_maps))]
        s_marks = [h in taught_heads for h in range(len(s_maps))]
    else:
        t_maps = [fused_map(t_probs, analysis.layout, head_fusion, query)]
        s_maps = [fused_map(s_probs, analysis.layout, head_fusion, query)]
        t_caps, s_caps = [f"T{teacher_block} {head_fusion} of heads"], [f"S{student_block} {head_fusion} of heads"]
        t_marks, s_marks = [False], [False]
    ranges = _ranges(t_maps + s_maps, [0] * len(t_maps) + [1] * len(s_maps), scale)
    big = enlarge_image(analysis.image_rgb, size)
    images = [overlay(big, m, alpha, colormap, lo, hi) for m, (lo, hi) in zip(t_maps + s_maps, ranges, strict=True)]
    tiles = [Tile(add_border(img, HIGHLIGHT) if mark else img, cap, mark)
             for img, cap, mark in zip(images, t_caps + s_caps, t_marks + s_marks, strict=True)]
    return HeadComparison(teacher_block, student_block, tuple(tiles[:len(t_maps)]), tuple(tiles[len(t_maps):]))


def blocks_overview(result: ModelAnalysis, image_rgb: np.ndarray, layout: TokenLayout,
                    query: tuple[int, int] | None = None, alpha: float = 0.6, colormap: str = "inferno",
                    size: int = 64, highlight: set[tuple[int, int]] | frozenset[tuple[int, int]] = frozenset()
                    ) -> np.ndarray:
    """One image: a block x head grid of small overlays (each on its own scale); ``highlight`` (block, head)
    cells get a frame."""
    small = enlarge_image(image_rgb, size)
    tiles = []
    for block in range(result.depth):
        for head, m in enumerate(cls_attention_maps(result.attn_probs[block], layout, query)):
            tile = overlay(small, m, alpha, colormap)
            tiles.append(add_border(tile, HIGHLIGHT, 2) if (block, head) in highlight else tile)
    return tile_images(tiles, result.num_heads, pad=2)


# ----------------------------------------------------------------------------------------------- agreement

def _kl_rows(p: np.ndarray, m: np.ndarray) -> np.ndarray:
    """sum_k p log(p / m) over the last axis, with 0 log 0 = 0 (m > 0 wherever p > 0)."""
    safe_p = np.where(p > 0, p, 1.0)
    safe_m = np.where(m > 0, m, 1.0)
    return np.where(p > 0, p * (np.log(safe_p) - np.log(safe_m)), 0.0).sum(axis=-1)


def head_divergence(student_probs: np.ndarray, teacher_probs: np.ndarray) -> np.ndarray:
    """[Hs, T, T] x [Ht, T, T] -> [Hs, Ht]: Jensen-Shannon divergence (natural log, in [0, ln 2]) between
    each student head's and each teacher head's attention rows, averaged over query rows."""
    s = np.asarray(student_probs, dtype=np.float64)
    t = np.asarray(teacher_probs, dtype=np.float64)
    if s.ndim != 3 or t.ndim != 3 or s.shape[1:] != t.shape[1:]:
        raise ValueError(f"expected [Hs, T, T] and [Ht, T, T] with the same T, got {s.shape} and {t.shape}")
    out = np.empty((s.shape[0], t.shape[0]), dtype=np.float64)
    for i, s_head in enumerate(s):  # one student head at a time keeps memory at [Ht, T, T]
        m = 0.5 * (s_head[None] + t)
        js = 0.5 * _kl_rows(np.broadcast_to(s_head, t.shape), m) + 0.5 * _kl_rows(t, m)
        out[i] = js.mean(axis=-1)
    return np.clip(out, 0.0, np.log(2.0))


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


# ----------------------------------------------------------------------------------------------- export

def _rounded(values: np.ndarray, digits: int = 6) -> Any:
    return np.round(np.asarray(values, dtype=np.float64), digits).tolist()


def _model_record(result: ModelAnalysis, analysis: ImageAnalysis, include_maps: bool) -> dict[str, Any]:
    record: dict[str, Any] = {
        "predicted": result.predicted,
        "predicted_class": analysis.class_names[result.predicted],
        "top_k": [{"index": p.index, "class": p.name, "prob": round(p.prob, 6)} for p in result.top_k],
        "probs": _rounded(result.probs),
    }
    if include_maps:
        record["cls_attention"] = [_rounded(cls_attention_maps(block, analysis.layout)) for block in result.attn_probs]
        record["rollout"] = _rounded(rollout_map(result.rollout, analysis.layout))
    return record


def analysis_to_json(analysis: ImageAnalysis, image_name: str | None = None, include_maps: bool = True) -> str:
    """The numbers of an analysis as JSON: predictions, flag, distilled-pair divergences and (optionally) the
    per-block, per-head CLS-to-patch maps [L][H][gh][gw] and rollout maps [gh][gw]."""
    flag = analysis.flag
    doc = {
        "image": image_name,
        "class_names": list(analysis.class_names),
        "true_label": analysis.true_label,
        "true_class": None if analysis.true_label is None else analysis.class_names[analysis.true_label],
        "agree": flag.agree,
        "status": flag.status,
        "grid": list(analysis.layout.grid_size),
        "num_prefix_tokens": analysis.layout.num_prefix_tokens,
        "rollout": {"head_fusion": analysis.head_fusion, "discard_ratio": analysis.discard_ratio},
        "head_map": None if analysis.head_map is None else analysis.head_map.to_list(),
        "pair_divergence": [dict(r, js=round(r["js"], 6)) for r in pair_divergences(analysis)],
        "teacher": _model_record(analysis.teacher, analysis, include_maps),
        "student": _model_record(analysis.student, analysis, include_maps),
    }
    return json.dumps(doc, indent=1)


CSV_COLUMNS = ("quantity", "model", "block", "head", "teacher_block", "teacher_head", "class_index", "class_name",
               "value")


def analysis_to_csv(analysis: ImageAnalysis) -> str:
    """Long-format CSV: every class probability of both models and every distilled pair's JS divergence."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for result in (analysis.teacher, analysis.student):
        for idx, prob in enumerate(result.probs.tolist()):
            writer.writerow(["probability", result.role, "", "", "", "", idx, analysis.class_names[idx],
                             f"{prob:.6g}"])
    for r in pair_divergences(analysis):
        writer.writerow(["pair_js", "student", r["student_block"], r["student_head"], r["teacher_block"],
                         r["teacher_head"], "", "", f"{r['js']:.6g}"])
    return buf.getvalue()


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
