"""Which heads matter: how much a model loses on a split when one attention head is switched off.

Head-specific distillation asks the user to choose teacher heads; this ranks them. For every
block and head, the head's output is zeroed before the block's output projection (Michel et al.
2019, "Are Sixteen Heads Really Better than One?") and the split is classified again: the drop in
top-1 accuracy and the rise in cross-entropy say how much the model relies on that head. Rank on
training (or validation) images: choosing distillation heads on the test split would choose on test.

Cost: ``blocks x heads + 1`` forward passes over the images.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .attention import capture_attention, check_supported
from .checkpoint import load_checkpoint
from .data import ImageTensors, check_subset_options, evenly_spaced, load_split, normalize
from .errors import ConfigError, IncompatibleModelsError
from .evaluation import check_data_classes
from .pairs import model_img_size, norm_stats
from .train import resolve_device

__all__ = ["HeadImportance", "head_importance", "head_importance_checkpoint"]


@dataclass(frozen=True)
class HeadImportance:
    """``accuracy`` (%) and mean ``loss`` (cross-entropy) of the whole model on ``n`` images, and the same
    with each head switched off: ``masked_accuracy`` and ``masked_loss`` [blocks, heads]."""

    accuracy: float
    loss: float
    masked_accuracy: np.ndarray
    masked_loss: np.ndarray
    n: int

    @property
    def accuracy_drop(self) -> np.ndarray:
        """Percentage points lost per head switched off [blocks, heads] (negative: the model gains)."""
        return self.accuracy - self.masked_accuracy

    @property
    def loss_increase(self) -> np.ndarray:
        return self.masked_loss - self.loss

    def ranking(self) -> list[tuple[int, int]]:
        """(block, head) from the most to the least important, by loss increase (finer than accuracy on few images)."""
        order = np.argsort(-self.loss_increase, axis=None, kind="stable")
        heads = self.loss_increase.shape[1]
        return [(int(i) // heads, int(i) % heads) for i in order]

    def to_text(self, top: int = 8) -> str:
        """Accuracy drop per block (rows) and head (columns), then the ``top`` heads by loss increase."""
        lines = [f"{self.n} images: {self.accuracy:.2f}% top-1, loss {self.loss:.4f} with every head on.",
                 "Top-1 points lost with one head switched off (rows: blocks, columns: heads):",
                 "block " + "".join(f"{f'h{h}':>7}" for h in range(self.accuracy_drop.shape[1]))]
        for block, row in enumerate(self.accuracy_drop):
            lines.append(f"{block:>5} " + "".join(f"{v:7.2f}" for v in row))
        ranked = self.ranking()[:top]
        lines.append("Most important (loss increase): " + ", ".join(
            f"{b}.{h} (+{self.loss_increase[b, h]:.4f})" for b, h in ranked))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "loss": self.loss,
                "accuracy_drop": self.accuracy_drop.round(4).tolist(),
                "loss_increase": self.loss_increase.round(6).tolist(),
                "ranking": [list(bh) for bh in self.ranking()]}


def _score(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
           head_mask: dict[int, torch.Tensor] | None, device: torch.device) -> tuple[float, float]:
    """(accuracy %, mean cross-entropy) of ``model`` with ``head_mask`` on normalised ``images``."""
    correct, loss_sum = 0, 0.0
    for start in range(0, images.shape[0], batch_size):
        batch = images[start:start + batch_size].to(device)
        target = labels[start:start + batch_size].to(device)
        logits = capture_attention(model, batch, blocks=(), head_mask=head_mask).class_logits.float()
        correct += int((logits.argmax(-1) == target).sum())
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
    n = images.shape[0]
    return 100.0 * correct / n, loss_sum / n


@torch.no_grad()
def head_importance(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                    progress: Callable[[int, int], None] | None = None) -> HeadImportance:
    """Switch each head of ``model`` off in turn over normalised ``images`` [N, 3, H, W] with ``labels`` [N].

    ``progress(done, total)`` is called after each of the ``blocks x heads + 1`` passes. The model must be in
    eval mode (dropout would blur the ranking); it is only read, so a shared model may be ranked.
    """
    vit = check_supported(model)
    if model.training:
        raise ValueError("rank heads of a model in eval mode (call model.eval()): dropout would blur the ranking")
    if images.shape[0] == 0 or images.shape[0] != labels.shape[0]:
        raise ConfigError(f"need as many labels as images, at least one: got {images.shape[0]} and {labels.shape[0]}")
    device = next(model.parameters()).device
    heads = [blk.attn.num_heads for blk in vit.blocks]
    if len(set(heads)) != 1:
        raise IncompatibleModelsError(f"cannot rank heads of blocks with different head counts {heads}")
    depth, num_heads = len(heads), heads[0]
    total = depth * num_heads + 1
    accuracy, loss = _score(model, images, labels, batch_size, None, device)
    if progress is not None:
        progress(1, total)
    masked_acc = np.zeros((depth, num_heads))
    masked_loss = np.zeros((depth, num_heads))
    for block in range(depth):
        for head in range(num_heads):
            mask = torch.ones(num_heads, device=device)
            mask[head] = 0.0
            masked_acc[block, head], masked_loss[block, head] = _score(
                model, images, labels, batch_size, {block: mask}, device)
            if progress is not None:
                progress(2 + block * num_heads + head, total)
    return HeadImportance(accuracy, loss, masked_acc, masked_loss, int(images.shape[0]))


def _split_images(split: ImageTensors, meta: Mapping[str, Any], limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    picks = torch.tensor(evenly_spaced(len(split), limit), dtype=torch.long)
    mean, std = norm_stats(meta)  # the statistics the model was trained with, not the split's
    return normalize(split.images[picks], mean, std), split.labels[picks]


def head_importance_checkpoint(path: str | Path, data: str | None = None, split: str = "train",
                               limit: int | None = 1000, batch_size: int = 256, device: str = "auto",
                               cache_dir: str | None = None,
                               progress: Callable[[int, int], None] | None = None) -> HeadImportance:
    """``head_importance`` of a checkpoint on ``limit`` evenly spaced images of a split of its data.

    The data's classes must be the checkpoint's (``ConfigError`` before any image is decoded).
    """
    check_subset_options(batch_size, limit)
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    source = check_data_classes(path, model, meta, data, split, cache_dir)
    loaded = load_split(source, split, model_img_size(model, meta), cache_dir, progress=False)
    images, labels = _split_images(loaded, meta, limit)
    return head_importance(model, images, labels, batch_size, progress)
