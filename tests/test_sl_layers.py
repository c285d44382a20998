"""``vitkd.sl_layers`` against the paper's math written here: shifts by hand, one LSA layer by hand, rollout rows."""

from __future__ import annotations

import math

import pytest
import torch
from test_attention import spt_reference
from timm.models.vision_transformer import VisionTransformer

from vitkd.attention import capture_attention
from vitkd.models import build_model
from vitkd.rollout import attention_rollout, gradient_rollout
from vitkd.sl_layers import SPT_SHIFTS, LocalitySelfAttention, ShiftedPatchTokenization

pytestmark = pytest.mark.timeout(60)


def _randomize(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.5 + (1.0 if p.ndim == 0 else 0.0))
    return module.eval()


# ---------------------------------------------------------------- Shifted Patch Tokenization


def test_spt_moves_a_pixel_half_a_patch_diagonally() -> None:
    """One lit pixel at (3, 5) of an 8x8 image, patch 4 (shift 2): where each of the 5 copies shows it."""
    pe = ShiftedPatchTokenization(img_size=8, patch_size=4, in_chans=1, embed_dim=4)
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 3, 5] = 1.0
    stack = pe.shifted_stack(image)
    assert stack.shape == (1, 5, 8, 8)
    expected = [(3, 5), (1, 3), (1, 7), (5, 3), (5, 7)]  # image, up-left, up-right, down-left, down-right
    for channel, (y, x) in enumerate(expected):
        assert stack[0, channel].nonzero().tolist() == [[y, x]], channel
    assert SPT_SHIFTS == ((-1, -1), (-1, 1), (1, -1), (1, 1))
    # a shift that leaves the image is zero-filled, not wrapped around
    image = torch.zeros(1, 1, 8, 8)
    image[0, 0, 0, 7] = 1.0
    stack = pe.shifted_stack(image)
    assert [int(stack[0, c].sum()) for c in range(5)] == [1, 0, 0, 1, 0]


