"""Misclassification finder: run a teacher and a student over a split and sort each image into a group.

A group says who got the image right (teacher only, student only, neither, both); the attention
divergence says how differently the two models look at it: the Jensen-Shannon divergence (bits,
in [0, 1]) between the CLS rows of their attention rollouts, restricted to patch tokens and
renormalised. Restricting to patches makes the divergence well defined for models whose prefix
tokens differ (a DeiT student with a distillation token against a plain teacher). Models whose
patch grids differ are compared on the coarser grid: the finer model's rollout row is resampled
onto it (``vitkd.agreement.patches_on_grid``, area averaging as in ``vitkd.resample``).

Two paths give the same rows: ``scan_data`` reads a split through the decoded-image cache
(``vitkd.data.load_subset``: the cache ``eval`` and training read, only the images a limit keeps,
no train split needed) and runs both models in batches; ``scan_split`` decodes any folder of
images file by file (flat folders with labels, the bundled examples). ``scan_folder`` picks the
cached path whenever the folder is a data root's split, and ``scan_checkpoints`` is what
``python -m vitkd scan`` calls. ``folder_fingerprint`` says when a folder's scan may have changed.
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

from .agreement import js_divergence, patches_on_grid
from .attention import TokenLayout, capture_attention, token_layout
from .checkpoint import load_checkpoint
from .data import (
    ImageTensors,
    SplitSubset,
    check_subset_options,
    evenly_spaced,
    list_image_folder,
    listing_fingerprint,
    load_subset,
    normalize,
    split_class_names,
)
from .decode import IMAGE_EXTENSIONS, open_rgb, resize_center_crop
from .errors import ConfigError, IncompatibleModelsError
from .files import write_text_atomic
from .pairs import coarser_grid, model_img_size, names_preview, norm_stats

__all__ = ["GROUPS", "GROUP_TITLES", "ScanRow", "ScanResult", "list_labelled_images", "scan_split", "scan_data",
           "scan_folder", "scan_checkpoints", "cached_split_of", "split_folders", "folder_fingerprint"]

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
        """One line per image: path, label, both predictions and confidences, group, rollout divergence."""
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(ScanRow.__dataclass_fields__), lineterminator="\n")
        writer.writeheader()
        for record in self.to_records():
            writer.writerow(record)
        return buf.getvalue()

    def write_csv(self, path: str | Path) -> Path:
        """``to_csv`` written atomically to ``path`` (``ConfigError`` naming the path when it cannot be written)."""
        path = Path(path)
        try:
            write_text_atomic(path, self.to_csv())
        except OSError as exc:
            raise ConfigError(f"cannot write the scan's CSV to {path}: {exc.strerror or exc}") from exc
        return path

    def summary(self) -> dict[str, Any]:
        """JSON-able totals: images, skipped files, count per group, both accuracies, mean divergence."""
        n = len(self.rows)
        return {"n": n, "skipped": len(self.skipped), "counts": dict(self.counts),
                "teacher_accuracy": self.teacher_accuracy, "student_accuracy": self.student_accuracy,
                "mean_divergence": sum(r.divergence for r in self.rows) / n if n else None}


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


def _decode_resized(paths: Sequence[Path], sizes: Sequence[int],
                    ) -> tuple[dict[int, torch.Tensor], list[int], list[tuple[str, str]]]:
    """Decode ``paths`` one file at a time (``vitkd.decode``, as training data) and resize each image to
    every size in ``sizes`` before the next file is opened, so one full-resolution image is held at a time.

    Returns ``{size: uint8 [K, 3, size, size]}`` for the K decodable files, their positions in ``paths``,
    and ``(path, reason)`` for the rest.
    """
    arrays: dict[int, list[np.ndarray]] = {size: [] for size in sizes}
    kept, skipped = [], []
    for i, path in enumerate(paths):
        try:
            image = open_rgb(path)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, SyntaxError,
                EOFError) as exc:
            skipped.append((str(path), f"cannot decode: {exc}"))
            continue
        for size, parts in arrays.items():
            parts.append(np.asarray(resize_center_crop(image, size)))
        kept.append(i)
        del image
    tensors = {size: torch.from_numpy(np.stack(parts)).permute(0, 3, 1, 2).contiguous()
               for size, parts in arrays.items() if parts}
    return tensors, kept, skipped


# Attention elements of one captured block ([B, H, T, T]) per forward chunk: 4 MB of float32 (31 images
# for cifar-teacher, 62 for cifar-student), so a chunk's attention maps stay near the CPU caches. On the
# bundled CIFAR-10 pair (bench/scan_speed.py, 1 thread, CPU time) the whole scan cost 1.05x eval + eval
# with this budget, 1.34x with a quarter of it (per-chunk overhead), 1.26x with 4x and 1.92x with 64x.
_BLOCK_ATTENTION_ELEMENTS = 1 << 20


def _chunk_size(model: torch.nn.Module, layout: TokenLayout) -> int:
    return max(1, _BLOCK_ATTENTION_ELEMENTS // (model.blocks[0].attn.num_heads * layout.num_tokens ** 2))


def _cls_rollout_row(attn_probs: Sequence[torch.Tensor], num_prefix_tokens: int) -> torch.Tensor:
    """Row 0 (CLS) of ``attention_rollout(attn_probs)`` over the patch tokens, renormalised: [B, P].

    The rollout is ``R = Â_L ... Â_1`` with ``Â = rownorm(0.5 A + 0.5 I)`` and ``A`` the head mean,
    so its first row is ``e_0ᵀ Â_L ... Â_1``: vector-matrix products from the last block down,
    ``[B, T]`` per block instead of the ``[B, T, T]`` products of the whole rollout.
    """
    row: torch.Tensor | None = None
    for probs in reversed(attn_probs):
        fused = probs.float().mean(dim=1)  # [B, T, T]
        row_sums = 0.5 * fused.sum(dim=-1) + 0.5  # rows of 0.5 A + 0.5 I
        if row is None:
            row = 0.5 * fused[:, 0].clone()
            row[:, 0] += 0.5
            row = row / row_sums[:, :1]
        else:
            scaled = row / row_sums  # row @ diag(1 / sums) @ (0.5 A + 0.5 I)
            row = 0.5 * torch.bmm(scaled[:, None], fused)[:, 0] + 0.5 * scaled
    assert row is not None, "a ViT has at least one block"
    patches = row[:, num_prefix_tokens:]
    return patches / patches.sum(dim=-1, keepdim=True)


def _predict_and_roll(model: torch.nn.Module, images: torch.Tensor, mean: Sequence[float], std: Sequence[float],
                      layout: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax class probabilities [B, C] and the CLS rollout row over patch tokens [B, P] (sums to 1).

    ``images`` is uint8 [B, 3, S, S] on the model's device, normalised here chunk by chunk. Runs under
    ``inference_mode``: the model is only read (safe on shared, cached models).
    """
    probs_parts, row_parts = [], []
    with torch.inference_mode():
        for part in images.split(_chunk_size(model, layout)):
            out = capture_attention(model, normalize(part, tuple(mean), tuple(std)))
            row_parts.append(_cls_rollout_row([out.attn_probs[b] for b in sorted(out.attn_probs)],
                                              layout.num_prefix_tokens).cpu())
            probs_parts.append(out.class_logits.float().softmax(-1).cpu())
    return torch.cat(probs_parts), torch.cat(row_parts)


