"""ViT presets and one builder; every model is a timm ``VisionTransformer`` (or subclass).

Presets named in ``DISTILLED_PRESETS`` build timm's ``VisionTransformerDistilled`` (DeiT): a
distillation token after CLS (two prefix tokens) and a second classifier head on it.

The keys in ``SL_KEYS`` (``spt``, ``lsa``; true or false) are read by ``build_model``, never passed to
timm: ``spt`` makes the patch embedding ``ShiftedPatchTokenization`` and ``lsa`` every block's
attention ``LocalitySelfAttention`` (SL-ViT, Lee et al. 2021; ``vitkd.sl_layers``). The ``-sl``
presets set both; any preset or timm name takes them as overrides.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import timm
import torch
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from .errors import ConfigError
from .sl_layers import LocalitySelfAttention, ShiftedPatchTokenization

__all__ = ["ModelConfig", "PRESETS", "DISTILLED_PRESETS", "build_model", "count_parameters", "describe_model",
           "model_config", "default_img_size", "has_distillation_token", "SL_KEYS"]

# Presets are data: keyword arguments for timm's VisionTransformer.
_SEED_COMMON = dict(img_size=32, patch_size=8, embed_dim=64, drop_rate=0.1, proj_drop_rate=0.1, qkv_bias=True)
_CIFAR_COMMON = dict(img_size=32, patch_size=4, drop_rate=0.1, proj_drop_rate=0.1, qkv_bias=True)
_NETTE_COMMON = dict(img_size=128, patch_size=16, drop_rate=0.1, proj_drop_rate=0.1, qkv_bias=True)
_CIFAR_STUDENT = MappingProxyType(dict(_CIFAR_COMMON, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0))
_NETTE_STUDENT = MappingProxyType(dict(_NETTE_COMMON, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0))

PRESETS: Mapping[str, Mapping[str, Any]] = MappingProxyType({
    # The method's CIFAR-100 pair: 32x32, 4x4 grid of 8x8 patches (16 patches + CLS), embed 64.
    # Depths are chosen so parameter counts match the reference 2.6M / 0.6M (100 classes).
    "seed-teacher": MappingProxyType(dict(_SEED_COMMON, depth=17, num_heads=8, mlp_ratio=1024 / 64)),
    "seed-student": MappingProxyType(dict(_SEED_COMMON, depth=7, num_heads=4, mlp_ratio=512 / 64)),
    # Bundled CIFAR-10 pair: patch 4 gives an 8x8 grid (64 patches + CLS) for richer maps.
    "cifar-teacher": MappingProxyType(dict(_CIFAR_COMMON, embed_dim=96, depth=6, num_heads=8, mlp_ratio=2.0)),
    "cifar-student": _CIFAR_STUDENT,
    # Bundled Imagenette pair: 128x128 photos, patch 16 gives the same 8x8 grid.
    "nette-teacher": MappingProxyType(dict(_NETTE_COMMON, embed_dim=96, depth=6, num_heads=8, mlp_ratio=2.0)),
    "nette-student": _NETTE_STUDENT,
    # SL-ViT versions of the CIFAR pair: same sizes, Shifted Patch Tokenization and Locality Self-Attention.
    "cifar-teacher-sl": MappingProxyType(dict(_CIFAR_COMMON, embed_dim=96, depth=6, num_heads=8, mlp_ratio=2.0,
                                              spt=True, lsa=True)),
    "cifar-student-sl": MappingProxyType(dict(_CIFAR_STUDENT, spt=True, lsa=True)),
    # DeiT students: the students above plus a distillation token and head (see DISTILLED_PRESETS).
    "cifar-student-deit": _CIFAR_STUDENT,
    "nette-student-deit": _NETTE_STUDENT,
})
# Presets built as timm's VisionTransformerDistilled. The preset name alone decides the class, so a
# checkpoint's recorded ModelConfig (name + overrides) rebuilds the same architecture.
DISTILLED_PRESETS: frozenset[str] = frozenset({"cifar-student-deit", "nette-student-deit"})
# Preset keys and overrides build_model turns into layers (SL-ViT); see the module docstring.
SL_KEYS: tuple[str, ...] = ("spt", "lsa")


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model: a preset or timm name plus keyword overrides.

    Args:
        name: a key of ``PRESETS`` or any timm ViT-family model name.
        num_classes: size of the classifier head.
        img_size: input resolution; None keeps the preset's or timm's default.
        overrides: extra ``VisionTransformer`` keyword arguments (e.g. ``depth``, ``reg_tokens``), and
            ``spt``/``lsa`` (booleans, see ``SL_KEYS``).
    """

    name: str
    num_classes: int
    img_size: int | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelConfig:
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ConfigError(f"unknown model config keys {sorted(unknown)}")
        return cls(**dict(data))


