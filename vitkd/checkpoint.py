"""One checkpoint format: a ``.safetensors`` file of weights plus vitkd JSON metadata in its header.

Files are never unpickled. Training state for ``--resume`` (optimizer, step, RNG) is a
second safetensors file beside the checkpoint, written the same atomic way.

Metadata is hostile until checked. ``checkpoint_model_config`` passes on only architecture keys
(``ARCHITECTURE_KEYS``, defined in ``vitkd.models``: the list ``--model-override`` is checked against too),
never a loader argument such as timm's ``checkpoint_path``.
``load_checkpoint`` compares the architecture with the file before allocating anything: the
depth with the blocks the header holds, then every parameter shape of the model built on the
``meta`` device with the header's shapes (``safe_open(...).get_slice(name).get_shape()``); only a
model that matches is built for real and loaded.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError, ConfigError
from .files import atomic_target
from .headmap import HeadMap
from .models import _JSON_SCALARS, ARCHITECTURE_KEYS, PRESETS, ModelConfig, _names, build_model, model_config

__all__ = ["FORMAT_VERSION", "ARCHITECTURE_KEYS", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
           "checkpoint_model_config", "checkpoint_architecture", "save_training_state", "load_training_state",
           "read_training_state_epoch"]

FORMAT_VERSION = 1
MAX_RECORDED_IMG_SIZE = 4096  # far above any ViT's input; a larger recorded size only costs memory downstream
# One image's attention maps, every block and head (4 GiB in float32): ViT-L/14 at 518 px needs 0.72e9.
# The app holds them all for rollout, so a small file claiming a huge grid or many heads is refused.
MAX_ATTENTION_VALUES = 2**30
_META_KEY = "vitkd"
_TIMM_NAME = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")  # a registry name with an optional tag, no source prefix
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def save_checkpoint(model: torch.nn.Module, meta: dict[str, Any], path: str | Path) -> Path:
    """Save weights and ``meta`` (JSON-able; the model's config is added) atomically to ``path``."""
    path = Path(path)
    full_meta = dict(meta)
    full_meta["format_version"] = FORMAT_VERSION
    full_meta["model"] = model_config(model).to_dict()
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model.state_dict().items()}
    _atomic_save(tensors, path, {_META_KEY: json.dumps(full_meta)})
    return path


