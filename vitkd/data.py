"""Datasets decoded once into uint8 tensors (cached on disk) and batched tensor augmentation.

The training loop never runs per-image PIL code: a split is a ``[N, 3, H, W]`` uint8 tensor,
batches are index gathers, and augmentation is a few tensor ops on the whole batch, driven
by an explicit ``torch.Generator`` seeded from (seed, epoch) so that resumed runs replay
exactly the same batches. Scans and head rankings read ``load_subset`` instead: only the images
they use, and no train statistics (they normalise with the checkpoint's).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .decode import DECODER_VERSION, IMAGE_EXTENSIONS, open_rgb, resize_center_crop
from .errors import ConfigError
from .files import atomic_target

__all__ = ["ImageTensors", "SplitSubset", "load_split", "load_subset", "split_class_names", "augment_batch",
           "iterate_batches", "normalize", "evenly_spaced", "check_subset_options", "list_image_folder",
           "listing_fingerprint", "source_version",
           "default_cache_dir", "resize_center_crop", "AUGMENT_POLICIES"]

AUGMENT_POLICIES = ("none", "basic", "strong")
# Cache layout version (2: keys see file sizes and mtimes; test caches no longer hold train stats).
_CACHE_VERSION = 2
# Elements per chunk when a whole split goes through a wider dtype (~32 MB of int64 or float).
_CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class ImageTensors:
    """A decoded split: ``images`` uint8 [N, 3, H, W], ``labels`` int64 [N], class names, train mean/std."""

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    source: str
    split: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True)
class SplitSubset:
    """Images of a split at ``positions`` (its file order) with their ``paths``, and no mean/std.

    What a scan or a head ranking reads: they normalise with the checkpoint's statistics, so they
    never need the train split. ``paths`` are ``SOURCE:SPLIT/i`` for torchvision datasets.
    """

    images: torch.Tensor
    labels: torch.Tensor
    class_names: tuple[str, ...]
    positions: tuple[int, ...]
    paths: tuple[str, ...]
    source: str
    split: str

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITKD_CACHE", Path.home() / ".cache" / "vitkd"))


def _chunk_len(images: torch.Tensor) -> int:
    return max(1, _CHUNK_ELEMENTS // max(1, images[0].numel())) if len(images) else 1


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std in [0, 1] of uint8 [N, 3, H, W], rounded to 4 places.

    Sums of values and squares are exact int64, accumulated chunk by chunk (never the whole split at once).
    """
    sums = torch.zeros(3, dtype=torch.int64)
    sq = torch.zeros(3, dtype=torch.int64)
    for chunk in images.split(_chunk_len(images)):
        x = chunk.to(torch.int64)
        sums += x.sum(dim=(0, 2, 3))
        sq += (x * x).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums.double() / n
    std = (sq.double() / n - mean.pow(2)).clamp(min=1e-12).sqrt()
    return tuple(round(float(v) / 255.0, 4) for v in mean), tuple(round(float(v) / 255.0, 4) for v in std)


def _folder_split_dir(root: Path, split: str) -> Path:
    candidates = ["train"] if split == "train" else ["test", "val"]
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f"image folder {root} has no {' or '.join(candidates)}/ subfolder "
                      "(expected ROOT/train/<class>/*.jpg and ROOT/test or ROOT/val)")


def _folder_classes(split_dir: Path) -> list[str]:
    from torchvision.datasets.folder import find_classes

    try:
        return find_classes(str(split_dir))[0]
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot read image folder {split_dir}: {exc}") from exc