def _group(label: int, teacher_pred: int, student_pred: int) -> str:
    teacher_right, student_right = teacher_pred == label, student_pred == label
    if teacher_right and not student_right:
        return "teacher_right_student_wrong"
    if student_right and not teacher_right:
        return "student_right_teacher_wrong"
    return "both_right" if teacher_right else "both_wrong"


def _check_models(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
                  student_meta: Mapping[str, Any]) -> tuple[tuple[str, ...], TokenLayout, TokenLayout]:
    """The models' class names and token layouts; ``IncompatibleModelsError`` when they cannot be scanned together.

    Prefix tokens may differ (a DeiT student's distillation token): the divergence compares patch tokens only.
    Patch grids may differ too: the divergence is taken on the coarser one.
    """
    class_names = tuple(str(n) for n in teacher_meta.get("class_names") or ())
    student_classes = tuple(str(n) for n in student_meta.get("class_names") or ())
    if not class_names:
        raise IncompatibleModelsError("the teacher checkpoint records no class names; cannot map labels")
    if student_classes != class_names:
        raise IncompatibleModelsError(f"teacher classes ({', '.join(class_names)}) and student classes "
                                      f"({', '.join(student_classes)}) differ; pick a pair trained on one dataset")
    return class_names, token_layout(teacher), token_layout(student)