def read_checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """The metadata of a vitkd checkpoint without loading its weights."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc
    if _META_KEY not in header:
        raise CheckpointError(f"{path}: a safetensors file without vitkd metadata (not a vitkd checkpoint)")
    try:
        meta = json.loads(header[_META_KEY])
    except (json.JSONDecodeError, RecursionError) as exc:  # deep nesting exhausts the parser's stack
        raise CheckpointError(f"{path}: vitkd metadata is not valid JSON ({type(exc).__name__})") from exc
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: vitkd metadata has no model config")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this vitkd reads {FORMAT_VERSION}")
    _check_recorded_fields(meta, path)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_recorded_fields(meta: Mapping[str, Any], path: Path) -> None:
    """The fields the app, ``eval`` and training read beside the model config, checked for type and range.

    Every reader can then use them as they are: a hostile header fails here, as one
    ``CheckpointError`` line, instead of as a ``TypeError`` (or a 100,000-pixel resize) far away.
    Absent (or null) fields stay allowed: older checkpoints and timm exports lack some.
    """
    def bad(key: str, expected: str) -> CheckpointError:
        return CheckpointError(f"{path}: metadata field {key!r} is {meta[key]!r:.80}, not {expected}")

    def present(key: str) -> bool:
        return meta.get(key) is not None

    if present("img_size") and not (_is_int(meta["img_size"]) and 1 <= meta["img_size"] <= MAX_RECORDED_IMG_SIZE):
        raise bad("img_size", f"a size in pixels (1-{MAX_RECORDED_IMG_SIZE})")
    if present("class_names") and not (isinstance(meta["class_names"], list) and meta["class_names"]
                                       and all(isinstance(n, str) for n in meta["class_names"])):
        raise bad("class_names", "a non-empty list of names")
    for key in ("mean", "std"):
        if present(key) and not (isinstance(meta[key], list) and len(meta[key]) == 3
                                 and all(_is_number(v) for v in meta[key])):
            raise bad(key, "3 finite numbers (one per RGB channel)")
    if present("std") and min(meta["std"]) <= 0:
        raise bad("std", "3 positive numbers")
    for key in ("epoch", "parameters"):
        if present(key) and not (_is_int(meta[key]) and meta[key] >= 0):
            raise bad(key, "a count")
    for key in ("kind", "data"):
        if present(key) and not isinstance(meta[key], str):
            raise bad(key, "a string")
    for key in ("model", "metrics", "teacher", "train_config"):
        if present(key) and not isinstance(meta[key], dict):
            raise bad(key, "a mapping")
    _check_model_record(meta.get("model") or {}, "model", path)
    teacher = meta.get("teacher") or {}
    if teacher.get("path") is not None and not isinstance(teacher["path"], str):
        raise CheckpointError(f"{path}: metadata teacher.path is {teacher['path']!r:.80}, not a string")
    if teacher.get("accuracy") is not None and not _is_number(teacher["accuracy"]):
        raise CheckpointError(f"{path}: metadata teacher.accuracy is {teacher['accuracy']!r:.80}, not a number")
    if teacher.get("model") is not None:
        if not isinstance(teacher["model"], dict):
            raise CheckpointError(f"{path}: metadata teacher.model is {teacher['model']!r:.80}, not a mapping")
        _check_model_record(teacher["model"], "teacher.model", path)
    accuracy = (meta.get("metrics") or {}).get("accuracy")
    if accuracy is not None and not _is_number(accuracy):
        raise CheckpointError(f"{path}: metadata records accuracy {accuracy!r:.80}, not a number")
    config = meta.get("train_config") or {}
    for key in ("alpha", "kd_weight", "kd_temperature"):
        if config.get(key) is not None and not _is_number(config[key]):
            raise CheckpointError(f"{path}: metadata train_config.{key} is {config[key]!r:.80}, not a number")
    for key in ("loss", "gate", "weighting", "kd"):
        if config.get(key) is not None and not isinstance(config[key], str):
            raise CheckpointError(f"{path}: metadata train_config.{key} is {config[key]!r:.80}, not a string")
    if config.get("head_map") is not None and not isinstance(config["head_map"], str):  # the spec as typed
        raise CheckpointError(f"{path}: metadata train_config.head_map is {config['head_map']!r:.80}, not a string")
    if present("head_map"):  # the resolved rows
        if not isinstance(meta["head_map"], list):
            raise bad("head_map", "a list of head-map rows")
        try:
            HeadMap.from_list(meta["head_map"])
        except ConfigError as exc:
            raise CheckpointError(f"{path}: metadata head_map is not a head map ({exc})") from exc


def _check_model_record(record: Mapping[str, Any], field: str, path: Path) -> None:
    """A recorded model config's fields that listings show before anything is built (name, overrides, sizes)."""
    checks = (("name", lambda v: isinstance(v, str), "a model name"),
              ("overrides", lambda v: isinstance(v, dict), "a mapping"),
              ("num_classes", lambda v: _is_int(v) and v >= 0, "a count"),
              ("img_size", lambda v: _is_int(v) and 1 <= v <= MAX_RECORDED_IMG_SIZE,
               f"a size in pixels (1-{MAX_RECORDED_IMG_SIZE})"))
    for key, valid, expected in checks:
        if record.get(key) is not None and not valid(record[key]):
            raise CheckpointError(f"{path}: metadata {field}.{key} is {record[key]!r:.80}, not {expected}")


