"""The two layers of SL-ViT, "Vision Transformer for Small-Size Datasets" (Lee et al. 2021), for timm's ViT.

- ``ShiftedPatchTokenization`` (SPT) is a patch embedding (timm's ``embed_layer``): the image and
  its four diagonal half-patch shifts, stacked on channels, cut into patches, each patch
  flattened, layer-normed and projected to ``embed_dim``.
- ``LocalitySelfAttention`` (LSA) is timm's ``Attention`` (``attn_layer``, same ``qkv``/``proj``
  parameters) with a learned scale on ``q k^T`` and the diagonal masked: no token attends to itself.

``vitkd.models.build_model`` plugs them in for the ``spt``/``lsa`` overrides; ``vitkd.attention``
captures LSA's logits through ``LocalitySelfAttention.attention_logits``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from timm.layers import Attention, to_2tuple
from torch import nn

__all__ = ["ShiftedPatchTokenization", "LocalitySelfAttention", "SPT_SHIFTS"]

# (rows, columns) each shifted copy's content moves by, in units of half a patch, in channel order
# after the unshifted image: up-left, up-right, down-left, down-right.
SPT_SHIFTS: tuple[tuple[int, int], ...] = ((-1, -1), (-1, 1), (1, -1), (1, 1))


class ShiftedPatchTokenization(nn.Module):
    """Shifted Patch Tokenization: [B, C, H, W] images to [B, N, embed_dim] patch tokens (row-major grid).

    Channels are the image then its copies shifted by half a patch (``patch_size // 2`` per axis)
    in the ``SPT_SHIFTS`` order, zero-filled where the shift uncovers pixels: ``5 * in_chans``
    channels. A shifted copy moved by ``(dy, dx)`` holds ``image[y - dy, x - dx]``. Each
    ``patch_size`` patch of that stack is flattened in (row, column, channel) order, normalised by
    ``norm`` (a LayerNorm over the ``5 * in_chans * ph * pw`` values) and projected by ``proj``.

    Args:
        img_size: input size (int or (H, W)); must be a multiple of ``patch_size``.
        patch_size: patch side (int or (ph, pw)); the shift is half of it (rounded down).
        in_chans: image channels.
        embed_dim: token width.
        bias: bias of ``proj`` (timm passes ``not pre_norm``).
        dynamic_img_pad: must be False (SPT does not pad inputs).
        device, dtype: factory arguments for the parameters.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int | tuple[int, int] = 4,
        in_chans: int = 3,
        embed_dim: int = 192,
        bias: bool = True,
        dynamic_img_pad: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dynamic_img_pad:
            raise ValueError("ShiftedPatchTokenization does not pad inputs (dynamic_img_pad must be False)")
        self.patch_size = to_2tuple(patch_size)
        self.img_size, self.grid_size, self.num_patches = self._grid(to_2tuple(img_size))
        self.in_chans = in_chans
        self.dynamic_img_pad = False
        patch_dim = (1 + len(SPT_SHIFTS)) * in_chans * self.patch_size[0] * self.patch_size[1]
        self.norm = nn.LayerNorm(patch_dim, device=device, dtype=dtype)
        self.proj = nn.Linear(patch_dim, embed_dim, bias=bias, device=device, dtype=dtype)

    def _grid(self, img_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], int]:
        if any(s % p for s, p in zip(img_size, self.patch_size, strict=True)):
            raise ValueError(f"image size {img_size} is not a multiple of the patch size {self.patch_size}")
        grid = (img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1])
        return img_size, grid, grid[0] * grid[1]

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """What timm's ``VisionTransformer.set_input_size`` calls; only the image size can change."""
        if patch_size is not None and to_2tuple(patch_size) != self.patch_size:
            raise ValueError("ShiftedPatchTokenization cannot change its patch size")
        if img_size is not None:
            self.img_size, self.grid_size, self.num_patches = self._grid(to_2tuple(img_size))

    def feat_ratio(self, as_scalar: bool = True) -> int | tuple[int, int]:
        return max(self.patch_size) if as_scalar else self.patch_size

    def dynamic_feat_size(self, img_size: tuple[int, int]) -> tuple[int, int]:
        return img_size[0] // self.patch_size[0], img_size[1] // self.patch_size[1]

    def shifted_stack(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] -> [B, 5C, H, W]: the image, then its four diagonal half-patch shifts."""
        sh, sw = self.patch_size[0] // 2, self.patch_size[1] // 2
        # F.pad with (left, right, top, bottom): a positive side adds zeros, a negative side crops.
        shifted = [F.pad(x, (dx * sw, -dx * sw, dy * sh, -dy * sh)) for dy, dx in SPT_SHIFTS]
        return torch.cat([x, *shifted], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, _, H, W = x.shape
        if self.img_size != (H, W):
            raise ValueError(f"input is {H}x{W}, this model reads {self.img_size[0]}x{self.img_size[1]} images")
        x = self.shifted_stack(x)
        (gh, gw), (ph, pw) = self.grid_size, self.patch_size
        x = x.reshape(B, x.shape[1], gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(B, gh * gw, -1)
        return self.proj(self.norm(x))


class LocalitySelfAttention(Attention):
    """Locality Self-Attention: ``softmax(mask(q k^T * logit_scale)) v``, the diagonal masked to ``-inf``.

    ``logit_scale`` is a learned scalar per layer, initialised to timm's ``head_dim ** -0.5``
    (the paper's learnable temperature, applied as a multiplier). Masking the diagonal gives
    each token's own key zero probability, so a query spreads its attention over the other
    tokens. Everything else (``qkv``, ``q_norm``/``k_norm``, ``norm``, ``gate``, ``proj``, dropouts, the
    fused SDPA path) is timm's ``Attention``, with the same arguments. Needs at least 2 tokens.

    Args:
        dim: token width.
        num_heads: attention heads.
        **kwargs: timm ``Attention``'s other arguments (``qkv_bias``, ``qk_norm``, ``attn_drop``, ...).
    """

    def __init__(self, dim: int, num_heads: int = 8, **kwargs) -> None:
        super().__init__(dim, num_heads=num_heads, **kwargs)
        factory = {k: kwargs[k] for k in ("device", "dtype") if kwargs.get(k) is not None}
        self.logit_scale = nn.Parameter(torch.tensor(self.scale, **factory))

    def attention_logits(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q, k [B, H, N, D] -> the logits LSA's softmax sees [B, H, N, N] (diagonal ``-inf``)."""
        logits = (q @ k.transpose(-2, -1)) * self.logit_scale
        eye = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
        return logits.masked_fill(eye, -math.inf)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("LocalitySelfAttention masks its own diagonal and takes no other attention mask")
        B, N, _ = x.shape
        if N < 2:
            raise ValueError("LocalitySelfAttention needs at least 2 tokens (each query masks its own key)")
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.fused_attn:
            off_diagonal = ~torch.eye(N, dtype=torch.bool, device=x.device)  # True: may attend
            x = F.scaled_dot_product_attention(q * self.logit_scale, k, v, attn_mask=off_diagonal,
                                               dropout_p=self.attn_drop.p if self.training else 0.0, scale=1.0)
        else:
            attn = self.attn_drop(self.attention_logits(q, k).softmax(dim=-1))
            x = attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))
