"""Teacher/student pairs the app can compare head by head, and one checkpoint's summary.

The two models may see the image through different patch grids (teacher 8x8, student 4x4):
each model's maps are drawn on its own grid, and maps are compared (head agreement, the scan's
rollout divergence) on the coarser one, the finer model's maps resampled onto it with
``vitkd.resample``. Prefix tokens must match one to one, except that a DeiT model (a
distillation token after CLS) pairs with a plain ViT: its maps are compared without the
distillation token's row and column (``ModelPair.tokens``, ``restrict_tokens``), as
``vitkd.train`` does when a DeiT student follows a plain teacher.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .attention import TokenLayout, token_layout
from .checkpoint import load_checkpoint
from .errors import ConfigError, IncompatibleModelsError
from .files import file_sha256
from .headmap import HeadMap
from .models import default_norm_stats, describe_model, format_model_overrides, has_distillation_token

__all__ = ["ModelPair", "check_pair", "load_pair", "model_summary", "model_img_size", "norm_stats",
           "names_preview", "coarser_grid", "shared_tokens", "restrict_tokens", "training_recipe", "describe_recipe"]


def model_img_size(model: torch.nn.Module, meta: Mapping[str, Any]) -> int:
    return int(meta.get("img_size") or model.patch_embed.img_size[0])


def _class_names(model: torch.nn.Module, meta: Mapping[str, Any]) -> tuple[str, ...]:
    names = meta.get("class_names")
    if names:
        return tuple(str(n) for n in names)
    return tuple(f"class {i}" for i in range(int(model.num_classes)))


def norm_stats(meta: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The per-channel mean and std (of [0, 1] pixels) a checkpoint's model takes its input normalised with.

    The one rule for every reader: ``eval``, ``scan``, ``heads`` and the app all normalise by it, so they
    report the same accuracy for the same checkpoint. A recorded ``mean``/``std`` is used as it is
    (``vitkd.checkpoint`` has checked it: 3 finite numbers, a positive std). vitkd training always
    records its training split's statistics, so a field that is absent or ``null`` comes from a file
    written some other way (a hand conversion, a timm export), and each missing field falls back to
    what timm itself normalises that model with: for a timm model name, its pretrained config's
    mean/std (what ``timm.data.resolve_data_config`` uses, from-scratch training included:
    0.5 for ``vit_*``, ImageNet's for ``deit_*``, CLIP's for ``eva02_*``); for a vitkd preset (or a
    name timm has no config for), 0.5/0.5 (``vitkd.models.UNRECORDED_NORM``), the mean and std of timm's own
    ViT configs. Not the data's statistics: only training has the training split at hand, while
    ``scan``, ``heads`` and the app work from an image folder, so they could not agree on them.
    """
    mean, std = meta.get("mean"), meta.get("std")
    if mean is None or std is None:
        record = meta.get("model")
        default_mean, default_std = default_norm_stats(record.get("name") if isinstance(record, Mapping) else None)
        mean = default_mean if mean is None else mean
        std = default_std if std is None else std
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _describe_layout(layout: TokenLayout) -> str:
    gh, gw = layout.grid_size
    return (f"a {gh}x{gw} patch grid with {layout.num_prefix_tokens} prefix token(s) "
            f"({layout.num_tokens} tokens)")


def names_preview(names: Sequence[str]) -> str:
    shown = ", ".join(names[:4])
    return f"{len(names)} classes ({shown}{', ...' if len(names) > 4 else ''})"


def shared_tokens(layout: TokenLayout, distillation_token: bool, num_prefix_tokens: int) -> tuple[int, ...]:
    """Indices of a model's tokens (``layout``) kept when maps are compared with ``num_prefix_tokens`` prefix
    tokens: all of them, or all but the distillation token (index 1, after CLS) when the model has one
    that the other model lacks. The patch grid is the model's own."""
    if layout.num_prefix_tokens == num_prefix_tokens:
        return tuple(range(layout.num_tokens))
    if distillation_token and layout.num_prefix_tokens == num_prefix_tokens + 1:
        return (0, *range(2, layout.num_tokens))
    raise IncompatibleModelsError(f"{_describe_layout(layout)} cannot be compared with {num_prefix_tokens} "
                                  "prefix token(s)")


