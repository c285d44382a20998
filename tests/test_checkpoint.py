"""Checkpoints round-trip exactly; every kind of bad file is a ``CheckpointError`` naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from vitkd.checkpoint import (
    FORMAT_VERSION,
    load_checkpoint,
    load_training_state,
    read_checkpoint_meta,
    save_checkpoint,
    save_training_state,
)
from vitkd.errors import CheckpointError
from vitkd.files import atomic_target, write_text_atomic
from vitkd.models import build_model, model_config

pytestmark = pytest.mark.timeout(30)

META = {"class_names": ["a", "b", "c"], "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.2], "img_size": 32,
        "head_map": [[1, 0, 0, 2]], "epoch": 3, "metrics": {"accuracy": 41.5}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(0)
    model = build_model("cifar-student", 3, depth=2, reg_tokens=2).eval()
    path = save_checkpoint(model, META, tmp_path_factory.mktemp("ckpt") / "model.safetensors")
    return model, path


def test_round_trip(saved) -> None:
    model, path = saved
    loaded, meta = load_checkpoint(path)
    assert not loaded.training
    assert model_config(loaded) == model_config(model)
    original, restored = model.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert all(torch.equal(original[k], restored[k]) for k in original)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))
    assert {k: meta[k] for k in META} == META
    assert meta["format_version"] == FORMAT_VERSION and meta["model"]["overrides"] == {"depth": 2, "reg_tokens": 2}
    assert read_checkpoint_meta(path) == meta
    assert not list(path.parent.glob("*.tmp"))  # atomic write leaves no temp files


def _assert_names_file(path: Path, match: str | None = None) -> None:
    for read in (load_checkpoint, read_checkpoint_meta):
        with pytest.raises(CheckpointError, match=match) as info:
            read(path)
        assert str(path) in str(info.value)


def test_random_bytes(tmp_path: Path) -> None:
    path = tmp_path / "random.safetensors"
    path.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    _assert_names_file(path)


def test_truncated(saved, tmp_path: Path) -> None:
    _, good = saved
    data = good.read_bytes()
    path = tmp_path / "half.safetensors"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)
    # cut inside the header too
    path.write_bytes(data[:20])
    _assert_names_file(path)


def test_safetensors_without_vitkd_metadata(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(3)}, str(path), metadata={"format": "pt"})
    _assert_names_file(path, "not a vitkd checkpoint")


def test_torch_pickle(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    _assert_names_file(path)


def test_missing_file(tmp_path: Path) -> None:
    _assert_names_file(tmp_path / "nope.safetensors", "no such")


def test_bad_metadata(tmp_path: Path) -> None:
    path = tmp_path / "bad_meta.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"vitkd": "{not json"})
    _assert_names_file(path, "not valid JSON")
    save_file({"w": torch.zeros(1)}, str(path), metadata={"vitkd": json.dumps({"model": {}, "format_version": 99})})
    _assert_names_file(path, "version 99")


def test_weights_not_matching_recorded_architecture(saved, tmp_path: Path) -> None:
    _, good = saved
    meta = read_checkpoint_meta(good)
    meta["model"]["overrides"]["depth"] = 3  # metadata now promises one more block
    path = tmp_path / "mismatch.safetensors"
    loaded, _ = load_checkpoint(good)
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, str(path),
              metadata={"vitkd": json.dumps(meta)})
    with pytest.raises(CheckpointError, match="do not match") as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_training_state_round_trip(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    state = {"optimizer": opt.state_dict(), "rng": torch.get_rng_state(), "step": 7, "none": None}
    loaded = load_training_state(save_training_state(state, tmp_path / "s.safetensors"))
    assert loaded["step"] == 7 and loaded["none"] is None and torch.equal(loaded["rng"], state["rng"])
    for key, value in state["optimizer"]["state"][0].items():
        assert torch.equal(loaded["optimizer"]["state"][0][key], value)
    opt2 = torch.optim.AdamW(model.parameters(), lr=0.1)
    opt2.load_state_dict(loaded["optimizer"])  # accepted by torch as-is
    with pytest.raises(CheckpointError):
        load_training_state(tmp_path / "missing.safetensors")


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    write_text_atomic(target, "old")
    assert target.read_text() == "old" and target.stat().st_mode & 0o777 == 0o644
    with pytest.raises(RuntimeError), atomic_target(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_training_state_epoch_from_the_header_alone(tmp_path: Path) -> None:
    from vitkd.checkpoint import read_training_state_epoch, save_training_state

    path = save_training_state({"config": {"epochs": 9}, "epoch": 7, "step": 70, "model": {"w": torch.ones(3)},
                                "metrics_history": [{"epoch": e} for e in range(1, 8)]}, tmp_path / "s.safetensors")
    assert read_training_state_epoch(path) == 7
    (tmp_path / "bad.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(CheckpointError, match="cannot read training state"):
        read_training_state_epoch(tmp_path / "bad.safetensors")