def checkpoint_model_config(meta: Mapping[str, Any], path: str | Path = "checkpoint") -> ModelConfig:
    """The ``ModelConfig`` a checkpoint's metadata records, with only architecture keys (``CheckpointError`` else).

    The name must be a preset or a timm registry name (no ``hf-hub:``/``local-dir:`` source), the
    overrides ``ARCHITECTURE_KEYS`` with JSON scalar (or list of scalars) values: a checkpoint never
    makes ``build_model`` read a file, download or import anything.
    """
    record = meta.get("model")
    if not isinstance(record, Mapping):
        raise CheckpointError(f"{path}: vitkd metadata has no model config")
    try:
        config = ModelConfig.from_dict(record)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot rebuild model from its metadata ({exc})") from exc
    name = config.name
    if not isinstance(name, str) or not (name in PRESETS or (_TIMM_NAME.fullmatch(name) and timm.is_model(name))):
        raise CheckpointError(f"{path}: metadata names model {name!r}, which is neither a vitkd preset nor a timm "
                              "model name; refusing to build it")
    if not isinstance(config.num_classes, int) or isinstance(config.num_classes, bool) or config.num_classes < 0:
        raise CheckpointError(f"{path}: metadata records num_classes {config.num_classes!r}, not a count")
    if config.img_size is not None and (not isinstance(config.img_size, int) or isinstance(config.img_size, bool)):
        raise CheckpointError(f"{path}: metadata records img_size {config.img_size!r}, not a size in pixels")
    if not isinstance(config.overrides, Mapping):
        raise CheckpointError(f"{path}: metadata model overrides are {type(config.overrides).__name__}, not a mapping")
    refused = sorted(str(k) for k in config.overrides if k not in ARCHITECTURE_KEYS)
    if refused:
        raise CheckpointError(f"{path}: metadata model overrides {refused} are not architecture arguments "
                              "(depth, embed_dim, num_heads, ...: vitkd.checkpoint.ARCHITECTURE_KEYS); refusing to "
                              "build it")
    for key, value in config.overrides.items():
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, _JSON_SCALARS) for v in items):
            raise CheckpointError(f"{path}: metadata model override {key}={value!r} is not a plain value")
    return config


def _header_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from the safetensors header (no tensor data is read)."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _mismatch(path: Path, detail: str) -> CheckpointError:
    return CheckpointError(f"{path}: weights do not match the recorded architecture ({detail})")


def _recorded_depth(config: ModelConfig) -> int | None:
    """The depth the metadata asks for, when it says (an override or a preset's); None leaves timm's default."""
    depth = config.overrides.get("depth", PRESETS[config.name].get("depth") if config.name in PRESETS else None)
    return depth if isinstance(depth, int) and not isinstance(depth, bool) else None


