"""One checkpoint format: a ``.safetensors`` file of weights plus vitkd JSON metadata in its header.

Files are never unpickled. Training state for ``--resume`` (optimizer, step, RNG) is a
second safetensors file beside the checkpoint, written the same atomic way.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .errors import CheckpointError
from .files import atomic_target
from .models import ModelConfig, build_model, model_config

__all__ = ["FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "read_checkpoint_meta",
           "save_training_state", "load_training_state", "read_training_state_epoch"]

FORMAT_VERSION = 1
_META_KEY = "vitkd"


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
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: vitkd metadata is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or "model" not in meta:
        raise CheckpointError(f"{path}: vitkd metadata has no model config")
    version = meta.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version}, this vitkd reads {FORMAT_VERSION}")
    return meta


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Rebuild the model from the metadata, load the weights; returns ``(model in eval mode, meta)``."""
    path = Path(path)
    meta = read_checkpoint_meta(path)
    try:
        config = ModelConfig.from_dict(meta["model"])
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
