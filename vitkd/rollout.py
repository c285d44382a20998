"""Attention rollout (Abnar & Zuidema 2020) and class-specific gradient rollout (Chefer et al. 2021 style).

Pure functions over tensors; ``gradient_rollout`` uses ``torch.autograd.grad`` so a shared,
cached model is never mutated (no ``.backward()`` into its ``.grad``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .attention import capture_attention

__all__ = ["fuse_heads", "attention_rollout", "gradient_rollout", "HEAD_FUSIONS"]

HEAD_FUSIONS = ("mean", "max", "min")


def fuse_heads(probs: torch.Tensor, head_fusion: str = "mean") -> torch.Tensor:
    """[B, H, T, T] -> [B, T, T] by mean, max or min over heads."""
    if head_fusion == "mean":
        return probs.mean(dim=1)
    if head_fusion == "max":
        return probs.amax(dim=1)
    if head_fusion == "min":
        return probs.amin(dim=1)
    raise ValueError(f"head_fusion must be one of {HEAD_FUSIONS}, got {head_fusion!r}")


def _discard_lowest(fused: torch.Tensor, discard_ratio: float) -> torch.Tensor:
    """Zero the lowest ``discard_ratio`` of each [T, T] map, never the CLS (first) column."""
    if discard_ratio <= 0:
        return fused
    B, T, _ = fused.shape
    flat = fused.reshape(B, T * T).clone()
    candidates = flat.clone()
    candidates.view(B, T, T)[:, :, 0] = float("inf")  # protect the CLS column from being picked
    k = min(int(T * T * discard_ratio), T * (T - 1))  # at most every non-CLS entry
    if k > 0:
        _, idx = candidates.topk(k, dim=-1, largest=False)
        flat.scatter_(1, idx, 0.0)
    return flat.view(B, T, T)


def attention_rollout(probs: Sequence[torch.Tensor], head_fusion: str = "mean",
                      discard_ratio: float = 0.0) -> torch.Tensor:
    """Roll attention through the blocks: ``R = Â_L ... Â_1`` with ``Â = rownorm(0.5 A + 0.5 I)``.

    ``probs`` lists each block's attention probabilities [B, H, T, T], first block first.
    Returns [B, T, T]; row ``i`` says how much each input token flows into output token ``i``.
    """
    if not probs:
        raise ValueError("attention_rollout needs at least one block")
    B, _, T, _ = probs[0].shape
    eye = torch.eye(T, dtype=torch.float32, device=probs[0].device).expand(B, T, T)
    result = eye.clone()
    for block_probs in probs:
        fused = _discard_lowest(fuse_heads(block_probs.float(), head_fusion), discard_ratio)
        a = 0.5 * fused + 0.5 * eye
        a = a / a.sum(dim=-1, keepdim=True)
        result = a @ result
    return result


def gradient_rollout(model: torch.nn.Module, images: torch.Tensor,
                     class_index: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    """Class-specific relevance [B, T, T]: ``R <- R + Ā R`` with ``Ā = mean_h(A * relu(dy_c/dA))``.

    ``class_index`` is one class for the whole batch or one per image. Samples do not
    interact in a ViT forward, so one backward of the summed class logits gives each
    image's own gradients.
    """
    images = images.detach()
    with torch.enable_grad():
        out = capture_attention(model, images)
        B = images.shape[0]
        target = torch.as_tensor(class_index, device=out.class_logits.device).long().reshape(-1).expand(B)
        score = out.class_logits.gather(1, target[:, None]).sum()
        blocks = sorted(out.attn_probs)
        grads = torch.autograd.grad(score, [out.attn_probs[b] for b in blocks])
    T = out.attn_probs[blocks[0]].shape[-1]
    relevance = torch.eye(T, device=images.device).expand(B, T, T).clone()
    for b, grad in zip(blocks, grads, strict=True):
        cam = (out.attn_probs[b].detach() * grad.clamp(min=0)).mean(dim=1)
        relevance = relevance + cam @ relevance
    return relevance