def checkpoint_architecture(path: str | Path, meta: Mapping[str, Any] | None = None) -> torch.nn.Module:
    """The checkpoint's model on the ``meta`` device (no memory), checked against the file's header.

    Refused with one ``CheckpointError`` line, before anything is allocated: overrides that are not
    architecture keys, a depth other than the number of blocks the file holds (checked before the
    model is even built, so an absurd depth costs nothing), a model with more parameters than the
    file has bytes, and missing, unexpected or differently shaped tensors.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path) if meta is None else meta
    config = checkpoint_model_config(meta, path)
    shapes = _header_shapes(path)
    file_blocks = {int(m.group(1)) for name in shapes if (m := _BLOCK_KEY.match(name))}
    depth = _recorded_depth(config)
    if depth is not None and depth != len(file_blocks):
        raise _mismatch(path, f"the metadata asks for depth {depth}, the file holds weights for "
                              f"{len(file_blocks)} blocks")
    try:  # weights are compared, not used: timm's initialisation is skipped
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_model(dataclasses.replace(config, overrides=dict(config.overrides, weight_init="skip")))
    except Exception as exc:  # any failure to build from recorded metadata is the file's problem
        raise CheckpointError(f"{path}: cannot rebuild model from its metadata ({exc})") from exc
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    model_values, size = sum(math.prod(shape) for shape in expected.values()), path.stat().st_size
    if model_values > size:  # not even one byte per value: absurd, whatever the keys say
        raise _mismatch(path, f"the metadata describes {model_values:,} parameters but the file is only "
                              f"{size:,} bytes")
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        parts = ([f"missing {_names(missing)}"] if missing else []) + \
                ([f"unexpected {_names(unexpected)}"] if unexpected else [])
        raise _mismatch(path, "; ".join(parts))
    wrong = [f"{name} is {list(shapes[name])} in the file, {list(shape)} in the model"
             for name, shape in expected.items() if shapes[name] != shape]
    if wrong:
        raise _mismatch(path, _names(wrong))
    _check_fields_fit_model(meta, model, path)
    return model


def _check_fields_fit_model(meta: Mapping[str, Any], model: torch.nn.Module, path: Path) -> None:
    """The recorded input size and class names describe this model (the app resizes and labels by them)."""
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes < 1:
        raise CheckpointError(f"{path}: the model has no classifier (num_classes {num_classes}); vitkd compares "
                              "predictions, so it needs one")
    names = meta.get("class_names")
    if names is not None and num_classes is not None and len(names) != num_classes:
        raise CheckpointError(f"{path}: metadata names {len(names)} classes but the model predicts {num_classes}")
    patch_embed = getattr(model, "patch_embed", None)
    model_size = getattr(patch_embed, "img_size", None)
    recorded = meta.get("img_size")
    if recorded is not None and model_size is not None and recorded != model_size[0]:
        raise CheckpointError(f"{path}: metadata records input size {recorded} px but the model takes "
                              f"{model_size[0]} px")
    if model_size is not None and max(model_size) > MAX_RECORDED_IMG_SIZE:
        raise CheckpointError(f"{path}: the model takes {max(model_size)} px images, more than vitkd resizes "
                              f"uploads to ({MAX_RECORDED_IMG_SIZE} px)")
    grid = getattr(patch_embed, "grid_size", None)
    if grid is not None:
        tokens = int(grid[0]) * int(grid[1]) + int(getattr(model, "num_prefix_tokens", 0))
        heads = sum(int(getattr(getattr(b, "attn", None), "num_heads", 0)) for b in getattr(model, "blocks", ()))
        if tokens * tokens * heads > MAX_ATTENTION_VALUES:
            raise CheckpointError(f"{path}: one image's attention maps would hold {tokens * tokens * heads:,} values "
                                  f"({tokens} tokens, {heads} heads over all blocks), more than the "
                                  f"{MAX_ATTENTION_VALUES:,} vitkd analyses at once")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from the metadata, load the weights; returns ``(model in eval mode, meta)``.

    The architecture is checked against the file on the ``meta`` device first
    (``checkpoint_architecture``); only then is the model allocated.
    """
    path = Path(path)
    meta = read_checkpoint_meta(path)
    checkpoint_architecture(path, meta)
    config = checkpoint_model_config(meta, path)
    try:
        model = build_model(config)
    except Exception as exc:
        raise CheckpointError(f"{path}: cannot rebuild model from its metadata ({exc})") from exc
    try:
        state = load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: weights are corrupt or truncated ({exc})") from exc
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not match the recorded architecture ({exc})") from exc
    return model.to(device).eval(), meta


def _flatten(prefix: str, value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move tensors out of a nested structure into ``tensors``; what is left is JSON."""
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": key}
    if isinstance(value, dict):
        return {"__dict__": [[_flatten(prefix, k, tensors), _flatten(prefix, v, tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_flatten(prefix, v, tensors) for v in value]
    return value


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict) and "__tensor__" in value:
        return tensors[value["__tensor__"]]
    if isinstance(value, dict) and "__dict__" in value:
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_training_state(state: dict[str, Any], path: str | Path) -> Path:
    """Save a nested dict of tensors and JSON values (optimizer state, RNG, step) without pickle."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    structure = _flatten("", state, tensors)
    _atomic_save(tensors, path, {"vitkd_state": json.dumps(structure)})
    return path


def load_training_state(path: str | Path) -> dict[str, Any]:
    """The state ``save_training_state`` wrote; header and tensors come from one open file."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 - not a dict
        return _unflatten(json.loads(header["vitkd_state"]), tensors)
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"{path}: cannot read training state ({exc})") from exc


def read_training_state_epoch(path: str | Path) -> int:
    """The epoch a training state commits, from its header alone (no tensors are read)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            structure = json.loads((handle.metadata() or {})["vitkd_state"])
        entries = {key: value for key, value in structure["__dict__"] if isinstance(key, str)}
        return int(entries["epoch"])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: cannot read training state ({exc})") from exc
