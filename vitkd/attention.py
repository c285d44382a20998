"""Exact attention capture from timm ViTs: the only module that re-runs timm's forward pass piece by piece.

(``vitkd.sl_layers`` extends timm's ``Attention`` as a layer of its own; ``vitkd.models`` builds through
timm's public constructors.)

The capture re-runs the model's own submodules in order. Blocks whose attention is
requested compute ``q k^T * scale`` explicitly (exact logits, differentiable); every
other block, and the head, run timm's normal (fused) path. No hooks, no flags, no state:
concurrent calls on one shared model never see each other's tensors.

Locality Self-Attention blocks (``vitkd.sl_layers``) are captured through the layer's own
``attention_logits``: the logits are what its softmax sees (``q k^T * logit_scale`` with the
diagonal at ``-inf``), so each captured map's diagonal has probability exactly 0.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer

from .errors import IncompatibleModelsError
from .sl_layers import LocalitySelfAttention

__all__ = ["AttentionOutputs", "TokenLayout", "capture_attention", "forward_with_attention", "token_layout",
           "check_supported", "CaptureModule", "head_masked_logits"]


@dataclass(frozen=True)
class TokenLayout:
    """How the token axis is laid out: ``num_prefix_tokens`` (CLS, dist, registers) then a row-major grid."""

    num_prefix_tokens: int
    grid_size: tuple[int, int]

    @property
    def num_tokens(self) -> int:
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]


@dataclass(frozen=True)
class AttentionOutputs:
    """Class logits [B, C]; per captured block, attention logits and probabilities [B, H, T, T].

    ``attn_probs[i]`` is the very tensor the forward used (so gradients w.r.t. it are
    meaningful); it equals ``attn_logits[i].softmax(-1)``. Keys a query cannot attend to
    (the diagonal of a Locality Self-Attention block) have logit ``-inf`` and probability 0.
    """

    class_logits: torch.Tensor
    attn_logits: dict[int, torch.Tensor]
    attn_probs: dict[int, torch.Tensor]
    head_logits: tuple[torch.Tensor, torch.Tensor] | None = None


def check_supported(model: torch.nn.Module) -> VisionTransformer:
    """Raise ``IncompatibleModelsError`` naming the class unless vitkd can capture this model exactly."""
    if not isinstance(model, VisionTransformer):
        raise IncompatibleModelsError(
            f"{type(model).__name__} is not a timm VisionTransformer; vitkd captures attention from ViTs only"
        )
    for idx, blk in enumerate(model.blocks):
        if type(blk) is not Block or type(blk.attn) not in (Attention, LocalitySelfAttention):
            raise IncompatibleModelsError(
                f"{type(model).__name__} block {idx} is {type(blk).__name__} "
                f"with {type(getattr(blk, 'attn', None)).__name__}; "
                "vitkd supports timm's standard Block with Attention (or vitkd's LocalitySelfAttention)"
            )
    return model


def token_layout(model: torch.nn.Module) -> TokenLayout:
    vit = check_supported(model)
    grid = vit.patch_embed.grid_size
    return TokenLayout(num_prefix_tokens=int(vit.num_prefix_tokens), grid_size=(int(grid[0]), int(grid[1])))


def _attention_with_logits(attn: Attention, x: torch.Tensor, head_mask: torch.Tensor | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Attention.forward`` unfused, also returning logits and the probabilities it used.

    For ``LocalitySelfAttention`` the logits come from its ``attention_logits`` (scaled by its
    learned ``logit_scale``, diagonal ``-inf``), as in its own unfused forward. ``head_mask`` [H] (or
    [B, H], one row per image) multiplies each head's output right before the output projection.
    """
    B, N, _ = x.shape
    gate = attn.gate(x).sigmoid() if attn.gate is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    if isinstance(attn, LocalitySelfAttention):
        logits = attn.attention_logits(q, k)
    else:
        logits = (q * attn.scale) @ k.transpose(-2, -1)
    probs = logits.softmax(dim=-1)
    out = attn.attn_drop(probs) @ v
    out = out.transpose(1, 2).reshape(B, N, attn.attn_dim)
    out = attn.norm(out)
    if gate is not None:
        out = out * gate
    if head_mask is not None:  # [H] or one row per image [B, H]
        scale = head_mask.to(out.dtype).repeat_interleave(attn.head_dim, dim=-1)
        out = out * (scale[:, None, :] if scale.dim() == 2 else scale)
    out = attn.proj_drop(attn.proj(out))
    return out, logits, probs


