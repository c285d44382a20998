"""Accuracy of a checkpoint on a split, refusing data whose classes are not the checkpoint's."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .checkpoint import load_checkpoint
from .data import ImageTensors, load_subset, split_class_names
from .errors import ConfigError
from .pairs import model_img_size, names_preview, norm_stats
from .train import evaluate, resolve_device

__all__ = ["evaluate_checkpoint", "check_data_classes"]


def evaluate_checkpoint(path: str | Path, data: str | None = None, split: str = "test", batch_size: int = 512,
                        device: str = "auto", cache_dir: str | None = None) -> dict[str, Any]:
    """Top-1 accuracy of a checkpoint on a split of its own (or the given) data source.

    Raises ``ConfigError`` before decoding anything when the data's class names (or their order)
    are not the checkpoint's: label i must mean the class the model's output i was trained on.
    """
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    source = check_data_classes(path, model, meta, data, split, cache_dir)
    # The whole split (through the decode cache), never the train split: inputs are normalised as the model
    # was trained (recorded, else norm_stats' fallback), the rule scan, heads and the app use too.
    whole = load_subset(source, split, model_img_size(model, meta), None, cache_dir, progress=False)
    mean, std = norm_stats(meta)
    split_data = ImageTensors(whole.images, whole.labels, whole.class_names, mean, std, source, split)
    metrics = evaluate(model, split_data, batch_size, dev)
    return {"checkpoint": str(path), "data": source, "split": split, **metrics}


def check_data_classes(path: str | Path, model: torch.nn.Module, meta: Mapping[str, Any], data: str | None,
                       split: str, cache_dir: str | None) -> str:
    """The data source to read (``data``, else the one the checkpoint records), once its split's class names
    are the checkpoint's, in order; ``ConfigError`` otherwise (nothing decoded yet)."""
    source = data or meta.get("data")
    if not source:
        raise ConfigError(f"checkpoint {path} records no data source: pass --data")
    data_names = split_class_names(source, split, cache_dir)
    model_names = tuple(str(n) for n in meta.get("class_names") or ())
    mismatch = model_names != data_names if model_names else len(data_names) != int(model.num_classes)
    if mismatch:
        recorded = names_preview(model_names) if model_names else f"{model.num_classes} unnamed classes"
        order = ""
        if sorted(model_names) == sorted(data_names):
            i = next(i for i, (a, b) in enumerate(zip(model_names, data_names, strict=True)) if a != b)
            order = (f" (the same names in another order: class {i} is {model_names[i]!r} in the checkpoint, "
                     f"{data_names[i]!r} in the data)")
        raise ConfigError(f"checkpoint {path} was trained on {recorded} but {source} {split} has "
                          f"{names_preview(data_names)}{order}: use it on the data it was trained on")
    return str(source)
