"""Datasets decoded once into uint8 tensors (cached on disk) and batched tensor augmentation.

The training loop never runs per-image PIL code: a split is a ``[N, 3, H, W]`` uint8 tensor,
batches are index gathers, and augmentation is a few tensor ops on the whole batch, driven
by an explicit ``torch.Generator`` seeded from (seed, epoch) so that resumed runs replay
exactly the same batches.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .errors import ConfigError
from .files import atomic_target

__all__ = ["ImageTensors", "load_split", "augment_batch", "iterate_batches", "normalize", "default_cache_dir",
           "resize_center_crop", "AUGMENT_POLICIES"]

AUGMENT_POLICIES = ("none", "basic", "strong")
_CACHE_VERSION = 1


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


def default_cache_dir() -> Path:
    return Path(os.environ.get("VITKD_CACHE", Path.home() / ".cache" / "vitkd"))


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to ``size`` x ``size``."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    sums = torch.zeros(3, dtype=torch.float64)
    sq = torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(4096):
        x = chunk.to(torch.float64) / 255.0
        sums += x.sum(dim=(0, 2, 3))
        sq += x.pow(2).sum(dim=(0, 2, 3))
    n = images.shape[0] * images.shape[2] * images.shape[3]
    mean = sums / n
    std = (sq / n - mean.pow(2)).clamp(min=1e-12).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def _folder_split_dir(root: Path, split: str) -> Path:
    candidates = ["train"] if split == "train" else ["test", "val"]
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise ConfigError(f"image folder {root} has no {' or '.join(candidates)}/ subfolder "
                      "(expected ROOT/train/<class>/*.jpg and ROOT/test or ROOT/val)")


def _list_folder(split_dir: Path) -> tuple[list[tuple[str, int]], list[str]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

    try:
        classes, class_to_idx = find_classes(str(split_dir))
        samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS)
    except (FileNotFoundError, OSError) as exc:
        raise ConfigError(f"cannot read image folder {split_dir}: {exc}") from exc
    return samples, classes


def _decode_folder(samples: list[tuple[str, int]], size: int, desc: str,
                   progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    images = np.empty((len(samples), size, size, 3), dtype=np.uint8)
    labels = np.empty(len(samples), dtype=np.int64)
    for i, (path, label) in enumerate(tqdm(samples, desc=desc, unit="img", mininterval=1.0, disable=not progress)):
        with Image.open(path) as img:
            images[i] = np.asarray(resize_center_crop(img.convert("RGB"), size))
        labels[i] = label
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels)


def _load_torchvision(name: str, split: str, cache_dir: Path, download: bool) -> tuple[torch.Tensor, torch.Tensor,
                                                                                       list[str]]:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root = cache_dir / "torchvision"
    try:
        ds = cls(str(root), train=(split == "train"), download=download)
    except RuntimeError as exc:
        raise ConfigError(f"{name} is not in {root}: pass --download (needs a network) or use "
                          f"imagefolder:PATH ({exc})") from exc
    images = torch.from_numpy(np.asarray(ds.data)).permute(0, 3, 1, 2).contiguous()
    return images, torch.as_tensor(ds.targets, dtype=torch.int64), list(ds.classes)


def _cache_key(source: str, split: str, size: int, fingerprint: str) -> str:
    raw = json.dumps([_CACHE_VERSION, source, split, size, fingerprint])
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def load_split(source: str, split: str, img_size: int, cache_dir: str | Path | None = None,
               download: bool = False, progress: bool = True) -> ImageTensors:
    """Load ``train`` or ``test`` of ``cifar10``, ``cifar100`` or ``imagefolder:PATH`` at ``img_size``.

    The decoded tensor is cached under ``cache_dir`` keyed by source, split, size and the file
    list, so the second load is a file read. Mean/std always come from the train split.
    """
    if split not in ("train", "test"):
        raise ConfigError(f"split must be 'train' or 'test', got {split!r}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if source.startswith("imagefolder:"):
        root = Path(source.split(":", 1)[1]).expanduser()
        if not root.is_dir():
            raise ConfigError(f"image folder {root} does not exist")
        split_dir = _folder_split_dir(root, split)
        samples, classes = _list_folder(split_dir)
        if not samples:
            raise ConfigError(f"no images found under {split_dir}")
        fingerprint = hashlib.sha256("\n".join(f"{p}:{lbl}" for p, lbl in samples).encode()).hexdigest()
        fingerprint += f":{str(root.resolve())}"
    elif source in ("cifar10", "cifar100"):
        samples, classes, fingerprint = [], [], source
    else:
        raise ConfigError(f"unknown data source {source!r}: use cifar10, cifar100 or imagefolder:PATH")

    path = cache / f"{_cache_key(source, split, img_size, fingerprint)}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), framework="pt") as handle:
                meta = json.loads(handle.metadata()["meta"])
            return ImageTensors(tensors["images"], tensors["labels"], tuple(meta["classes"]), tuple(meta["mean"]),
                                tuple(meta["std"]), source, split)
        except (SafetensorError, OSError, KeyError, ValueError):
            path.unlink(missing_ok=True)  # a broken cache is rebuilt, never trusted

    if samples:
        images, labels = _decode_folder(samples, img_size, f"decode {split_dir}", progress)
    else:
        images, labels, classes = _load_torchvision(source, split, cache, download)
        if images.shape[-1] != img_size:
            images = torch.nn.functional.interpolate(images.float(), size=(img_size, img_size), mode="bilinear",
                                                     antialias=True).round().clamp(0, 255).to(torch.uint8)
    if split == "train":
        mean, std = _channel_stats(images)
    else:
        train = load_split(source, "train", img_size, cache, download, progress)
        mean, std = train.mean, train.std
    meta = {"classes": list(classes), "mean": list(mean), "std": list(std), "source": source, "split": split}
    cache.mkdir(parents=True, exist_ok=True)
    with atomic_target(path) as tmp:
        save_file({"images": images, "labels": labels}, str(tmp), metadata={"meta": json.dumps(meta)})
    return ImageTensors(images, labels, tuple(classes), tuple(mean), tuple(std), source, split)


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
    with ``world_size > 1`` each rank takes an equal, disjoint share of the permutation.
    """
    n = len(data)
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=generator) if train else torch.arange(n)
    if world_size > 1:
        per_rank = n // world_size if train else -(-n // world_size)
        order = order[rank::world_size][:per_rank]
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