def restrict_tokens(attn: np.ndarray, tokens: Sequence[int]) -> np.ndarray:
    """Attention [..., T, T] restricted to ``tokens`` as queries and keys, rows renormalised to sum to 1:
    [..., len(tokens), len(tokens)], the attention each query gives the kept tokens (a copy, same float dtype)."""
    a = np.asarray(attn)
    if a.ndim < 2 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"expected [..., T, T] attention, got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    index = np.asarray(tokens, dtype=np.int64)
    kept = a[..., index, :][..., index]
    return kept / np.maximum(kept.sum(axis=-1, keepdims=True), np.finfo(kept.dtype).tiny)


@dataclass(frozen=True, eq=False)
class ModelPair:
    """A teacher and a student that can be compared head by head: same input size and classes, prefix
    tokens that match one to one (a DeiT distillation token aside), patch grids of any size.

    ``layout`` is the token layout their maps are compared in: the shared prefix tokens and the
    coarser patch grid (on each axis the fewer cells), so a finer model's maps are resampled onto
    it (``vitkd.agreement.compared_probs``). ``teacher_layout`` and ``student_layout`` are each
    model's own; ``map_layout(role)`` is that model's maps' layout in an analysis (its own grid,
    the shared prefix tokens: ``tokens(role)`` picks those tokens). ``head_map`` is the student's
    recorded map (which teacher heads taught which student head), or None for a baseline student
    or a map that does not fit this teacher (see ``notes``).
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
    teacher_layout: TokenLayout | None = None
    student_layout: TokenLayout | None = None

    def model_layout(self, role: str) -> TokenLayout:
        """The token layout of ``role``'s (``teacher`` or ``student``) own attention maps."""
        own = {"teacher": self.teacher_layout, "student": self.student_layout}
        if role not in own:
            raise ValueError(f"role must be 'teacher' or 'student', got {role!r}")
        return own[role] or self.layout

    def map_layout(self, role: str) -> TokenLayout:
        """``role``'s maps as an analysis holds them: the shared prefix tokens on its own patch grid."""
        return TokenLayout(self.layout.num_prefix_tokens, self.model_layout(role).grid_size)

    def tokens(self, role: str) -> tuple[int, ...]:
        """Indices of ``role``'s tokens that make up ``map_layout(role)`` (``restrict_tokens`` maps its
        attention there)."""
        model = self.teacher if role == "teacher" else self.student
        return shared_tokens(self.model_layout(role), has_distillation_token(model), self.layout.num_prefix_tokens)


def coarser_grid(first: tuple[int, int], second: tuple[int, int]) -> tuple[int, int]:
    """The grid two models' maps are compared on: on each axis the fewer cells (area averaging only)."""
    return min(first[0], second[0]), min(first[1], second[1])


def _compared_layout(teacher_layout: TokenLayout, teacher_deit: bool, student_layout: TokenLayout,
                     student_deit: bool) -> TokenLayout | None:
    """The layout both models' maps can be compared in (shared prefix tokens, the coarser grid), or None
    when their prefix tokens differ in more than a DeiT distillation token the other model lacks."""
    grid = coarser_grid(teacher_layout.grid_size, student_layout.grid_size)
    if teacher_layout.num_prefix_tokens == student_layout.num_prefix_tokens:
        return TokenLayout(teacher_layout.num_prefix_tokens, grid)
    for deit, layout, other_deit, other in ((student_deit, student_layout, teacher_deit, teacher_layout),
                                            (teacher_deit, teacher_layout, student_deit, student_layout)):
        if deit and not other_deit and layout.num_prefix_tokens == other.num_prefix_tokens + 1:
            return TokenLayout(other.num_prefix_tokens, grid)
    return None


