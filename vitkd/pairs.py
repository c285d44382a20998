"""Teacher/student pairs the app can compare head by head, and one checkpoint's summary."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .attention import TokenLayout, token_layout
from .checkpoint import load_checkpoint
from .errors import ConfigError, IncompatibleModelsError
from .headmap import HeadMap
from .models import describe_model

__all__ = ["ModelPair", "check_pair", "load_pair", "model_summary", "model_img_size", "norm_stats", "names_preview"]


def model_img_size(model: torch.nn.Module, meta: Mapping[str, Any]) -> int:
    return int(meta.get("img_size") or model.patch_embed.img_size[0])


def _class_names(model: torch.nn.Module, meta: Mapping[str, Any]) -> tuple[str, ...]:
    names = meta.get("class_names")
    if names:
        return tuple(str(n) for n in names)
    return tuple(f"class {i}" for i in range(int(model.num_classes)))


def norm_stats(meta: Mapping[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    # vitkd checkpoints always record these; 0.5 is timm's default for ViTs without them.
    return tuple(meta.get("mean") or (0.5, 0.5, 0.5)), tuple(meta.get("std") or (0.5, 0.5, 0.5))


def _describe_layout(layout: TokenLayout) -> str:
    gh, gw = layout.grid_size
    return (f"a {gh}x{gw} patch grid with {layout.num_prefix_tokens} prefix token(s) "
            f"({layout.num_tokens} tokens)")


def names_preview(names: Sequence[str]) -> str:
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