def list_image_folder(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` as torchvision's ``ImageFolder`` lists them: (path, class index), sorted classes."""
    from torchvision.datasets.folder import make_dataset

    classes = _folder_classes(split_dir)
    try:
        samples = make_dataset(str(split_dir), {c: i for i, c in enumerate(classes)}, extensions=IMAGE_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot read image folder {split_dir}: {exc}") from exc
    return samples, classes


def listing_fingerprint(split_dir: Path, samples: list[tuple[str, int]], classes: list[str]) -> str:
    """Hash of what the folder holds now: every file's path, label, size and mtime (ns); contents unread."""
    digest = hashlib.sha256(json.dumps([str(split_dir.resolve()), classes]).encode())
    try:
        for path, label in samples:
            st = os.stat(path)
            digest.update(f"{path}\0{label}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    except OSError as exc:
        raise ConfigError(f"cannot read image folder {split_dir}: {exc}") from exc
    return digest.hexdigest()


def _decode_folder(samples: list[tuple[str, int]], size: int, desc: str,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(samples), dtype=np.int64)
    for i, (path, label) in enumerate(tqdm(samples, desc=desc, unit="img", mininterval=1.0, disable=not progress)):
        try:
            images[i] = np.asarray(resize_center_crop(open_rgb(path), size))
        except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
            raise ConfigError(f"cannot decode {path} ({exc}): remove or replace the file") from exc
        labels[i] = label
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _torchvision_dataset(name: str, split: str, cache_dir: Path, download: bool) -> Any:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root = cache_dir / "torchvision"
    try:
        return cls(str(root), train=(split == "train"), download=download)  # md5-checked by torchvision
    except RuntimeError as exc:
        raise ConfigError(f"{name} is not in {root}: pass --download (needs a network) or use "
                          f"imagefolder:PATH ({exc})") from exc


def _load_torchvision(name: str, split: str, cache_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       list[str]]:
    ds = _torchvision_dataset(name, split, cache_dir, download)
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)


def _resize_uint8(images: torch.Tensor, size: int) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 [N, 3, H, W] to ``size``, chunk by chunk."""
    parts = [torch.nn.functional.interpolate(part.float(), size=(size, size), mode="bilinear", antialias=True)
             .round().clamp(0, 255).to(torch.uint8) for part in images.split(_chunk_len(images))]
    return torch.cat(parts)


def _cache_path(cache: Path, source: str, split: str, size: int, fingerprint: str) -> Path:
    """``SLOT-KEY.safetensors``: the slot names (source, split, size), the key what was decoded and how."""
    slot = hashlib.sha256(json.dumps([_CACHE_VERSION, source, split, size]).encode()).hexdigest()[:12]
    key = hashlib.sha256(json.dumps([DECODER_VERSION, fingerprint]).encode()).hexdigest()[:16]
    return cache / f"{slot}-{key}.safetensors"


class _Entry(NamedTuple):
    """Where a split's cache lives, and what to decode on a miss (no samples: a torchvision dataset)."""

    path: Path
    samples: list[tuple[str, int]]
    classes: list[str]
    split_dir: Path | None


def _check_source(source: str, split: str) -> None:
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    if not source.startswith("imagefolder:") and source not in ("cifar10", "cifar100"):
        raise ConfigError(f"unknown data source {source!r}: use cifar10, cifar100 or imagefolder:PATH")


def _folder_split(source: str, split: str) -> Path:
    root = Path(source.split(":", 1)[1]).expanduser()
    if not root.is_dir():
        raise ConfigError(f"image folder {root} does not exist")
    return _folder_split_dir(root, split)


def _cache_entry(source: str, split: str, img_size: int, cache: Path) -> _Entry:
    """The cache file for ``split`` as the data is on disk now (image folders: listed and stat'ed)."""
    if not source.startswith("imagefolder:"):
        # torchvision checks its files' md5 sums, so the name alone pins the content.
        return _Entry(_cache_path(cache, source, split, img_size, source), [], [], None)
    split_dir = _folder_split(source, split)
    samples, classes = list_image_folder(split_dir)
    if not samples:
        raise ConfigError(f"no images found under {split_dir}")
    fingerprint = listing_fingerprint(split_dir, samples, classes)
    return _Entry(_cache_path(cache, source, split, img_size, fingerprint), samples, classes, split_dir)


def source_version(source: str, split: str) -> str:
    """What ``split`` of ``source`` holds now, for keying results computed from it: an image folder's
    ``listing_fingerprint`` (listed and stat'ed, never read); a torchvision dataset's name (its files are
    checked against md5 sums, so the name pins them)."""
    _check_source(source, split)
    if not source.startswith("imagefolder:"):
        return source
    split_dir = _folder_split(source, split)
    return listing_fingerprint(split_dir, *list_image_folder(split_dir))


def _read_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata in a cache file's header (no tensor is read)."""
    with safe_open(str(path), framework="pt") as handle:
        return json.loads(handle.metadata()["meta"])


def _read_cache(path: Path, split: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]] | None:
    """A cached split, or None when absent; a broken file is deleted (rebuilt, never trusted)."""
    if not path.is_file():
        return None
    try:
        tensors = load_file(str(path))
        meta = _read_meta(path)
        if split == "train":
            _stats_from(meta)
        return tensors["images"], tensors["labels"], meta
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None


def _stats_from(meta: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean, std = tuple(float(v) for v in meta["mean"]), tuple(float(v) for v in meta["std"])
    if len(mean) != 3 or len(std) != 3:
        raise ValueError(f"cache holds {len(mean)}/{len(std)} channel statistics, expected 3")
    return mean, std


def _train_stats(source: str, img_size: int, cache: Path, download: bool,
                 progress: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean/std of the train split as it is on disk now: from its current cache's header, else by loading it."""
    path = _cache_entry(source, "train", img_size, cache).path
    try:
        return _stats_from(_read_meta(path))
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        train = load_split(source, "train", img_size, cache, download, progress)
        return train.mean, train.std


def split_class_names(source: str, split: str, cache_dir: str | Path | None = None,
                      download: bool = False) -> tuple[str, ...]:
    """The class names ``load_split`` would give, without decoding (image folders: the subfolder names)."""
    _check_source(source, split)
    if source.startswith("imagefolder:"):
        return tuple(_folder_classes(_folder_split(source, split)))
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return tuple(_torchvision_dataset(source, split, cache, download).classes)


def _load_whole(source: str, split: str, img_size: int, cache: Path, download: bool, progress: bool,
                entry: _Entry) -> tuple[torch.Tensor, torch.Tensor, list[str], dict[str, Any]]:
    """The whole split from its cache entry, decoded and cached on a miss (train: with its mean/std in the header)."""
    cached = _read_cache(entry.path, split)
    if cached is not None:
        images, labels, meta = cached
        classes = list(meta["classes"])
    else:
        if entry.samples:
            images, labels = _decode_folder(entry.samples, img_size, f"decode {entry.split_dir}", progress)
            classes = entry.classes
        else:
            images, labels, classes = _load_torchvision(source, split, cache, download)
            if images.shape[-1] != img_size:
                images = _resize_uint8(images, img_size)
        meta = {"classes": list(classes), "source": source, "split": split}
        if split == "train":  # only train holds stats; a test split reads them from train's current cache
            mean, std = _channel_stats(images)
            meta.update(mean=list(mean), std=list(std))
        cache.mkdir(parents=True, exist_ok=True)
        with atomic_target(entry.path) as tmp:
            save_file({"images": images, "labels": labels}, str(tmp), metadata={"meta": json.dumps(meta)})
        slot = entry.path.name.split("-")[0]
        for stale in entry.path.parent.glob(f"{slot}-*.safetensors"):  # earlier versions of this data
            if stale != entry.path:
                stale.unlink(missing_ok=True)
    return images, labels, classes, meta


def load_split(source: str, split: str, img_size: int, cache_dir: str | Path | None = None,
               download: bool = False, progress: bool = True) -> ImageTensors:
    """Load ``train`` or ``test`` of ``cifar10``, ``cifar100`` or ``imagefolder:PATH`` at ``img_size``.

    The decoded tensor is cached under ``cache_dir``, keyed by source, split, size, decoder version
    and every file's path, size and mtime, so the second load is a file read and any change on
    disk rebuilds it. Mean/std always come from the train split as it is now.
    """
    _check_source(source, split)
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = _cache_entry(source, split, img_size, cache)
    images, labels, classes, meta = _load_whole(source, split, img_size, cache, download, progress, entry)
    if split == "train":
        mean, std = _stats_from(meta)
    else:
        mean, std = _train_stats(source, img_size, cache, download, progress)
    return ImageTensors(images, labels, tuple(classes), mean, std, source, split)


_Rows = tuple[torch.Tensor, torch.Tensor, list[str], list[int]]


def _cached_rows(path: Path, limit: int) -> _Rows | None:
    """The rows ``evenly_spaced`` keeps of a cached split, read row by row (a subset never reads the whole
    tensor); None when there is no cache. A broken file is deleted, as ``_read_cache`` does."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            classes = list(json.loads(handle.metadata()["meta"])["classes"])
            labels = handle.get_tensor("labels")
            positions = evenly_spaced(len(labels), limit)
            if len(positions) == len(labels):
                images = handle.get_tensor("images")
            else:
                stored = handle.get_slice("images")
                images = torch.cat([stored[i:i + 1] for i in positions])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        path.unlink(missing_ok=True)
        return None
    return images, labels[positions], classes, positions


def _decode_subset(source: str, split: str, img_size: int, cache: Path, download: bool, progress: bool,
                   entry: _Entry, limit: int) -> _Rows | None:
    """The rows ``evenly_spaced`` keeps, decoded on their own and never cached (the cache holds whole splits
    only); None when they are the whole split."""
    if entry.samples:
        positions = evenly_spaced(len(entry.samples), limit)
        if len(positions) == len(entry.samples):
            return None
        images, labels = _decode_folder([entry.samples[i] for i in positions], img_size,
                                        f"decode {entry.split_dir}", progress)
        return images, labels, entry.classes, positions
    images, labels, classes = _load_torchvision(source, split, cache, download)  # stored whole: read whole
    positions = evenly_spaced(len(labels), limit)
    if len(positions) == len(labels):
        return None
    picks = torch.tensor(positions, dtype=torch.long)
    images, labels = images[picks], labels[picks]
    if images.shape[-1] != img_size:  # only the kept images are resized
        images = _resize_uint8(images, img_size)
    return images, labels, classes, positions


def load_subset(source: str, split: str, img_size: int, limit: int | None = None,
                cache_dir: str | Path | None = None, download: bool = False, progress: bool = True) -> SplitSubset:
    """The ``evenly_spaced(len(split), limit)`` images of a split (``limit`` None: all), without train statistics.

    Only those images are read: rows of the split's current cache when there is one, else only those
    files are decoded (torchvision: only those images resized), and nothing is cached, so a subset can
    never pass for the whole split. The whole split goes through ``load_split``'s cache, as eval's does.
    Never touches the train split unless ``split`` is train, so a root with only test/ works.
    """
    _check_source(source, split)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be positive, got {limit}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = _cache_entry(source, split, img_size, cache)
    rows = None
    if limit is not None:
        rows = _cached_rows(entry.path, limit)
        if rows is None:
            rows = _decode_subset(source, split, img_size, cache, download, progress, entry, limit)
    if rows is None:
        images, labels, classes, _ = _load_whole(source, split, img_size, cache, download, progress, entry)
        positions = list(range(len(labels)))
    else:
        images, labels, classes, positions = rows
    # The cache key is the listing's fingerprint, so cached rows are these files too.
    paths = ([str(Path(entry.samples[i][0])) for i in positions] if entry.samples
             else [f"{source}:{split}/{i}" for i in positions])
    return SplitSubset(images, labels, tuple(classes), tuple(positions), tuple(paths), source, split)


def check_subset_options(batch_size: int, limit: int | None) -> None:
    """``ConfigError`` unless the batch size and the image limit (None: every image) are positive."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be positive, got {batch_size}")
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be positive, got {limit}")


def evenly_spaced(n: int, limit: int | None) -> list[int]:
    """Positions kept by ``limit`` of ``n``: evenly spaced over the sorted list, so every class folder is covered."""
    if limit is None or limit >= n:
        return list(range(n))
    step = n / limit
    return [int(i * step) for i in range(limit)]


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 [B, 3, H, W] (or float in [0, 255]) to normalised float32."""
    m = torch.tensor(mean, device=images.device).view(1, 3, 1, 1) * 255.0
    s = torch.tensor(std, device=images.device).view(1, 3, 1, 1) * 255.0
    return (images.float() - m) / s


def augment_batch(images: torch.Tensor, generator: torch.Generator, policy: str = "basic",
                  padding: int = 4) -> torch.Tensor:
    """Random crop with zero padding + horizontal flip on a uint8 batch; ``strong`` adds cutout.

    Every random draw comes from ``generator`` (CPU), so a batch is a pure function of its seed.
    """
    if policy not in AUGMENT_POLICIES:
        raise ConfigError(f"unknown augmentation {policy!r}: use one of {', '.join(AUGMENT_POLICIES)}")
    if policy == "none":
        return images
    B, C, H, W = images.shape
    pad = max(1, round(padding * H / 32))
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(images.device)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=generator).to(images.device)
    flip = (torch.rand(B, generator=generator) < 0.5).to(images.device)
    rows = oy[:, None] + torch.arange(H, device=images.device)[None]
    cols = ox[:, None] + torch.arange(W, device=images.device)[None]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    b = torch.arange(B, device=images.device)[:, None, None, None]
    c = torch.arange(C, device=images.device)[None, :, None, None]
    out = padded[b, c, rows[:, None, :, None], cols[:, None, None, :]]
    if policy == "strong":
        size = H // 4
        cy = torch.randint(0, H, (B,), generator=generator).to(images.device)
        cx = torch.randint(0, W, (B,), generator=generator).to(images.device)
        ys = torch.arange(H, device=images.device)[None, :, None]
        xs = torch.arange(W, device=images.device)[None, None, :]
        hole = ((ys - cy[:, None, None]).abs() <= size // 2) & ((xs - cx[:, None, None]).abs() <= size // 2)
        out = out.masked_fill(hole[:, None], 0)
    return out


def iterate_batches(data: ImageTensors, batch_size: int, *, train: bool, seed: int = 0, epoch: int = 0,
                    augment: str = "basic", rank: int = 0, world_size: int = 1,
                    device: str | torch.device = "cpu", drop_last: bool | None = None,
                    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalised float batches ``(images [B, 3, H, W], labels [B])`` for one epoch.

    Training batches are shuffled and augmented from a generator seeded by (seed, epoch);
    with ``world_size > 1`` each rank takes an equal, disjoint share of the permutation and
    draws its augmentation from its own generator, seeded by (seed, epoch, rank).
    """
    n = len(data)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size if train else -(-n // world_size)
        order = order[rank::world_size][:per_rank]
        generator = torch.Generator().manual_seed((seed * 100_003 + epoch) * 1_009 + rank + 1)
    drop_last = train if drop_last is None else drop_last
    stop = len(order) - (len(order) % batch_size if drop_last and len(order) >= batch_size else 0)
    for start in range(0, stop, batch_size):
        idx = order[start:start + batch_size]
        images = data.images[idx]
        if train:
            images = augment_batch(images, generator, augment)
        yield normalize(images.to(device, non_blocking=True), data.mean, data.std), data.labels[idx].to(device)


def num_batches(n: int, batch_size: int, train: bool, world_size: int = 1) -> int:
    per_rank = n // world_size if train else -(-n // world_size)
    return per_rank // batch_size if train and per_rank >= batch_size else -(-per_rank // batch_size)