def _embed(vit: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
    """The tokens entering the first block (timm's ``forward_features`` before its blocks)."""
    x = vit.patch_embed(images)
    x = vit._pos_embed(x)
    x = vit.patch_drop(x)
    return vit.norm_pre(x)


def _block_with(blk: Block, x: torch.Tensor, head_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """timm ``Block.forward`` with its attention unfused: (tokens out, attention logits, probabilities)."""
    out, logits, probs = _attention_with_logits(blk.attn, blk.norm1(x), head_mask)
    x = x + blk.drop_path1(blk.ls1(out))
    return x + blk.drop_path2(blk.ls2(blk.mlp(blk.norm2(x)))), logits, probs


def _class_logits(vit: VisionTransformer, x: torch.Tensor
                  ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Final norm and head: (class logits, the DeiT (cls, dist) pair in training mode or None)."""
    class_logits = vit.forward_head(vit.norm(x))
    if isinstance(class_logits, tuple):  # DeiT distilled training mode returns (cls, dist)
        return (class_logits[0] + class_logits[1]) / 2, (class_logits[0], class_logits[1])
    return class_logits, None


def capture_attention(
    model: torch.nn.Module,
    images: torch.Tensor,
    blocks: Iterable[int] | None = None,
) -> AttentionOutputs:
    """Forward ``images`` [B, 3, H, W] through ``model``, capturing the requested blocks (all if None)."""
    vit = check_supported(model)
    depth = len(vit.blocks)
    wanted = set(range(depth)) if blocks is None else {int(b) for b in blocks}
    bad = sorted(b for b in wanted if not 0 <= b < depth)
    if bad:
        raise IncompatibleModelsError(f"blocks {bad} out of range for a {depth}-block {type(vit).__name__}")
    last = max(wanted, default=-1)
    attn_logits: dict[int, torch.Tensor] = {}
    attn_probs: dict[int, torch.Tensor] = {}

    x = _embed(vit, images)
    for idx, blk in enumerate(vit.blocks):
        if idx in wanted:
            x, attn_logits[idx], attn_probs[idx] = _block_with(blk, x)
        elif idx > last and not torch.is_grad_enabled():
            x = vit.blocks[idx:](x)  # the rest in one fused call
            break
        else:
            x = blk(x)
    class_logits, head_logits = _class_logits(vit, x)
    return AttentionOutputs(class_logits=class_logits, attn_logits=attn_logits, attn_probs=attn_probs,
                            head_logits=head_logits)


@torch.no_grad()
def head_masked_logits(model: torch.nn.Module, images: torch.Tensor, block: int, masks: torch.Tensor) -> torch.Tensor:
    """Class logits ``[K, B, C]`` of ``images`` [B, 3, H, W] with each of ``masks`` [K, heads] scaling the
    heads' outputs of ``block`` before its output projection (0 switches a head off).

    The blocks before ``block`` run once for all K masks; ``block`` and the rest run on the K copies
    in one batch. ``vitkd.importance`` ranks heads with it.
    """
    vit = check_supported(model)
    if not 0 <= block < len(vit.blocks):
        raise IncompatibleModelsError(f"block {block} out of range for a {len(vit.blocks)}-block model")
    heads = vit.blocks[block].attn.num_heads
    if masks.dim() != 2 or masks.shape[1] != heads:
        raise IncompatibleModelsError(f"head masks of shape {tuple(masks.shape)} for a block of {heads} heads: "
                                      f"expected [K, {heads}]")
    x = vit.blocks[:block](_embed(vit, images))
    k, b = masks.shape[0], x.shape[0]
    x = x.repeat(k, 1, 1)  # copy i of the batch: rows i*B .. (i+1)*B - 1
    x, _, _ = _block_with(vit.blocks[block], x, masks.to(x.dtype).repeat_interleave(b, dim=0))
    logits, _ = _class_logits(vit, vit.blocks[block + 1:](x))
    return logits.reshape(k, b, -1)


def forward_with_attention(
    model: torch.nn.Module, images: torch.Tensor, blocks: Iterable[int] | None = None
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """``(class_logits [B, C], {block_idx: attn_logits [B, H, T, T]})``; probabilities are ``softmax(-1)``."""
    out = capture_attention(model, images, blocks)
    return out.class_logits, out.attn_logits


def attention_probs_from_logits(attn_logits: torch.Tensor) -> torch.Tensor:
    """Softmax in float32 whatever the input dtype (bf16 logits lose too much in exp)."""
    return F.softmax(attn_logits.float(), dim=-1)


class CaptureModule(torch.nn.Module):
    """``capture_attention`` as a module, so DistributedDataParallel sees a normal forward call."""

    def __init__(self, model: torch.nn.Module, blocks: Iterable[int] | None = None) -> None:
        super().__init__()
        self.model = model
        self.blocks = None if blocks is None else tuple(sorted(set(blocks)))

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        out = capture_attention(self.model, images, self.blocks)
        return (out.class_logits if out.head_logits is None else out.head_logits), out.attn_logits
