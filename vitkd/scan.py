"""Misclassification finder: run a teacher and a student over an image folder and sort each image into a group.

A group says who got the image right (teacher only, student only, neither, both); the attention
divergence says how differently the two models look at it: the Jensen-Shannon divergence (bits,
in [0, 1]) between the CLS rows of their attention rollouts, restricted to patch tokens and
renormalised. Images are decoded batch by batch, so a limit keeps a large split cheap.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .agreement import js_divergence
from .attention import capture_attention, token_layout
from .data import normalize
from .decode import IMAGE_EXTENSIONS, open_rgb, resize_center_crop
from .errors import ConfigError, IncompatibleModelsError
from .rollout import attention_rollout

__all__ = ["GROUPS", "GROUP_TITLES", "ScanRow", "ScanResult", "list_labelled_images", "scan_split",
           "split_folders"]

GROUPS: tuple[str, ...] = ("teacher_right_student_wrong", "student_right_teacher_wrong", "both_wrong", "both_right")
GROUP_TITLES: Mapping[str, str] = {
    "teacher_right_student_wrong": "Teacher right, student wrong",
    "student_right_teacher_wrong": "Student right, teacher wrong",
    "both_wrong": "Both wrong",
    "both_right": "Both right",
}


@dataclass(frozen=True)
class ScanRow:
    """One image: its true class, each model's top-1 class and probability, its group and divergence."""

    path: str
    label: int
    label_name: str
    teacher_pred: int
    teacher_pred_name: str
    teacher_conf: float
    student_pred: int
    student_pred_name: str
    student_conf: float
    group: str
    divergence: float


@dataclass(frozen=True)
class ScanResult:
    """All scanned images in file order, the count per group and the files that could not be decoded."""

    rows: tuple[ScanRow, ...]
    class_names: tuple[str, ...]
    counts: dict[str, int]
    skipped: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def group(self, name: str) -> list[ScanRow]:
        """The rows of one group, most divergent first (where the two models disagree most)."""
        if name not in GROUPS:
            raise ConfigError(f"unknown group {name!r}: use one of {', '.join(GROUPS)}")
        return sorted((r for r in self.rows if r.group == name), key=lambda r: r.divergence, reverse=True)

    @property
    def teacher_accuracy(self) -> float:
        return 100.0 * sum(r.teacher_pred == r.label for r in self.rows) / max(1, len(self.rows))

    @property
    def student_accuracy(self) -> float:
        return 100.0 * sum(r.student_pred == r.label for r in self.rows) / max(1, len(self.rows))

    def to_records(self) -> list[dict[str, Any]]:
        return [dict(r.__dict__) for r in self.rows]

    def to_csv(self) -> str:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ScanRow.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        for record in self.to_records():
            writer.writerow(record)
        return buf.getvalue()


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS


def _class_index(name: str | int, class_names: Sequence[str], where: str) -> int:
    if isinstance(name, int) and not isinstance(name, bool):
        if not 0 <= name < len(class_names):
            raise ConfigError(f"{where}: label {name} out of range for {len(class_names)} classes")
        return name
    try:
        return list(class_names).index(str(name))
    except ValueError:
        raise ConfigError(f"{where}: class {name!r} is not one of the models' classes "
                          f"({', '.join(class_names)})") from None


