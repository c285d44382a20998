"""ViT presets and one builder; every model is a timm ``VisionTransformer`` (or subclass).

Presets named in ``DISTILLED_PRESETS`` build timm's ``VisionTransformerDistilled`` (DeiT): a
distillation token after CLS (two prefix tokens) and a second classifier head on it.

The keys in ``SL_KEYS`` (``spt``, ``lsa``; true or false) are read by ``build_model``, never passed to
timm: ``spt`` makes the patch embedding ``ShiftedPatchTokenization`` and ``lsa`` every block's
attention ``LocalitySelfAttention`` (SL-ViT, Lee et al. 2021; ``vitkd.sl_layers``). The ``-sl``
presets set both; any preset or timm name takes them as overrides.

``--model`` spells a timm model ``timm:NAME`` (or bare ``NAME``); ``ModelConfig`` records the bare
name. Architecture overrides (``ARCHITECTURE_KEYS``, the one list ``vitkd.checkpoint`` also
whitelists) come as ``KEY=VALUE`` text, parsed by ``parse_model_overrides`` for the CLI and the app.
A timm model may start from a local timm weights file (``pretrained_file``), loaded by timm itself.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import VisionTransformer

from .errors import ConfigError
from .sl_layers import LocalitySelfAttention, ShiftedPatchTokenization

__all__ = ["ModelConfig", "PRESETS", "DISTILLED_PRESETS", "build_model", "count_parameters", "describe_model",
           "model_config", "default_img_size", "has_distillation_token", "SL_KEYS", "ARCHITECTURE_KEYS",
           "OVERRIDE_LIMITS", "TIMM_PREFIX", "resolve_model_name", "parse_model_overrides", "format_model_overrides",
           "check_model_overrides", "WEIGHT_FILE_SUFFIXES", "default_norm_stats", "UNRECORDED_NORM"]

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
# The model overrides a run may set and a checkpoint may record: timm ``VisionTransformer`` architecture arguments
# (plain JSON values) and vitkd's own ``SL_KEYS``. Loader arguments (``checkpoint_path``, ``pretrained``,
# ``pretrained_cfg``, ``cache_dir``, ...) and layer classes (``embed_layer``, ``block_fn``, ...) never are:
# ``vitkd.checkpoint`` refuses metadata naming them, so a checkpoint never makes timm open a file.
ARCHITECTURE_KEYS: frozenset[str] = frozenset({
    "img_size", "patch_size", "in_chans", "num_classes", "global_pool", "embed_dim", "depth", "num_heads",
    "mlp_ratio", "qkv_bias", "qk_norm", "scale_attn_norm", "scale_mlp_norm", "proj_bias", "init_values",
    "class_token", "pos_embed", "no_embed_class", "reg_tokens", "pre_norm", "final_norm", "fc_norm",
    "pool_include_prefix", "dynamic_img_size", "dynamic_img_pad", "drop_rate", "pos_drop_rate", "patch_drop_rate",
    "proj_drop_rate", "attn_drop_rate", "drop_path_rate", *SL_KEYS,
})
# Architecture keys a run sets elsewhere: an override would disagree with the data or --img-size.
_SET_ELSEWHERE: Mapping[str, str] = MappingProxyType({
    "num_classes": "the number of classes comes from the data", "img_size": "use --img-size"})
# Upper bounds on the sizes a run may ask for, far above timm's largest ViTs (vit_gigantic: depth 48,
# embed 1664, 16 heads): every run builds its model once on the meta device to check it, in the
# app's server too, and that costs time per block.
OVERRIDE_LIMITS: Mapping[str, int] = MappingProxyType({
    "depth": 64, "embed_dim": 8192, "num_heads": 256, "reg_tokens": 256, "in_chans": 64})
TIMM_PREFIX = "timm:"
# Weight files ``pretrained_file`` reads: safetensors, or a torch pickle loaded with ``weights_only=True``.
WEIGHT_FILE_SUFFIXES: tuple[str, ...] = (".safetensors", ".pth", ".pt", ".bin")
_JSON_SCALARS = (bool, int, float, str, type(None))
# Items of "patch_size=8, depth=2" end at a comma followed by the next KEY=; JSON lists keep their commas.
_OVERRIDE_SEPARATOR = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_]*\s*=)")


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


def resolve_model_name(name: str) -> str:
    """The preset or timm registry name behind a ``--model`` spelling: ``timm:NAME`` forces timm, bare names stay."""
    if not name.startswith(TIMM_PREFIX):
        return name
    bare = name[len(TIMM_PREFIX):].strip()
    if not bare:
        raise ConfigError(f"{name!r} names no model: spell a timm model timm:NAME, e.g. timm:vit_tiny_patch16_224")
    if bare in PRESETS:
        raise ConfigError(f"{bare!r} is a vitkd preset, not a timm model: drop the {TIMM_PREFIX!r} prefix")
    return bare


def check_model_overrides(overrides: Mapping[str, Any]) -> None:
    """Refuse keys outside ``ARCHITECTURE_KEYS`` (or set elsewhere) and values that are not plain JSON.

    The same rule a checkpoint's metadata must pass, so every run's checkpoint can be loaded again.
    """
    for key, value in overrides.items():
        if key in _SET_ELSEWHERE:
            raise ConfigError(f"model override {key!r} is not allowed: {_SET_ELSEWHERE[key]}")
        if key not in ARCHITECTURE_KEYS:
            raise ConfigError(f"unknown model override {key!r}: use an architecture argument, one of "
                              f"{', '.join(sorted(ARCHITECTURE_KEYS - set(_SET_ELSEWHERE)))}")
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _JSON_SCALARS) for v in items):
            raise ConfigError(f"model override {key}={value!r} is not a number, true/false, a string or a list")
        limit = OVERRIDE_LIMITS.get(key)
        if limit is not None and isinstance(value, int) and not isinstance(value, bool) and not 0 <= value <= limit:
            raise ConfigError(f"model override {key}={value} is out of range: 0 to {limit}, far above any ViT "
                              "timm ships (checking a model that size would tie up the process)")


def parse_model_overrides(items: str | Iterable[str]) -> dict[str, Any]:
    """``KEY=VALUE`` overrides (repeated ``--model-override``, or the app's "patch_size=8, depth=2") as a dict.

    VALUE is read as JSON when it parses (``8``, ``0.1``, ``true``, ``[16, 8]``), else kept as a string
    (``global_pool=avg``). Keys are checked by ``check_model_overrides``; whether the values build a
    model is ``build_model``'s to say.
    """
    texts = [items] if isinstance(items, str) else list(items)
    overrides: dict[str, Any] = {}
    for text in texts:
        for item in _OVERRIDE_SEPARATOR.split(text.strip()):
            if not item.strip():
                continue
            key, sep, raw = (part.strip() for part in item.partition("="))
            if not sep or not key:
                raise ConfigError(f"model override {item.strip()!r} is not KEY=VALUE (e.g. patch_size=8)")
            if key in overrides:
                raise ConfigError(f"model override {key!r} is given twice; keep one")
            try:
                overrides[key] = json.loads(raw)
            except json.JSONDecodeError:
                overrides[key] = raw
    check_model_overrides(overrides)
    return overrides


def format_model_overrides(overrides: Mapping[str, Any]) -> list[str]:
    """``KEY=VALUE`` items that ``parse_model_overrides`` reads back as ``overrides`` (for command lines)."""
    items = []
    for key, value in overrides.items():
        text = json.dumps(value)
        if isinstance(value, str):
            try:
                json.loads(value)
            except json.JSONDecodeError:
                text = value  # a plain word stays unquoted: global_pool=avg
        items.append(f"{key}={text}")
    return items


def build_model(
    name: str | ModelConfig,
    num_classes: int | None = None,
    img_size: int | None = None,
    pretrained: bool = False,
    pretrained_file: str | Path | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Build a preset or timm ViT (``NAME`` or ``timm:NAME``).

    Weights for a timm model: ``pretrained`` downloads timm's (needs a network); ``pretrained_file``
    loads a local timm weights file through timm (``WEIGHT_FILE_SUFFIXES``), its classifier head
    re-initialised when the file's class count differs. Under ``torch.device("meta")`` only the
    file's shapes are checked, none of its tensors read. ``spt=True``/``lsa=True`` (in a preset or as
    overrides) swap in SL-ViT's layers; see ``SL_KEYS``.
    """
    if isinstance(name, ModelConfig):
        config = dataclasses.replace(name, name=resolve_model_name(name.name))
    else:
        if num_classes is None:
            raise ConfigError("build_model needs num_classes")
        config = ModelConfig(name=resolve_model_name(name), num_classes=num_classes, img_size=img_size,
                             overrides=dict(overrides))
    if pretrained and pretrained_file is not None:
        raise ConfigError("--pretrained downloads timm's weights and --pretrained-file reads a local file: pass one")
    kwargs: dict[str, Any] = dict(config.overrides)
    kwargs["num_classes"] = config.num_classes
    if config.name in PRESETS:
        if pretrained or pretrained_file is not None:
            raise ConfigError(f"preset {config.name!r} has no pretrained weights; drop --pretrained/--pretrained-file "
                              "or pick a timm model (timm:NAME)")
        preset = dict(PRESETS[config.name])
        if config.img_size is not None:
            preset["img_size"] = config.img_size
        preset.update(kwargs)
        _use_sl_layers(preset, config.name)
        model_cls = VisionTransformerDistilled if config.name in DISTILLED_PRESETS else VisionTransformer
        try:
            model = model_cls(**preset)
        except (TypeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"cannot build preset {config.name!r} with overrides {config.overrides}: {exc}; "
                              "change the override it names (--model-override)") from exc
    else:
        if config.img_size is not None:
            kwargs["img_size"] = config.img_size
        if _use_sl_layers(kwargs, config.name) and pretrained:
            raise ConfigError(f"{config.name!r} has no pretrained weights for spt/lsa layers; drop --pretrained "
                              "or the spt/lsa overrides")
        weights = _FileWeights(config.name, Path(pretrained_file)) if pretrained_file is not None else None
        load = weights.create_kwargs() if weights is not None else {"pretrained": pretrained}
        try:
            model = timm.create_model(config.name, **load, **kwargs)
        except RuntimeError as exc:
            if "Unknown model" in str(exc):
                raise ConfigError(
                    f"unknown model {config.name!r}: use a preset ({', '.join(PRESETS)}) or a timm ViT name"
                ) from exc
            if weights is not None:
                raise weights.mismatch(config, _first_detail(exc)) from exc
            if pretrained:
                raise ConfigError(f"timm's pretrained weights for {config.name!r} do not fit this model "
                                  f"({_first_detail(exc)}): drop the model overrides or --pretrained") from exc
            raise
        except OSError as exc:
            if pretrained:
                raise ConfigError(f"cannot download timm's pretrained weights for {config.name!r} "
                                  f"({type(exc).__name__}): no network? Offline, pass a local timm weights file "
                                  "with --pretrained-file PATH") from exc
            raise
        except (TypeError, AssertionError, ValueError) as exc:
            raise ConfigError(f"cannot build timm model {config.name!r} with overrides {config.overrides}: {exc}; "
                              "change the override it names (--model-override)") from exc
        if not isinstance(model, VisionTransformer):
            raise ConfigError(
                f"{config.name!r} builds a {type(model).__name__}, not a timm VisionTransformer; "
                "vitkd reads attention from VisionTransformer-family models only"
            )
        if weights is not None:
            weights.check_keys(model, config)
    model.vitkd_config = config  # type: ignore[attr-defined]  # recorded for checkpoints
    return model


def _first_detail(exc: BaseException) -> str:
    """The first line that says what went wrong in a multi-line error (``load_state_dict``'s), plus a count."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    details = lines[1:] if len(lines) > 1 and lines[0].endswith(":") else lines
    if not details:
        return type(exc).__name__
    first = details[0] if len(details[0]) <= 240 else details[0][:240] + "..."  # load_state_dict lists every key
    return first + (f" (and {len(details) - 1} more)" if len(details) > 1 else "")


def _names(keys: list[str]) -> str:
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


class _FileWeights:
    """A local timm weights file for ``timm.create_model``: timm loads it, vitkd checks it fits.

    timm re-initialises the classifier when ``pretrained_cfg["num_classes"]`` differs from the
    model's, so the overlay states the file's own class count (its classifier's rows). timm then
    loads non-strictly and would leave any other missing tensor at random: ``check_keys`` refuses
    those, and tensors the model has no place for.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name, self.path = name, path
        self.skeleton = _weights_skeleton(path)
        cfg = timm.get_pretrained_cfg(name)
        classifier = (cfg.classifier if cfg is not None else None) or "head"
        self.classifier = (classifier,) if isinstance(classifier, str) else tuple(classifier)
        head = self.skeleton.get(f"{self.classifier[0]}.weight")
        self.file_classes = int(head.shape[0]) if head is not None and head.ndim == 2 else 0

    def create_kwargs(self) -> dict[str, Any]:
        """On the meta device timm loads the file's shapes (meta tensors); otherwise it reads the file."""
        source: dict[str, Any] = ({"state_dict": dict(self.skeleton)} if torch.get_default_device().type == "meta"
                                  else {"file": str(self.path)})
        return {"pretrained": True, "pretrained_cfg_overlay": dict(source, num_classes=self.file_classes)}

    def mismatch(self, config: ModelConfig, detail: str) -> ConfigError:
        built = f"{config.name} with {config.overrides}" if config.overrides else config.name
        return ConfigError(f"--pretrained-file {self.path.name} does not fit {built} ({detail}): build the "
                           "architecture the file was saved from (same model and --model-override values)")

    def check_keys(self, model: torch.nn.Module, config: ModelConfig) -> None:
        model_keys, file_keys = set(model.state_dict()), set(self.skeleton)
        reinitialised = ({f"{c}.{p}" for c in self.classifier for p in ("weight", "bias")}
                         if self.file_classes != config.num_classes else set())
        missing = sorted(model_keys - file_keys - reinitialised)
        unexpected = sorted(file_keys - model_keys)
        if missing or unexpected:
            parts = ([f"the file lacks {_names(missing)}"] if missing else []) + \
                    ([f"the model has no {_names(unexpected)}"] if unexpected else [])
            raise self.mismatch(config, "; ".join(parts))


def _weights_skeleton(path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors as ``meta`` tensors (names and shapes only), the way timm's loader names them."""
    if not path.is_file():
        raise ConfigError(f"--pretrained-file {path}: no such file")
    if path.suffix not in WEIGHT_FILE_SUFFIXES:
        raise ConfigError(f"--pretrained-file {path.name}: not a weights file; use one of "
                          f"{', '.join(WEIGHT_FILE_SUFFIXES)}")
    try:
        if path.suffix == ".safetensors":  # the header alone: no tensor is read
            with safe_open(str(path), framework="pt") as handle:
                state = {key: torch.empty(handle.get_slice(key).get_shape(), device="meta")
                         for key in handle.keys()}  # noqa: SIM118 - not a dict
            state = timm.models.clean_state_dict(state)
        else:  # timm's loader: weights_only unpickling, unwrapping "state_dict"/"model" as it does
            state = timm.models.load_state_dict(str(path), device="meta", weights_only=True)
    except (SafetensorError, OSError, RuntimeError, ValueError, KeyError, EOFError, AttributeError) as exc:
        raise ConfigError(f"--pretrained-file {path.name}: not a readable weights file "
                          f"({_first_detail(exc)})") from exc
    if not isinstance(state, Mapping):
        raise ConfigError(f"--pretrained-file {path.name}: holds no state dict of tensors")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ConfigError(f"--pretrained-file {path.name}: holds no tensors")
    return tensors


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


UNRECORDED_NORM: tuple[float, float, float] = (0.5, 0.5, 0.5)  # timm's VisionTransformer mean and std


def default_norm_stats(name: str | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """timm's input mean and std for a model name (its pretrained config's); ``UNRECORDED_NORM`` for a
    preset or a name timm has no config for. What a checkpoint without recorded statistics is fed."""
    if isinstance(name, str) and name not in PRESETS:
        try:
            cfg = timm.get_pretrained_cfg(name)
        except (RuntimeError, ValueError, TypeError, AttributeError):
            cfg = None
        mean, std = getattr(cfg, "mean", None), getattr(cfg, "std", None)
        if mean is not None and std is not None and len(mean) == 3 and len(std) == 3:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return UNRECORDED_NORM, UNRECORDED_NORM


def default_img_size(name: str) -> int:
    """The input size a preset or timm model is built for when no ``img_size`` is given."""
    name = resolve_model_name(name)
    if name in PRESETS:
        return int(PRESETS[name]["img_size"])
    try:
        cfg = timm.get_pretrained_cfg(name)
    except RuntimeError:
        cfg = None
    if cfg is None:
        raise ConfigError(f"unknown model {name!r}: use a preset ({', '.join(PRESETS)}) or a timm ViT name")
    return int(cfg.input_size[-1])
