"""Results the app and the CLI share: checkpoint evaluation, per-image and per-dataset analysis."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .checkpoint import load_checkpoint
from .data import load_split
from .train import evaluate, resolve_device

__all__ = ["evaluate_checkpoint"]


def evaluate_checkpoint(path: str | Path, data: str | None = None, split: str = "test", batch_size: int = 512,
                        device: str = "auto", cache_dir: str | None = None) -> dict[str, Any]:
    """Top-1 accuracy of a checkpoint on a split of its own (or the given) data source."""
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    source = data or meta.get("data")
    split_data = load_split(source, split, int(meta.get("img_size") or model.patch_embed.img_size[0]), cache_dir,
                            progress=False)
    # Normalise with the statistics the model was trained with, not the split's.
    split_data = type(split_data)(split_data.images, split_data.labels, split_data.class_names,
                                  tuple(meta.get("mean", split_data.mean)), tuple(meta.get("std", split_data.std)),
                                  split_data.source, split_data.split)
    metrics = evaluate(model, split_data, batch_size, dev)
    return {"checkpoint": str(path), "data": source, "split": split, **metrics}
