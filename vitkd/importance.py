"""Which heads matter: how much a model loses on a split when one attention head is switched off.

Head-specific distillation asks the user to choose teacher heads; this ranks them. For every
block and head, the head's output is zeroed before the block's output projection (Michel et al.
2019, "Are Sixteen Heads Really Better than One?") and the split is classified again: the drop in
top-1 accuracy and the rise in cross-entropy say how much the model relies on that head. Rank on
training (or validation) images: choosing distillation heads on the test split would choose on test.

Cost: about ``blocks x heads / 2 + 1`` forward passes over the images (the blocks before a masked
block run once for all its heads).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .attention import capture_attention, check_supported, head_masked_logits
from .checkpoint import load_checkpoint
from .data import check_subset_options, load_subset, normalize
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


def _tally(logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Correct predictions and summed cross-entropy over the last-but-one axis of ``logits`` [..., B, C]."""
    logits = logits.float()
    target = target.expand(logits.shape[:-1])
    losses = F.cross_entropy(logits.movedim(-1, 1), target, reduction="none")  # classes on axis 1, as torch wants
    return (logits.argmax(-1) == target).sum(-1), losses.sum(-1)


@torch.no_grad()
def head_importance(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                    progress: Callable[[int, int], None] | None = None,
                    mean_std: tuple[tuple[float, ...], tuple[float, ...]] | None = None) -> HeadImportance:
    """Switch each head of ``model`` off in turn over normalised ``images`` [N, 3, H, W] with ``labels`` [N].

    With ``mean_std``, ``images`` are uint8 and each batch is normalised as it is used, so only one batch is
    ever held in float (a quarter of the memory of normalising all of them first).
    Per batch: one plain forward, then per block one pass over the block's heads (``head_masked_logits``:
    the blocks before it run once). ``progress(done, total)`` counts those passes. The model must be in eval
    mode (dropout would blur the ranking); it is only read, so a shared model may be ranked.
    """
    vit = check_supported(model)
    if model.training:
        raise ValueError("rank heads of a model in eval mode (call model.eval()): dropout would blur the ranking")
    n = int(images.shape[0])
    if n == 0 or n != labels.shape[0]:
        raise ConfigError(f"need as many labels as images, at least one: got {n} and {labels.shape[0]}")
    heads = [blk.attn.num_heads for blk in vit.blocks]
    if len(set(heads)) != 1:
        raise IncompatibleModelsError(f"cannot rank heads of blocks with different head counts {heads}")
    depth, num_heads = len(heads), heads[0]
    device = next(model.parameters()).device
    one_off = 1.0 - torch.eye(num_heads, device=device)  # row h: every head on but h
    correct, loss = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
    masked_correct = torch.zeros(depth, num_heads, dtype=torch.float64)
    masked_loss = torch.zeros(depth, num_heads, dtype=torch.float64)
    batches = range(0, n, batch_size)
    total, done = len(batches) * (depth + 1), 0
    for start in batches:
        batch = images[start:start + batch_size].to(device)
        if mean_std is not None:
            batch = normalize(batch, *mean_std)
        target = labels[start:start + batch_size].to(device)
        c, s = _tally(capture_attention(model, batch, blocks=()).class_logits, target)
        correct, loss = correct + c.cpu(), loss + s.cpu()
        done += 1
        if progress is not None:
            progress(done, total)
        for block in range(depth):
            c, s = _tally(head_masked_logits(model, batch, block, one_off), target)
            masked_correct[block] += c.cpu()
            masked_loss[block] += s.cpu()
            done += 1
            if progress is not None:
                progress(done, total)
    return HeadImportance(float(100.0 * correct / n), float(loss / n), (100.0 * masked_correct / n).numpy(),
                          (masked_loss / n).numpy(), n)


def head_importance_checkpoint(path: str | Path, data: str | None = None, split: str = "train",
                               limit: int | None = 1000, batch_size: int = 256, device: str = "auto",
                               cache_dir: str | None = None,
                               progress: Callable[[int, int], None] | None = None) -> HeadImportance:
    """``head_importance`` of a checkpoint on ``limit`` evenly spaced images of a split of its data.

    The data's classes must be the checkpoint's (``ConfigError`` before any image is decoded). Only the
    ranked images are decoded (``load_subset``), and no train statistics are needed: the model's are used.
    """
    check_subset_options(batch_size, limit)
    dev = resolve_device(device)
    model, meta = load_checkpoint(path, device=dev)
    source = check_data_classes(path, model, meta, data, split, cache_dir)
    subset = load_subset(source, split, model_img_size(model, meta), limit, cache_dir, progress=False)
    # normalised per batch with the statistics the model was trained with, not the split's
    return head_importance(model, subset.images, subset.labels, batch_size, progress, mean_std=norm_stats(meta))