def check_pair(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
               student_meta: Mapping[str, Any], teacher_sha256: str | None = None) -> ModelPair:
    """Validate that two models can be compared; raise ``IncompatibleModelsError`` saying what differs.

    Patch grids may differ (both span the same input, so a patch of one covers a known area of the
    other's); input sizes, classes and prefix tokens (a DeiT distillation token aside) may not.
    ``teacher_sha256`` (the teacher file's, ``vitkd.files.file_sha256``) lets a student's head map be
    drawn only against the very teacher file it learned from, when the student recorded one.
    """
    try:
        teacher_layout = token_layout(teacher)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"teacher: {exc}") from exc
    try:
        student_layout = token_layout(student)
    except IncompatibleModelsError as exc:
        raise IncompatibleModelsError(f"student: {exc}") from exc
    layout = _compared_layout(teacher_layout, has_distillation_token(teacher), student_layout,
                              has_distillation_token(student))
    if layout is None:
        raise IncompatibleModelsError(
            f"prefix tokens differ: the teacher has {_describe_layout(teacher_layout)} but the student has "
            f"{_describe_layout(student_layout)}; patch grids may differ, but prefix tokens (CLS, registers) must "
            "match one to one (a DeiT distillation token aside): pick a student with this teacher's prefix tokens")
    teacher_size, student_size = model_img_size(teacher, teacher_meta), model_img_size(student, student_meta)
    if teacher_size != student_size:
        raise IncompatibleModelsError(
            f"input sizes differ: the teacher reads {teacher_size}x{teacher_size} images and the student "
            f"{student_size}x{student_size}; pick models trained at the same resolution")
    teacher_names, student_names = _class_names(teacher, teacher_meta), _class_names(student, student_meta)
    if teacher_names != student_names:
        raise IncompatibleModelsError(
            f"classes differ: the teacher predicts {names_preview(teacher_names)} and the student "
            f"{names_preview(student_names)}; pick two models trained on the same data")
    notes: list[str] = []
    head_map = None
    rows = student_meta.get("head_map")
    other = _other_teacher(teacher, teacher_meta, student_meta, teacher_sha256) if rows else None
    if other:
        notes.append(f"the student was distilled from {other}, not this one; its head map does not "
                     "describe this pair, so distilled pairs are not shown")
        rows = None
    if rows:
        t_desc, s_desc = describe_model(teacher), describe_model(student)
        try:
            head_map = HeadMap.from_list(rows).validate(t_desc["blocks"], t_desc["heads"], s_desc["blocks"],
                                                        s_desc["heads"])
        except ConfigError as exc:
            notes.append(f"the student's head map does not fit this teacher ({exc}); distilled pairs are not shown")
    return ModelPair(teacher, teacher_meta, student, student_meta, layout, teacher_size, teacher_names,
                     head_map, tuple(notes), teacher_layout, student_layout)


def _other_teacher(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student_meta: Mapping[str, Any],
                   teacher_sha256: str | None) -> str | None:
    """The teacher the student learned from, described, when it is not this one (else None).

    A head map names heads of the teacher the student learned from; drawn against another teacher
    (say an SL-ViT one of the same shape, or the same architecture re-trained) its frames would
    claim pairs that never trained together. Architectures are compared from the records; weights
    when the student recorded its teacher file's SHA-256 and the caller knows this one's.
    """
    record = student_meta.get("teacher") or {}
    if record.get("sha256") and teacher_sha256 and record["sha256"] != teacher_sha256:
        return f"another teacher file ({Path(str(record.get('path'))).name}, other weights)"
    recorded = record.get("model")
    built = getattr(teacher, "vitkd_config", None)  # a model built by vitkd, not read from a checkpoint
    actual = teacher_meta.get("model") or (built.to_dict() if built is not None else None)
    if not isinstance(recorded, Mapping) or not isinstance(actual, Mapping):
        return None
    keys = ("name", "num_classes", "img_size", "overrides")
    if all(recorded.get(k) == actual.get(k) for k in keys):
        return None
    overrides = recorded.get("overrides") or {}
    shape = f" ({', '.join(format_model_overrides(overrides))})" if overrides else ""
    return f"a {recorded.get('name')}{shape} teacher"