@pytest.mark.parametrize("patch_size, img_size", [(4, 8), (2, 6), ((2, 4), (4, 8)), (3, 9)])
def test_spt_matches_the_reference(patch_size, img_size) -> None:
    pe = _randomize(ShiftedPatchTokenization(img_size=img_size, patch_size=patch_size, in_chans=3,
                                             embed_dim=5), seed=0).double()
    images = torch.randn(2, 3, *pe.img_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = pe(images)
    assert out.shape == (2, pe.num_patches, 5)
    torch.testing.assert_close(out, spt_reference(images, pe), rtol=1e-12, atol=1e-12)
    assert pe.norm.normalized_shape == (5 * 3 * pe.patch_size[0] * pe.patch_size[1],)


def test_spt_is_a_timm_embed_layer() -> None:
    """What timm's VisionTransformer and vitkd read from a patch embedding; bad inputs raise."""
    model = VisionTransformer(img_size=32, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3,
                              embed_layer=ShiftedPatchTokenization)
    pe = model.patch_embed
    assert (pe.img_size, pe.patch_size, pe.grid_size, pe.num_patches) == ((32, 32), (4, 4), (8, 8), 64)
    assert pe.feat_ratio() == 4 and pe.dynamic_feat_size((32, 32)) == (8, 8)
    assert model.pos_embed.shape == (1, 65, 16)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="16x16"):
        model(torch.randn(1, 3, 16, 16))
    model.set_input_size(img_size=16)  # timm resamples the position embedding, SPT its grid
    assert pe.grid_size == (4, 4) and model(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    with pytest.raises(ValueError, match="patch size"):
        pe.set_input_size(patch_size=8)
    with pytest.raises(ValueError, match="multiple"):
        ShiftedPatchTokenization(img_size=30, patch_size=4)
    with pytest.raises(ValueError, match="dynamic_img_pad"):
        ShiftedPatchTokenization(img_size=32, patch_size=4, dynamic_img_pad=True)


# ---------------------------------------------------------------- Locality Self-Attention


def _lsa_reference(attn: LocalitySelfAttention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSA layer from the paper: ``softmax(q k^T * tau)`` with the diagonal masked, then ``proj``."""
    B, N, C = x.shape
    H = attn.num_heads
    D = C // H
    w, b = attn.qkv.weight, attn.qkv.bias
    q, k, v = ((x @ w[i * C:(i + 1) * C].T + b[i * C:(i + 1) * C]).reshape(B, N, H, D).transpose(1, 2)
               for i in range(3))  # the q, k, v rows of the fused weight
    logits = torch.einsum("bhnd,bhmd->bhnm", q, k) * attn.logit_scale
    for n in range(N):
        logits[:, :, n, n] = -math.inf
    probs = torch.exp(logits - logits.amax(-1, keepdim=True))
    probs = probs / probs.sum(-1, keepdim=True)
    out = (probs @ v).transpose(1, 2).reshape(B, N, C)
    return out @ attn.proj.weight.T + attn.proj.bias, probs


@pytest.mark.parametrize("fused", [True, False])
def test_lsa_matches_the_reference_fused_and_unfused(fused: bool) -> None:
    attn = _randomize(LocalitySelfAttention(12, num_heads=3, qkv_bias=True), seed=2).double()
    attn.fused_attn = fused  # a private instance: both of timm's paths
    x = torch.randn(2, 7, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ref_out, ref_probs = _lsa_reference(attn, x)
    torch.testing.assert_close(attn(x), ref_out, rtol=1e-10, atol=1e-10)
    assert torch.equal(ref_probs.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 3, 7))


def test_lsa_scale_is_learned_per_layer_from_timms_scale() -> None:
    attn = LocalitySelfAttention(16, num_heads=4)
    assert isinstance(attn.logit_scale, torch.nn.Parameter) and attn.logit_scale.shape == ()
    assert attn.logit_scale.item() == pytest.approx(4 ** -0.5) and attn.scale == pytest.approx(4 ** -0.5)
    assert {"qkv.weight", "proj.weight", "logit_scale"} <= set(attn.state_dict())
    x = torch.randn(2, 5, 16)
    (grad,) = torch.autograd.grad(attn(x).pow(2).sum(), attn.logit_scale)
    assert grad.abs() > 0
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=2, num_heads=4, num_classes=3,
                              attn_layer=LocalitySelfAttention)
    assert all(type(blk.attn) is LocalitySelfAttention for blk in model.blocks)
    assert model.blocks[0].attn.logit_scale is not model.blocks[1].attn.logit_scale


def test_lsa_refuses_other_masks_and_single_tokens() -> None:
    attn = LocalitySelfAttention(8, num_heads=2)
    with pytest.raises(ValueError, match="no other attention mask"):
        attn(torch.randn(1, 3, 8), attn_mask=torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="no other attention mask"):
        attn(torch.randn(1, 3, 8), is_causal=True)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        attn(torch.randn(1, 1, 8))


# ---------------------------------------------------------------- rollout over LSA maps


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
def test_rollout_rows_sum_to_one_with_zero_diagonals(discard_ratio: float) -> None:
    """LSA maps give each token none of its own attention; rollout's identity term keeps its rows stochastic."""
    model = _randomize_sl(build_model("cifar-student-sl", 10, depth=3))
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = capture_attention(model, images)
    probs = [out.attn_probs[b] for b in sorted(out.attn_probs)]
    assert all(torch.equal(p.diagonal(dim1=-2, dim2=-1), torch.zeros(2, 4, 65)) for p in probs)
    for fusion in ("mean", "max", "min"):
        rollout = attention_rollout(probs, fusion, discard_ratio)
        assert torch.isfinite(rollout).all() and (rollout >= 0).all()
        torch.testing.assert_close(rollout.sum(-1), torch.ones(2, 65))
    # one block by hand: 0.5 * A + 0.5 * I already sums to 1 per row, and its diagonal is exactly 0.5
    one = attention_rollout(probs[:1])
    torch.testing.assert_close(one, 0.5 * probs[0].mean(1) + 0.5 * torch.eye(65))
    torch.testing.assert_close(one.diagonal(dim1=-2, dim2=-1), torch.full((2, 65), 0.5))
    relevance = gradient_rollout(model, images, 3)
    assert torch.isfinite(relevance).all()


def _randomize_sl(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = (1.0 / p.shape[1]) ** 0.5 if name.endswith("qkv.weight") else 0.05
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()
