"""``vitkd.attention`` against an unfused reference forward written here from the raw weights."""

from __future__ import annotations

import copy
import math
from concurrent.futures import ThreadPoolExecutor

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from vitkd.attention import CaptureModule, capture_attention, forward_with_attention, token_layout
from vitkd.distill import attention_loss
from vitkd.errors import IncompatibleModelsError
from vitkd.models import build_model
from vitkd.sl_layers import LocalitySelfAttention, ShiftedPatchTokenization

pytestmark = pytest.mark.timeout(60)

TOL = 1e-5  # float32 max abs difference allowed between the capture and the reference


def _linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    out = x @ layer.weight.T
    return out + layer.bias if layer.bias is not None else out


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = (x - mean).pow(2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _layer_norm_or_identity(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    if isinstance(norm, torch.nn.Identity):
        return x
    assert type(norm) in (torch.nn.LayerNorm, timm.layers.LayerNorm), type(norm)  # the math below is LayerNorm's
    return _layer_norm(x, norm)


def _layer_scale(x: torch.Tensor, ls: torch.nn.Module) -> torch.Tensor:
    """LayerScale multiplies each channel by its own learned gamma; Identity when the model has none."""
    return x if isinstance(ls, torch.nn.Identity) else x * ls.gamma


def spt_reference(images: torch.Tensor, pe: ShiftedPatchTokenization) -> torch.Tensor:
    """Shifted Patch Tokenization from the paper's description, [B, 3, H, W] -> [B, N, C].

    Channels: the image, then copies moved half a patch up-left, up-right, down-left and
    down-right (uncovered pixels 0); each patch flattened as (row, column, channel), a
    LayerNorm over the whole patch, then the linear projection.
    """
    (ph, pw), (H, W) = pe.patch_size, images.shape[-2:]
    sh, sw = ph // 2, pw // 2

    def moved(dy: int, dx: int) -> torch.Tensor:  # out[y, x] = image[y - dy, x - dx], 0 outside
        out = torch.zeros_like(images)
        out[..., max(dy, 0):H + min(dy, 0), max(dx, 0):W + min(dx, 0)] = \
            images[..., max(-dy, 0):H + min(-dy, 0), max(-dx, 0):W + min(-dx, 0)]
        return out

    stack = torch.cat([images, moved(-sh, -sw), moved(-sh, sw), moved(sh, -sw), moved(sh, sw)], dim=1)
    patches = [stack[:, :, i * ph:(i + 1) * ph, j * pw:(j + 1) * pw].permute(0, 2, 3, 1).flatten(1)
               for i in range(H // ph) for j in range(W // pw)]  # row-major grid
    return _linear(_layer_norm(torch.stack(patches, dim=1), pe.norm), pe.proj)


def reference_forward(model: VisionTransformer, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Plain-op ViT forward (eval mode): ``(class_logits [B, C], [attn_logits [B, H, T, T] per block])``.

    q, k and v come from slicing each block's qkv weight by hand; nothing calls a timm module. Covers
    pre-norm blocks with LayerScale (``init_values``), per-head q/k LayerNorms (``qk_norm``), a LayerNorm
    on the attention output before ``proj`` (``scale_attn_norm``) and one inside the MLP (``scale_mlp_norm``),
    and SL-ViT's layers: Shifted Patch Tokenization and Locality Self-Attention (logits ``q k^T * logit_scale``,
    the diagonal ``-inf``).
    """
    for blk in model.blocks:  # anything else is outside what the reference computes
        for name in ("drop_path1", "drop_path2"):
            assert isinstance(getattr(blk, name), torch.nn.Identity), name
        assert blk.attn.gate is None
    assert model.global_pool == "token" and isinstance(model.fc_norm, torch.nn.Identity)

    pe = model.patch_embed
    if isinstance(pe, ShiftedPatchTokenization):
        x = spt_reference(images, pe)
    else:
        x = F.conv2d(images, pe.proj.weight, pe.proj.bias, stride=pe.patch_size)  # [B, C, gh, gw]
        x = x.flatten(2).transpose(1, 2)  # row-major patch order
    B, C = x.shape[0], x.shape[2]
    prefix = [model.cls_token.expand(B, -1, -1)]
    if hasattr(model, "dist_token"):
        prefix.append(model.dist_token.expand(B, -1, -1))
    if model.reg_token is not None:
        prefix.append(model.reg_token.expand(B, -1, -1))
    if model.no_embed_class:
        x = torch.cat(prefix + [x + model.pos_embed], dim=1)
    else:
        x = torch.cat(prefix + [x], dim=1) + model.pos_embed
    N = x.shape[1]

    all_logits = []
    for blk in model.blocks:
        H = blk.attn.num_heads
        D = C // H
        h = _layer_norm(x, blk.norm1)
        w, b = blk.attn.qkv.weight, blk.attn.qkv.bias
        heads = []
        for part in range(3):  # q, k, v rows of the fused qkv weight
            wp = w[part * C:(part + 1) * C]
            out = h @ wp.T + (b[part * C:(part + 1) * C] if b is not None else 0)
            heads.append(out.reshape(B, N, H, D).transpose(1, 2))  # [B, H, N, D]
        q, k, v = heads
        q = _layer_norm_or_identity(q, blk.attn.q_norm)  # over each head's D channels
        k = _layer_norm_or_identity(k, blk.attn.k_norm)
        if isinstance(blk.attn, LocalitySelfAttention):  # learned scale, no token attends to itself
            logits = (q @ k.transpose(-2, -1)) * blk.attn.logit_scale
            logits = logits.masked_fill(torch.eye(N, dtype=torch.bool), -math.inf)
        else:
            logits = (q @ k.transpose(-2, -1)) / math.sqrt(D)
        all_logits.append(logits)
        probs = torch.exp(logits - logits.amax(-1, keepdim=True))
        probs = probs / probs.sum(-1, keepdim=True)
        attn_out = (probs @ v).transpose(1, 2).reshape(B, N, C)
        attn_out = _layer_norm_or_identity(attn_out, blk.attn.norm)  # over all heads' channels, before proj
        x = x + _layer_scale(_linear(attn_out, blk.attn.proj), blk.ls1)
        h = _layer_norm(x, blk.norm2)
        hidden = _linear(h, blk.mlp.fc1)
        hidden = 0.5 * hidden * (1.0 + torch.erf(hidden / math.sqrt(2.0)))  # exact GELU
        hidden = _layer_norm_or_identity(hidden, blk.mlp.norm)
        x = x + _layer_scale(_linear(hidden, blk.mlp.fc2), blk.ls2)
    x = _layer_norm(x, model.norm)
    if hasattr(model, "head_dist"):
        class_logits = (_linear(x[:, 0], model.head) + _linear(x[:, 1], model.head_dist)) / 2
    else:
        class_logits = _linear(x[:, 0], model.head)
    return class_logits, all_logits


def _perturb(model: torch.nn.Module, seed: int, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every weight so attention is far from uniform (timm's init makes it nearly flat).

    qkv weights get std ``sqrt(1 / embed_dim)``, which puts attention logits at std ~1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = (1.0 / p.shape[1]) ** 0.5 if name.endswith("qkv.weight") else scale
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model.eval()


def _timm(name: str, **kwargs) -> VisionTransformer:
    return timm.create_model(name, pretrained=False, num_classes=7, **kwargs)


MODELS = {
    "seed-teacher-d3": lambda: build_model("seed-teacher", 10, depth=3),
    "seed-student-d2": lambda: build_model("seed-student", 10, depth=2),
    "seed-teacher-full": lambda: build_model("seed-teacher", 100),
    "deit-distilled": lambda: _timm("deit_tiny_distilled_patch16_224", img_size=32, depth=2),
    "vit-reg4": lambda: _timm("vit_small_patch16_224", img_size=32, depth=2, reg_tokens=4),
    # LayerScale on both branches and LayerNorms on q and k (the block output and the logits change)
    "layerscale-qknorm": lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                                   num_classes=7, init_values=0.3, qk_norm=True),
    # LayerNorms on the attention output before proj and inside the MLP, plus LayerScale
    "attn-out-norm": lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4,
                                               num_classes=7, init_values=0.3, scale_attn_norm=True,
                                               scale_mlp_norm=True),
}
EXPECTED_PREFIX = {"seed-teacher-d3": 1, "seed-student-d2": 1, "seed-teacher-full": 1, "deit-distilled": 2,
                   "vit-reg4": 5, "layerscale-qknorm": 1, "attn-out-norm": 1}


@pytest.mark.parametrize("name", list(MODELS))
def test_capture_matches_unfused_reference(name: str) -> None:
    torch.manual_seed(0)
    model = _perturb(MODELS[name](), seed=1)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    layout = token_layout(model)
    assert layout.num_prefix_tokens == EXPECTED_PREFIX[name]

    with torch.no_grad():
        out = capture_attention(model, images)
        fused = model(images)
        # float64 reference, so the tolerance measures the capture's own float32 error
        ref_class, ref_logits = reference_forward(copy.deepcopy(model).double(), images.double())

    assert sorted(out.attn_logits) == list(range(len(model.blocks)))
    heads = model.blocks[0].attn.num_heads
    for idx, ref in enumerate(ref_logits):
        got = out.attn_logits[idx]
        assert got.shape == (3, heads, layout.num_tokens, layout.num_tokens)
        assert (got - ref).abs().max().item() <= TOL, f"block {idx} logits"
        assert torch.allclose(out.attn_probs[idx].double(), ref.softmax(-1), atol=1e-6, rtol=0)
    assert ref_logits[0].std() > 0.5  # the test would be weak on near-constant logits
    assert (out.class_logits - ref_class).abs().max().item() <= TOL
    assert (out.class_logits - fused).abs().max().item() <= TOL

    logits, attn = forward_with_attention(model, images)
    assert torch.equal(logits, out.class_logits) and attn.keys() == out.attn_logits.keys()


@pytest.mark.parametrize("grad", [False, True])
def test_single_block_capture(grad: bool) -> None:
    model = _perturb(build_model("seed-student", 10, depth=3), seed=3)
    images = torch.randn(2, 3, 32, 32)
    with torch.set_grad_enabled(grad):
        only = capture_attention(model, images, blocks=[1])
        every = capture_attention(model, images)
    assert set(only.attn_logits) == {1} and set(only.attn_probs) == {1}
    assert torch.allclose(only.attn_logits[1], every.attn_logits[1], atol=TOL, rtol=0)
    assert (only.class_logits - every.class_logits).abs().max().item() <= TOL
    assert capture_attention(model, images, blocks=[]).attn_logits == {}


@pytest.mark.parametrize("blocks", [[3], [-1], [0, 7]])
def test_out_of_range_blocks_raise(blocks: list[int]) -> None:
    model = build_model("seed-student", 10, depth=3)
    with pytest.raises(IncompatibleModelsError, match="out of range"):
        capture_attention(model, torch.zeros(1, 3, 32, 32), blocks=blocks)


@pytest.mark.parametrize("make, class_name", [
    (lambda: torch.nn.Linear(4, 4), "Linear"),
    (lambda: _timm("vit_small_patch16_18x2_224", img_size=32, depth=1), "ParallelThingsBlock"),
    (lambda: _timm("vit_relpos_small_patch16_224", img_size=32, depth=1), "VisionTransformerRelPos"),
])
def test_unsupported_models_name_the_class(make, class_name: str) -> None:
    model = make()
    with pytest.raises(IncompatibleModelsError, match=class_name):
        capture_attention(model, torch.zeros(1, 3, 32, 32))
    with pytest.raises(IncompatibleModelsError, match=class_name):
        token_layout(model)


def test_gradients_match_reference() -> None:
    """An attention loss on captured logits backprops into the student exactly like the reference graph."""
    model = _perturb(build_model("seed-student", 10, depth=3, drop_rate=0.0, proj_drop_rate=0.0), seed=4)
    images = torch.randn(2, 3, 32, 32)
    target = torch.randn(2, 4, 17, 17)
    blocks = [0, 2]

    out = capture_attention(model, images, blocks)
    loss = attention_loss(torch.stack([out.attn_logits[b] for b in blocks], 1).flatten(1, 2),
                          target.repeat(1, 2, 1, 1), "kl")
    grads = torch.autograd.grad(loss, [model.blocks[b].attn.qkv.weight for b in blocks])

    _, ref_logits = reference_forward(model, images)
    ref_loss = attention_loss(torch.stack([ref_logits[b] for b in blocks], 1).flatten(1, 2),
                              target.repeat(1, 2, 1, 1), "kl")
    ref_grads = torch.autograd.grad(ref_loss, [model.blocks[b].attn.qkv.weight for b in blocks])
    for g, r in zip(grads, ref_grads, strict=True):
        assert g.abs().max() > 0
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)

    # .backward() through the capture reaches the captured blocks' parameters
    model.zero_grad(set_to_none=True)
    out = capture_attention(model, images, blocks)
    (out.attn_logits[0].pow(2).mean() + out.attn_logits[2].pow(2).mean()).backward()
    for b in blocks:
        assert model.blocks[b].attn.qkv.weight.grad is not None
        assert model.blocks[b].attn.qkv.weight.grad.abs().sum() > 0


def test_gradcheck_double_precision() -> None:
    """Finite differences agree with autograd through the capture (inputs and a qkv weight)."""
    torch.manual_seed(0)
    model = VisionTransformer(img_size=8, patch_size=4, embed_dim=8, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=3, qkv_bias=True).double().eval()
    images = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def from_images(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = capture_attention(model, x, blocks=[1])
        return out.attn_logits[1], out.class_logits

    assert torch.autograd.gradcheck(from_images, (images,), eps=1e-6, atol=1e-5)

    qkv = model.blocks[0].attn.qkv.weight.detach().clone().requires_grad_(True)

    wrapper = CaptureModule(model, blocks=[0, 1])

    def from_weight(w: torch.Tensor) -> torch.Tensor:
        _, attn = torch.func.functional_call(wrapper, {"model.blocks.0.attn.qkv.weight": w}, (images.detach(),))
        return attn[1]

    assert torch.autograd.gradcheck(from_weight, (qkv,), eps=1e-6, atol=1e-5)


def test_thread_safety_matches_serial() -> None:
    model = _perturb(build_model("seed-student", 10, depth=2), seed=5)
    gen = torch.Generator().manual_seed(6)
    inputs = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(6)]
    blocks_for = [None, [0], [1], None, [0, 1], [1]]

    def run(i: int) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        with torch.no_grad():
            out = capture_attention(model, inputs[i % 6], blocks_for[i % 6])
        return out.class_logits, out.attn_logits

    serial = [run(i) for i in range(6)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, range(120)))
    for i, (logits, attn) in enumerate(results):
        want_logits, want_attn = serial[i % 6]
        assert torch.equal(logits, want_logits), i
        assert attn.keys() == want_attn.keys()
        for b in attn:
            assert torch.equal(attn[b], want_attn[b]), (i, b)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())


def test_capture_module_equals_function() -> None:
    model = _perturb(build_model("seed-student", 10, depth=2), seed=7)
    images = torch.randn(2, 3, 32, 32)
    wrapper = CaptureModule(model, blocks=[1, 1, 0])
    with torch.no_grad():
        logits, attn = wrapper(images)
        out = capture_attention(model, images, [0, 1])
    assert torch.equal(logits, out.class_logits)
    assert set(attn) == {0, 1} and all(torch.equal(attn[b], out.attn_logits[b]) for b in attn)


# ---------------------------------------------------------------- SL-ViT (Shifted Patch Tokenization, LSA)


def _sl_model(**overrides) -> VisionTransformer:
    """A perturbed cifar-student-sl with learned scales away from their initial value."""
    model = _perturb(build_model("cifar-student-sl", 10, **overrides), seed=11)
    with torch.no_grad():
        for i, blk in enumerate(model.blocks):
            blk.attn.logit_scale.fill_(0.2 + 0.05 * i)  # the initial value is 0.25
    return model


def _assert_masked_logits_close(got: torch.Tensor, ref: torch.Tensor, atol: float) -> None:
    """Same ``-inf`` entries (exactly the diagonal) and finite entries within ``atol``."""
    diagonal = torch.eye(got.shape[-1], dtype=torch.bool).expand_as(got)
    assert torch.equal(torch.isneginf(got), diagonal) and torch.equal(torch.isneginf(ref), diagonal)
    assert torch.isfinite(got[~diagonal]).all()
    assert (got[~diagonal].double() - ref[~diagonal]).abs().max().item() <= atol


def test_capture_with_spt_and_lsa_matches_reference_and_the_fused_forward() -> None:
    model = _sl_model()
    assert type(model.blocks[0].attn) is LocalitySelfAttention and model.blocks[0].attn.fused_attn
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(12))
    with torch.no_grad():
        out = capture_attention(model, images)
        fused = model(images)  # SDPA with the diagonal masked, not the capture's explicit softmax
        ref_class, ref_logits = reference_forward(copy.deepcopy(model).double(), images.double())
    assert token_layout(model).num_tokens == 65
    for idx, ref in enumerate(ref_logits):
        _assert_masked_logits_close(out.attn_logits[idx], ref, TOL)
        probs = out.attn_probs[idx]
        assert torch.equal(probs.diagonal(dim1=-2, dim2=-1), torch.zeros(3, 4, 65))  # exactly 0
        assert torch.allclose(probs.double(), ref.softmax(-1), atol=1e-6, rtol=0)
        assert torch.allclose(probs.sum(-1), torch.ones(3, 4, 65), atol=1e-6)
    assert ref_logits[0][torch.isfinite(ref_logits[0])].std() > 0.5
    assert (out.class_logits - ref_class).abs().max().item() <= TOL
    assert (out.class_logits - fused).abs().max().item() <= TOL


def test_lsa_capture_gradients_match_reference() -> None:
    """KL on captured LSA logits (with -inf diagonals) backprops like the reference, into qkv and the scale."""
    model = _sl_model(depth=2, drop_rate=0.0, proj_drop_rate=0.0)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(13))
    target = torch.randn(2, 4, 65, 65, generator=torch.Generator().manual_seed(14))
    params = [model.blocks[1].attn.qkv.weight, model.blocks[1].attn.logit_scale, model.patch_embed.proj.weight]

    out = capture_attention(model, images, [1])
    grads = torch.autograd.grad(attention_loss(out.attn_logits[1], target, "kl"), params)
    _, ref_logits = reference_forward(model, images)
    ref_grads = torch.autograd.grad(attention_loss(ref_logits[1], target, "kl"), params)
    for g, r in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all() and g.abs().max() > 0
        assert torch.allclose(g, r, atol=1e-6, rtol=1e-4)


def test_gradcheck_double_precision_with_spt_and_lsa() -> None:
    """Finite differences agree with autograd through an SL-ViT capture (inputs, a qkv weight, a learned scale)."""
    torch.manual_seed(0)
    model = build_model("cifar-student-sl", 3, img_size=8, embed_dim=8, depth=2, num_heads=2,
                        drop_rate=0.0, proj_drop_rate=0.0).double().eval()
    images = torch.randn(1, 3, 8, 8, dtype=torch.float64, requires_grad=True)

    def from_images(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = capture_attention(model, x, blocks=[1])
        return out.attn_probs[1], out.class_logits  # probs: the logits' -inf diagonal is not differentiable

    assert torch.autograd.gradcheck(from_images, (images,), eps=1e-6, atol=1e-5)
    wrapper = CaptureModule(model, blocks=[0, 1])
    for name in ("blocks.0.attn.qkv.weight", "blocks.0.attn.logit_scale", "patch_embed.proj.weight"):
        start = model.get_parameter(name).detach().clone().requires_grad_(True)

        def from_param(w: torch.Tensor, name: str = name) -> torch.Tensor:
            logits, attn = torch.func.functional_call(wrapper, {f"model.{name}": w}, (images.detach(),))
            return torch.cat([logits.flatten(), attn[1].masked_fill(attn[1] == -math.inf, 0.0).flatten()])

        assert torch.autograd.gradcheck(from_param, (start,), eps=1e-6, atol=1e-5), name


def test_thread_safety_matches_serial_with_lsa() -> None:
    """Two threads capturing on one shared SL-ViT give exactly the serial results, and leave it untouched."""
    model = _sl_model(depth=2)
    gen = torch.Generator().manual_seed(15)
    inputs = [torch.randn(2, 3, 32, 32, generator=gen) for _ in range(4)]
    blocks_for = [None, [0], [1], [0, 1]]

    def run(i: int) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        with torch.no_grad():
            out = capture_attention(model, inputs[i % 4], blocks_for[i % 4])
        return out.class_logits, out.attn_logits, out.attn_probs

    serial = [run(i) for i in range(4)]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(run, range(40)))
    for i, (logits, attn, probs) in enumerate(results):
        want_logits, want_attn, want_probs = serial[i % 4]
        assert torch.equal(logits, want_logits), i
        assert attn.keys() == want_attn.keys()
        for b in attn:
            assert torch.equal(attn[b], want_attn[b]) and torch.equal(probs[b], want_probs[b]), (i, b)
    assert not model._forward_hooks and not model._forward_pre_hooks
    assert all(p.grad is None for p in model.parameters())