def _score(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], t_layout: TokenLayout,
           student: torch.nn.Module, student_meta: Mapping[str, Any], s_layout: TokenLayout,
           images: Mapping[int, torch.Tensor], labels: Sequence[int], paths: Sequence[str],
           class_names: Sequence[str]) -> list[ScanRow]:
    """Rows for one batch: ``images`` maps each model's input size to uint8 [B, 3, S, S] (CPU); the divergence
    is taken on the coarser of the two patch grids."""
    results = []
    for model, meta, layout in ((teacher, teacher_meta, t_layout), (student, student_meta, s_layout)):
        device = next(model.parameters()).device
        mean, std = norm_stats(meta)
        batch = images[model_img_size(model, meta)].to(device)
        results.append(_predict_and_roll(model, batch, mean, std, layout))
    (t_probs, t_rows), (s_probs, s_rows) = results
    t_conf, t_pred = t_probs.max(-1)
    s_conf, s_pred = s_probs.max(-1)
    grid = coarser_grid(t_layout.grid_size, s_layout.grid_size)
    divergence = js_divergence(patches_on_grid(t_rows, t_layout.grid_size, grid),
                               patches_on_grid(s_rows, s_layout.grid_size, grid))
    return [ScanRow(path=path, label=label, label_name=class_names[label],
                    teacher_pred=tp, teacher_pred_name=class_names[tp], teacher_conf=tc,
                    student_pred=sp, student_pred_name=class_names[sp], student_conf=sc,
                    group=_group(label, tp, sp), divergence=js)
            for path, label, tp, tc, sp, sc, js in zip(paths, labels, t_pred.tolist(), t_conf.tolist(),
                                                       s_pred.tolist(), s_conf.tolist(), divergence.tolist(),
                                                       strict=True)]


def _result(rows: list[ScanRow], class_names: tuple[str, ...], skipped: Sequence[tuple[str, str]] = ()) -> ScanResult:
    counts = {g: sum(r.group == g for r in rows) for g in GROUPS}
    return ScanResult(rows=tuple(rows), class_names=class_names, counts=counts, skipped=tuple(skipped))