def build_model(
    name: str | ModelConfig,
    num_classes: int | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
    **overrides: Any,
) -> VisionTransformer:
    """Build a preset or timm ViT. ``pretrained`` downloads weights (needs a network).

    ``spt=True``/``lsa=True`` (in a preset or as overrides) swap in SL-ViT's layers; see ``SL_KEYS``.
    """
    if isinstance(name, ModelConfig):
        config = name
    else:
        if num_classes is None:
            raise ConfigError("build_model needs num_classes")
        config = ModelConfig(name=name, num_classes=num_classes, img_size=img_size, overrides=dict(overrides))
    kwargs: dict[str, Any] = dict(config.overrides)
    kwargs["num_classes"] = config.num_classes
    if config.name in PRESETS:
        if pretrained:
            raise ConfigError(f"preset {config.name!r} has no pretrained weights; drop --pretrained")
        preset = dict(PRESETS[config.name])
        if config.img_size is not None:
            preset["img_size"] = config.img_size
        preset.update(kwargs)
        _use_sl_layers(preset, config.name)
        model_cls = VisionTransformerDistilled if config.name in DISTILLED_PRESETS else VisionTransformer
        try:
            model = model_cls(**preset)
        except (TypeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"cannot build preset {config.name!r} with {kwargs}: {exc}") from exc
    else:
        if config.img_size is not None:
            kwargs["img_size"] = config.img_size
        if _use_sl_layers(kwargs, config.name) and pretrained:
            raise ConfigError(f"{config.name!r} has no pretrained weights for spt/lsa layers; drop --pretrained "
                              "or the spt/lsa overrides")
        try:
            model = timm.create_model(config.name, pretrained=pretrained, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError(
                    f"unknown model {config.name!r}: use a preset ({', '.join(PRESETS)}) or a timm ViT name"
                ) from exc
            raise
        except (TypeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"cannot build timm model {config.name!r} with {kwargs}: {exc}") from exc
        if not isinstance(model, VisionTransformer):
            raise ConfigError(
                f"{config.name!r} builds a {type(model).__name__}, not a timm VisionTransformer; "
                "vitkd reads attention from VisionTransformer-family models only"
            )
    model.vitkd_config = config  # type: ignore[attr-defined]  # recorded for checkpoints
    return model


def _use_sl_layers(kwargs: dict[str, Any], name: str) -> bool:
    """Replace the ``spt``/``lsa`` keys of ``kwargs`` by timm's ``embed_layer``/``attn_layer``; True if any is on."""
    flags = {key: kwargs.pop(key, False) for key in SL_KEYS}
    for key, value in flags.items():
        if not isinstance(value, bool):
            raise ConfigError(f"model override {key!r} must be true or false, got {value!r}")
    clashes = {"spt": "embed_layer", "lsa": "attn_layer"}
    for key, layer_arg in clashes.items():
        if flags[key] and layer_arg in kwargs:
            raise ConfigError(f"{name!r}: {key}=true sets {layer_arg}; drop one of them")
    if flags["spt"]:
        if kwargs.get("dynamic_img_size"):
            raise ConfigError(f"{name!r}: spt=true needs a fixed input size; drop dynamic_img_size")
        kwargs["embed_layer"] = ShiftedPatchTokenization
    if flags["lsa"]:
        kwargs["attn_layer"] = LocalitySelfAttention
    return flags["spt"] or flags["lsa"]


def model_config(model: torch.nn.Module) -> ModelConfig:
    """The ``ModelConfig`` a model was built from (raises if it was not built by ``build_model``)."""
    config = getattr(model, "vitkd_config", None)
    if config is None:
        raise ConfigError(f"{type(model).__name__} was not built by vitkd.models.build_model")
    return config


def has_distillation_token(model: torch.nn.Module) -> bool:
    """True for timm's ``VisionTransformerDistilled`` (DeiT): CLS and distillation tokens, two heads.

    In training mode with ``model.set_distilled_training(True)`` its forward returns
    ``(class head logits, distillation head logits)``; otherwise the mean of the two heads.
    """
    return isinstance(model, VisionTransformerDistilled)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def describe_model(model: VisionTransformer) -> dict[str, Any]:
    """A small JSON-able summary: what a user needs to compare two models at a glance."""
    grid = tuple(model.patch_embed.grid_size)
    return {
        "parameters": count_parameters(model),
        "blocks": len(model.blocks),
        "heads": model.blocks[0].attn.num_heads,
        "embed_dim": model.embed_dim,
        "grid": list(grid),
        "num_prefix_tokens": model.num_prefix_tokens,
        "tokens": model.num_prefix_tokens + grid[0] * grid[1],
        "img_size": list(model.patch_embed.img_size),
        "patch_size": list(model.patch_embed.patch_size),
        "num_classes": model.num_classes,
        "distillation_token": has_distillation_token(model),
        "spt": isinstance(model.patch_embed, ShiftedPatchTokenization),
        "lsa": any(isinstance(blk.attn, LocalitySelfAttention) for blk in model.blocks),
    }


def default_img_size(name: str) -> int:
    """The input size a preset or timm model is built for when no ``img_size`` is given."""
    if name in PRESETS:
        return int(PRESETS[name]["img_size"])
    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        raise ConfigError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a timm ViT name")
    return int(cfg.input_size[-1])