def load_pair(teacher_path: str | Path, student_path: str | Path, device: str | torch.device = "cpu") -> ModelPair:
    """Load two checkpoints and check they can be compared (``CheckpointError``/``IncompatibleModelsError``)."""
    teacher, teacher_meta = load_checkpoint(teacher_path, device)
    student, student_meta = load_checkpoint(student_path, device)
    return check_pair(teacher, teacher_meta, student, student_meta, file_sha256(teacher_path))


def training_recipe(meta: Mapping[str, Any]) -> dict[str, Any] | None:
    """How a checkpoint was trained, from its ``train_config`` (None when the metadata has none).

    ``distilled`` is False for a model trained on labels alone; the other keys are ``TrainConfig``'s
    (``loss``, ``alpha``, ``head_map``, ``gate``, ``weighting``, ``kd``, ``kd_weight``,
    ``kd_temperature``) with its defaults where an older checkpoint did not record them.
    ``attention`` says whether an attention term was trained (a distilled run with a head map:
    ``TrainConfig`` refuses a head map with alpha 1). ``head_pairs`` is the map as resolved when the
    run started (the checkpoint's ``head_map`` rows), None when not recorded: the typed spec alone
    can mislead, since what ``block:4->2`` expands to has changed with the defaults over time.
    """
    config = meta.get("train_config")
    if not isinstance(config, Mapping):
        return None
    alpha = float(config.get("alpha", 1.0))
    distilled = bool(config.get("teacher"))
    head_map = config.get("head_map") if distilled else None
    rows = meta.get("head_map") if head_map else None
    return {
        "distilled": distilled,
        "attention": distilled and bool(head_map),
        "loss": str(config.get("loss", "kl")),
        "alpha": alpha,
        "head_map": head_map,
        "head_pairs": HeadMap.from_list(rows).describe() if rows else None,
        "gate": str(config.get("gate", "none")),
        "weighting": str(config.get("weighting", "none")),
        "kd": str(config.get("kd", "none")),
        "kd_weight": float(config.get("kd_weight", 0.0)),
        "kd_temperature": float(config.get("kd_temperature", 4.0)),
    }


def describe_recipe(recipe: Mapping[str, Any] | None) -> str:
    """One line: ``labels only``, or the loss terms of a distilled run (attention, gate, weighting, logit KD)."""
    if recipe is None:
        return "not recorded"
    if not recipe["distilled"]:
        return "labels only (cross-entropy)"
    parts = []
    if recipe["attention"]:
        alpha = recipe["alpha"]
        pairs = recipe.get("head_pairs")
        where = f"{pairs} (typed {recipe['head_map']})" if pairs else f"head map {recipe['head_map']}"
        parts.append(f"{recipe['loss'].upper()} attention loss on {where}, "
                     f"alpha {alpha:g} ({alpha:g} CE + {1 - alpha:g} attention)")
        if recipe["gate"] != "none":
            parts.append(f"gate {recipe['gate']}")
        if recipe["weighting"] != "none":
            parts.append(f"weighting {recipe['weighting']}")
    if recipe["kd"] == "deit-hard":
        parts.append("DeiT hard-label distillation (distillation head learns the teacher's argmax)")
    elif recipe["kd_weight"] > 0:
        parts.append(f"logit KD weight {recipe['kd_weight']:g}, temperature {recipe['kd_temperature']:g}")
    return "; ".join(parts) or "distilled (no attention or logit term recorded)"


def model_summary(model: torch.nn.Module, meta: Mapping[str, Any]) -> dict[str, Any]:
    """What a user needs to know about one checkpoint at a glance (JSON-able)."""
    desc = describe_model(model)
    metrics = meta.get("metrics") or {}
    teacher = meta.get("teacher") or {}
    rows = meta.get("head_map")
    recipe = training_recipe(meta)
    return {
        **desc,
        "kind": meta.get("kind", "unknown"),
        "data": meta.get("data"),
        "epoch": meta.get("epoch"),
        "accuracy": metrics.get("accuracy"),
        "class_names": list(_class_names(model, meta)),
        "head_map": HeadMap.from_list(rows).describe() if rows else None,
        "teacher": teacher.get("path"),
        "recipe": recipe,
        "recipe_text": describe_recipe(recipe),
    }