def scan_split(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
               student_meta: Mapping[str, Any], folder: str | Path, labels: Mapping[str, str | int] | None = None,
               batch_size: int = 256, limit: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Classify every image of ``folder`` with both models, decoding file by file (see ``list_labelled_images``).

    Undecodable files are skipped and listed in ``ScanResult.skipped``. Models are used read-only under
    ``inference_mode`` (safe on shared, cached models). Each model sees the image at its own ``img_size``,
    normalised with its own training mean/std. ``progress`` is called as ``progress(images done, total)``
    after each batch.
    """
    class_names, t_layout, s_layout = _check_models(teacher, teacher_meta, student, student_meta)
    check_subset_options(batch_size, limit)
    items = list_labelled_images(folder, class_names, labels)
    items = [items[i] for i in evenly_spaced(len(items), limit)]
    sizes = sorted({model_img_size(teacher, teacher_meta), model_img_size(student, student_meta)})
    rows: list[ScanRow] = []
    skipped: list[tuple[str, str]] = []
    total = len(items)
    for start in range(0, total, batch_size):
        batch = items[start:start + batch_size]
        images, kept, bad = _decode_resized([p for p, _ in batch], sizes)
        skipped.extend(bad)
        if kept:
            rows.extend(_score(teacher, teacher_meta, t_layout, student, student_meta, s_layout, images,
                               [batch[i][1] for i in kept], [str(batch[i][0]) for i in kept], class_names))
        if progress is not None:
            progress(min(start + batch_size, total), total)
    return _result(rows, class_names, skipped)


def _split_paths(data: ImageTensors) -> list[str]:
    """Each image's file, in the order ``load_split`` decoded them; ``SOURCE:SPLIT/i`` for torchvision datasets.

    Lists the folder as ``vitkd.data`` does (torchvision's ``find_classes`` + ``make_dataset``) and checks
    the listing against the split's labels, so a folder changed since it was decoded is not mislabelled.
    """
    if not data.source.startswith("imagefolder:"):
        return [f"{data.source}:{data.split}/{i}" for i in range(len(data))]
    from torchvision.datasets.folder import find_classes, make_dataset

    root = Path(data.source.split(":", 1)[1]).expanduser()
    names = ("train",) if data.split == "train" else ("test", "val")
    split_dir = next((root / n for n in names if (root / n).is_dir()), None)
    try:
        if split_dir is None:
            raise FileNotFoundError(f"no {' or '.join(names)}/ subfolder")
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot list image folder {root} ({data.split}): {exc}") from exc
    if tuple(classes) != data.class_names or [label for _, label in samples] != data.labels.tolist():
        raise ConfigError(f"{split_dir} changed while it was being scanned ({len(samples)} files now, "
                          f"{len(data)} decoded); run the scan again")
    return [str(Path(path)) for path, _ in samples]


def _check_data_classes(class_names: Sequence[str], data_names: Sequence[str], source: str, split: str) -> None:
    if tuple(class_names) != tuple(data_names):
        raise ConfigError(f"the models predict {names_preview(tuple(class_names))} but {source} {split} has "
                          f"{names_preview(tuple(data_names))}: scan the data the models were trained on")


def _subset_of(data: ImageTensors, limit: int | None) -> SplitSubset:
    """The images ``limit`` keeps of an already loaded split, with their files (``_split_paths``)."""
    positions = evenly_spaced(len(data), limit)
    paths = _split_paths(data)
    picks = torch.tensor(positions, dtype=torch.long)
    return SplitSubset(data.images[picks], data.labels[picks], data.class_names, tuple(positions),
                       tuple(paths[i] for i in positions), data.source, data.split)


def scan_data(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
              student_meta: Mapping[str, Any], data: ImageTensors | str, split: str = "test",
              batch_size: int = 1024, limit: int | None = None, cache_dir: str | Path | None = None,
              progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """Classify every image of a split read from the decoded-image cache: what ``eval`` reads, no PIL per image.

    ``data`` is a loaded split or a ``load_subset`` source (``imagefolder:PATH``, ``cifar10``, ...; then
    ``split`` picks train or test, and only the images ``limit`` keeps are decoded). A model whose
    ``img_size`` is not the loaded size gets the same images loaded at its size. The data's class names
    must be the models', in order. Rows are in the split's file order with the file path of each image;
    ``limit`` keeps evenly spaced images. Each model is normalised with its own training mean/std and
    captured in cache-sized chunks; ``progress(images done, total)`` is called after each batch of
    ``batch_size``.
    """
    class_names, t_layout, s_layout = _check_models(teacher, teacher_meta, student, student_meta)
    check_subset_options(batch_size, limit)
    if isinstance(data, str):
        _check_data_classes(class_names, split_class_names(data, split, cache_dir), data, split)
        source, loaded = data, None
    else:
        _check_data_classes(class_names, data.class_names, data.source, data.split)
        source, split, loaded = data.source, data.split, data
    by_size: dict[int, SplitSubset] = {}
    for size in (model_img_size(teacher, teacher_meta), model_img_size(student, student_meta)):
        if size in by_size:
            continue
        if loaded is not None and loaded.images.shape[-1] == size:
            by_size[size] = _subset_of(loaded, limit)
        else:
            by_size[size] = load_subset(source, split, size, limit, cache_dir, progress=False)
        _check_data_classes(class_names, by_size[size].class_names, source, split)
    first, *others = by_size.values()
    if any(other.paths != first.paths or not torch.equal(other.labels, first.labels) for other in others):
        raise ConfigError(f"{source} {split} changed while it was being scanned; run the scan again")
    labels = first.labels.tolist()
    rows: list[ScanRow] = []
    total = len(first)
    for start in range(0, total, batch_size):
        images = {size: subset.images[start:start + batch_size] for size, subset in by_size.items()}
        rows.extend(_score(teacher, teacher_meta, t_layout, student, student_meta, s_layout, images,
                           labels[start:start + batch_size], first.paths[start:start + batch_size], class_names))
        if progress is not None:
            progress(min(start + batch_size, total), total)
    return _result(rows, class_names)


def cached_split_of(folder: str | Path) -> tuple[str, str] | None:
    """``(source, split)`` when ``load_subset(source, split)`` reads exactly ``folder``, else None.

    That is ``ROOT/train`` (split train), ``ROOT/test``, and ``ROOT/val`` when ``ROOT`` has no ``test``.
    """
    folder = Path(folder)
    root = folder.parent
    if not folder.is_dir() or folder.name not in ("train", "test", "val"):
        return None
    if folder.name == "val" and (root / "test").is_dir():
        return None
    return f"imagefolder:{root}", "train" if folder.name == "train" else "test"


def scan_folder(teacher: torch.nn.Module, teacher_meta: Mapping[str, Any], student: torch.nn.Module,
                student_meta: Mapping[str, Any], folder: str | Path, labels: Mapping[str, str | int] | None = None,
                limit: int | None = None, cache_dir: str | Path | None = None,
                progress: Callable[[int, int], None] | None = None) -> ScanResult:
    """``scan_data`` when ``folder`` is a data root's split whose classes are the models', else ``scan_split``.

    So a data root's split gives the rows ``python -m vitkd scan --data imagefolder:ROOT`` gives. A split
    that cannot be cached (a file the decoder rejects, an unwritable cache) is scanned file by file,
    which lists the files it skipped.
    """
    source = cached_split_of(folder) if labels is None else None
    if source is not None:
        class_names = _check_models(teacher, teacher_meta, student, student_meta)[0]
        try:
            if split_class_names(*source, cache_dir=cache_dir) == class_names:
                return scan_data(teacher, teacher_meta, student, student_meta, source[0], split=source[1],
                                 limit=limit, cache_dir=cache_dir, progress=progress)
        except (ConfigError, OSError):
            pass  # not cacheable as it is: the per-image path reports what is wrong, file by file
    return scan_split(teacher, teacher_meta, student, student_meta, folder, labels=labels, limit=limit,
                      progress=progress)


def folder_fingerprint(folder: str | Path, class_names: Sequence[str],
                       labels: Mapping[str, str | int] | None = None) -> str:
    """Hash of the listing ``scan_folder`` reads for ``folder``: each file's path, label, size and mtime (ns).

    Adding, removing or rewriting an image anywhere the scan looks (nested folders too) changes it, so a
    scan cached under it is never stale; files are listed and stat'ed, never read. The listing is the
    cached path's (``vitkd.data``'s, whose fingerprint keys the decode cache) when ``scan_folder`` takes
    that path, else ``list_labelled_images``'s (raising what the scan would raise).
    """
    folder = Path(folder)
    if labels is None and cached_split_of(folder) is not None:
        try:
            samples, classes = list_image_folder(folder)
        except ConfigError:
            samples, classes = [], []
        if samples and tuple(classes) == tuple(class_names):
            return listing_fingerprint(folder, samples, classes)
    items = list_labelled_images(folder, class_names, labels)
    return listing_fingerprint(folder, [(str(path), label) for path, label in items], list(class_names))


def scan_checkpoints(teacher_path: str | Path, student_path: str | Path, data: str, split: str = "test",
                     limit: int | None = None, batch_size: int = 1024, device: str = "auto",
                     cache_dir: str | Path | None = None) -> ScanResult:
    """``scan_data`` on two checkpoint files (what ``python -m vitkd scan`` runs)."""
    from .train import resolve_device

    dev = resolve_device(device)
    teacher, teacher_meta = load_checkpoint(teacher_path, device=dev)
    student, student_meta = load_checkpoint(student_path, device=dev)
    return scan_data(teacher, teacher_meta, student, student_meta, data, split=split, batch_size=batch_size,
                     limit=limit, cache_dir=cache_dir)


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