def list_labelled_images(folder: str | Path, class_names: Sequence[str],
                         labels: Mapping[str, str | int] | None = None) -> list[tuple[Path, int]]:
    """``[(path, class index)]`` in sorted order, labels mapped to ``class_names`` by name.

    Without ``labels`` the folder holds one subfolder per class (``folder/<class>/*.png``) and
    every subfolder must name a class of the models; with ``labels`` (file name -> class name
    or index) the folder is flat and images missing from ``labels`` are left out.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"image folder {folder} does not exist")
    if labels is not None:
        items = []
        for path in sorted(p for p in folder.iterdir() if _is_image(p)):
            if path.name in labels:
                items.append((path, _class_index(labels[path.name], class_names, f"{folder} ({path.name})")))
        if not items:
            raise ConfigError(f"no labelled images in {folder}: the labels name none of its image files")
        return items
    subdirs = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise ConfigError(f"{folder} has no class subfolders (expected {folder}/<class name>/*.jpg)")
    unknown = [d.name for d in subdirs if d.name not in class_names]
    if unknown:
        raise ConfigError(f"class folders {unknown} in {folder} are not classes of the selected models "
                          f"({', '.join(class_names)}); pick a split of the data the models were trained on")
    items = [(path, list(class_names).index(d.name)) for d in subdirs
             for path in sorted(p for p in d.rglob("*") if _is_image(p))]
    if not items:
        raise ConfigError(f"no images found under {folder}")
    return items


def _open_rgb(paths: Sequence[Path]) -> tuple[list[Image.Image], list[int], list[tuple[str, str]]]:
    """The decodable images as RGB (``vitkd.decode``, as training data), their positions in ``paths``,
    and ``(path, reason)`` for the rest."""
    images, kept, skipped = [], [], []
    for i, path in enumerate(paths):
        try:
            images.append(open_rgb(path))
            kept.append(i)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError,
                EOFError) as exc:
            skipped.append((str(path), f"cannot decode: {exc}"))
    return images, kept, skipped


def _to_uint8(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """uint8 [N, 3, size, size], resized and centre-cropped the way training data is."""
    arrays = np.stack([np.asarray(resize_center_crop(img, size)) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


def _img_size(model: torch.nn.Module, meta: Mapping[str, Any]) -> int:
    return int(meta.get("img_size") or model.patch_embed.img_size[0])


# Upper bound on attention elements held at once (logits + probs of every block), ~1 GB in float32.
_ATTENTION_BUDGET = 256 * 1024 * 1024


@torch.no_grad()
def _predict_and_roll(model: torch.nn.Module, images: torch.Tensor, num_prefix_tokens: int,
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax class probabilities [B, C] and the CLS rollout row over patch tokens [B, P] (sums to 1).

    Capturing every block keeps [B, H, T, T] twice per block, so large models run in sub-batches.
    """
    layout = token_layout(model)
    per_image = 2 * len(model.blocks) * model.blocks[0].attn.num_heads * layout.num_tokens ** 2
    chunk = max(1, _ATTENTION_BUDGET // per_image)
    probs_parts, row_parts = [], []
    for part in images.split(chunk):
        out = capture_attention(model, part)
        rollout = attention_rollout([out.attn_probs[b] for b in sorted(out.attn_probs)])
        cls_row = rollout[:, 0, num_prefix_tokens:]
        row_parts.append((cls_row / cls_row.sum(-1, keepdim=True)).cpu())
        probs_parts.append(out.class_logits.float().softmax(-1).cpu())
    return torch.cat(probs_parts), torch.cat(row_parts)


def _group(label: int, teacher_pred: int, student_pred: int) -> str:
    teacher_right, student_right = teacher_pred == label, student_pred == label
    if teacher_right and not student_right:
        return "teacher_right_student_wrong"
    if student_right and not teacher_right:
        return "student_right_teacher_wrong"
    return "both_right" if teacher_right else "both_wrong"


def scan_split(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
               student_meta: Mapping[str, Any], folder: str | Path, labels: Mapping[str, str | int] | None = None,
               batch_size: int = 256, limit: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Classify every image of ``folder`` with both models; see ``list_labelled_images`` for the layout.

    Models are used read-only under ``no_grad`` (safe on shared, cached models). Each model sees
    the image at its own ``img_size``, normalised with its own training mean/std. ``progress``
    is called as ``progress(images done, total)`` after each batch.
    """
    class_names = tuple(teacher_meta.get("class_names") or ())
    student_classes = tuple(student_meta.get("class_names") or ())
    if not class_names:
        raise IncompatibleModelsError("the teacher checkpoint records no class names; cannot map labels")
    if student_classes != class_names:
        raise IncompatibleModelsError(f"teacher classes ({', '.join(class_names)}) and student classes "
                                      f"({', '.join(student_classes)}) differ; pick a pair trained on one dataset")
    t_layout, s_layout = token_layout(teacher), token_layout(student)
    if t_layout != s_layout:
        raise IncompatibleModelsError(f"teacher tokens {t_layout} and student tokens {s_layout} differ; attention "
                                      "divergence needs the same patch grid and prefix tokens")
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be positive, got {limit}")
    items = list_labelled_images(folder, class_names, labels)
    if limit is not None and limit < len(items):
        # Evenly spaced over the sorted list, so a limited scan still covers every class folder.
        step = len(items) / limit
        items = [items[int(i * step)] for i in range(limit)]

    models = {"teacher": (teacher, teacher_meta), "student": (student, student_meta)}
    rows: list[ScanRow] = []
    skipped: list[tuple[str, str]] = []
    total = len(items)
    for start in range(0, total, batch_size):
        batch = items[start:start + batch_size]
        paths = [p for p, _ in batch]
        pil_images, kept, bad = _open_rgb(paths)
        skipped.extend(bad)
        if kept:
            results = {}
            for side, (model, meta) in models.items():
                device = next(model.parameters()).device
                uint8 = _to_uint8(pil_images, _img_size(model, meta)).to(device)
                images = normalize(uint8, tuple(meta["mean"]), tuple(meta["std"]))
                results[side] = _predict_and_roll(model, images, t_layout.num_prefix_tokens)
            t_conf, t_pred = results["teacher"][0].max(-1)
            s_conf, s_pred = results["student"][0].max(-1)
            divergence = js_divergence(results["teacher"][1], results["student"][1])
            for j, i in enumerate(kept):
                label = batch[i][1]
                tp, sp = int(t_pred[j]), int(s_pred[j])
                rows.append(ScanRow(
                    path=str(paths[i]), label=label, label_name=class_names[label],
                    teacher_pred=tp, teacher_pred_name=class_names[tp], teacher_conf=float(t_conf[j]),
                    student_pred=sp, student_pred_name=class_names[sp], student_conf=float(s_conf[j]),
                    group=_group(label, tp, sp), divergence=float(divergence[j])))
        if progress is not None:
            progress(min(start + batch_size, total), total)
    counts = {g: sum(r.group == g for r in rows) for g in GROUPS}
    return ScanResult(rows=tuple(rows), class_names=class_names, counts=counts, skipped=tuple(skipped))


def split_folders(root: str | Path) -> list[Path]:
    """The scannable folders of a data root: its ``train``/``test``/``val`` subfolders, else the root itself.

    A root without those subfolders counts when it holds class subfolders (``root/<class>/*.jpg``).
    """
    root = Path(root)
    if not root.is_dir():
        return []
    splits = [root / name for name in ("test", "val", "train") if (root / name).is_dir()]
    if splits:
        return splits
    return [root] if any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()) else []
