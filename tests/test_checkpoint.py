"""Checkpoints round-trip exactly; every kind of bad file is a ``CheckpointError`` naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
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


# ------------------------------------------------------------------------------------ hostile metadata

def _forge(path: Path, model: dict, tensors: dict[str, torch.Tensor] | None = None) -> Path:
    """A safetensors file whose vitkd metadata records ``model`` (whatever the tensors are)."""
    meta = dict(META, format_version=FORMAT_VERSION, model=model)
    save_file(tensors if tensors is not None else {"w": torch.zeros(4)}, str(path),
              metadata={"vitkd": json.dumps(meta)})
    return path


def _refused_quickly(path: Path, match: str, peak_bytes: float) -> pytest.ExceptionInfo:
    """``load_checkpoint(path)`` raises ``CheckpointError`` matching ``match`` within 2 s, tracing under
    ``peak_bytes`` of Python allocations on the way: refused before anything the header claims is allocated."""
    import time
    import tracemalloc

    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError, match=match) as info:
            load_checkpoint(path)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert elapsed < 2.0 and peak < peak_bytes, (elapsed, peak)
    return info


def test_loader_arguments_in_overrides_are_refused_and_never_opened(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins
    import os

    import timm

    trap = tmp_path / "trap.pth"
    torch.save({"state_dict": {}}, trap)  # a real torch file: timm would torch.load it if asked to
    opened: list[str] = []
    real_open, real_os_open = builtins.open, os.open

    def spy_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_open(file, *args, **kwargs)

    def spy_os_open(file, *args, **kwargs):
        opened.append(str(file))
        return real_os_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(os, "open", spy_os_open)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail(f"torch.load called with {a} {k}"))
    monkeypatch.setattr(timm.models, "load_checkpoint",
                        lambda *a, **k: pytest.fail("timm's load_checkpoint called"), raising=False)
    # A genuine checkpoint (weights match its architecture) whose metadata also names a loader argument.
    model = build_model("vit_tiny_patch16_224", 3, depth=1, embed_dim=8, num_heads=1, img_size=16, patch_size=8)
    genuine = save_checkpoint(model, META, tmp_path / "genuine.safetensors")
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    loader_arguments = (("checkpoint_path", str(trap)), ("pretrained", True), ("cache_dir", str(tmp_path)),
                        ("pretrained_cfg_overlay", {"file": str(trap)}), ("features_only", True),
                        ("block_fn", "os.system"))
    for key, value in loader_arguments:
        record = read_checkpoint_meta(genuine)["model"]
        overrides = dict(record["overrides"], **{key: value})
        path = _forge(tmp_path / f"{key}.safetensors", dict(record, overrides=overrides), tensors)
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert f"['{key}']" in message and "not architecture arguments" in message and "\n" not in message
    assert str(trap) not in opened


def test_model_names_outside_presets_and_the_timm_registry_are_refused(tmp_path: Path) -> None:
    for name in ("hf-hub:someone/vit", "local-dir:/tmp/model", "../vit_tiny_patch16_224", "no_such_model"):
        path = _forge(tmp_path / "named.safetensors", {"name": name, "num_classes": 3, "img_size": None,
                                                        "overrides": {}})
        with pytest.raises(CheckpointError, match="neither a vitkd preset nor a timm model name"):
            load_checkpoint(path)


def test_a_tiny_file_claiming_a_huge_model_is_refused_before_allocating(tmp_path: Path) -> None:

    # depth 10,000 x embed 8,192: about 8e12 parameters (32 TB) claimed by a 1 KB file.
    path = _forge(tmp_path / "huge.safetensors", {"name": "cifar-student", "num_classes": 10, "img_size": None,
                                                   "overrides": {"depth": 10_000, "embed_dim": 8192}})
    assert path.stat().st_size < 1024
    info = _refused_quickly(path, "depth 10000.*0 blocks", peak_bytes=5e6)
    assert "\n" not in str(info.value) and "do not match the recorded architecture" in str(info.value)


def test_a_plausible_depth_with_an_absurd_width_is_refused_on_the_meta_device(tmp_path: Path) -> None:

    # Two blocks, as the file holds, but 8,192 wide: 1.6e9 parameters (6.4 GB) the file does not hold.
    tensors = {f"blocks.{i}.attn.qkv.weight": torch.zeros(3, 2) for i in range(2)}
    path = _forge(tmp_path / "wide.safetensors", {"name": "cifar-student", "num_classes": 10, "img_size": None,
                                                   "overrides": {"depth": 2, "embed_dim": 8192}}, tensors)
    _refused_quickly(path, r"describes [\d,]+ parameters but the file is only [\d,]+ bytes", peak_bytes=20e6)


def test_header_keys_and_shapes_are_compared_before_the_model_is_allocated(saved, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import vitkd.checkpoint

    model, good = saved
    built_on: list[str] = []
    real_build = vitkd.checkpoint.build_model

    def spy_build(*args, **kwargs):
        built = real_build(*args, **kwargs)
        built_on.append(next(built.parameters()).device.type)
        return built

    monkeypatch.setattr(vitkd.checkpoint, "build_model", spy_build)
    meta = read_checkpoint_meta(good)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "head.weight"}, "missing head.weight"),
        "unexpected": (dict(state, extra=torch.zeros(2)), "unexpected extra"),
        "shape": (dict(state, **{"head.weight": torch.zeros(4, 64)}), r"head.weight is \[4, 64\] in the file, "
                                                                       r"\[3, 64\] in the model"),
    }
    for name, (tensors, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path), metadata={"vitkd": json.dumps(meta)})
        built_on.clear()
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(path)
        assert built_on == ["meta"], (name, built_on)  # refused before a real model existed
    built_on.clear()
    load_checkpoint(good)
    assert built_on == ["meta", "cpu"]


@pytest.mark.parametrize("name, overrides", [("cifar-student-deit", {"depth": 2}), ("cifar-student-sl", {"depth": 1}),
                                             ("vit_tiny_patch16_224", {"depth": 1, "embed_dim": 16, "num_heads": 2,
                                                                       "img_size": 32, "reg_tokens": 1})])
def test_every_kind_of_model_passes_the_header_check(name: str, overrides: dict, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name, 3, **overrides).eval()
    path = save_checkpoint(model, META, tmp_path / "model.safetensors")
    loaded, _ = load_checkpoint(path)
    assert type(loaded) is type(model) and model_config(loaded) == model_config(model)
    images = torch.randn(2, 3, *model.patch_embed.img_size)
    with torch.no_grad():
        assert torch.equal(model(images), loaded(images))


def _resave(saved, path: Path, **changes) -> Path:
    """The saved checkpoint's weights with its metadata changed (``None`` records the field as null)."""
    _, good = saved
    meta = read_checkpoint_meta(good)
    for key, value in changes.items():
        meta[key] = value
    loaded, _ = load_checkpoint(good)
    save_file({k: v.contiguous() for k, v in loaded.state_dict().items()}, str(path),
              metadata={"vitkd": json.dumps(meta)})
    return path


@pytest.mark.parametrize("field, value, match", [
    ("img_size", 100_000, r"'img_size' is 100000, not a size in pixels \(1-4096\)"),
    ("img_size", "32", "'img_size' is '32', not a size"),
    ("img_size", True, "'img_size' is True"),
    ("class_names", 5, "'class_names' is 5, not a non-empty list"),
    ("class_names", ["a", 2, "c"], "'class_names'.*not a non-empty list of names"),
    ("class_names", [], "'class_names' is \\[\\]"),
    ("mean", [0.5, 0.5], "'mean'.*3 finite numbers"),
    ("std", [0.2, 0.0, 0.2], "'std'.*3 positive numbers"),
    ("std", [0.2, "x", 0.2], "'std'.*3 finite numbers"),
    ("head_map", 5, "'head_map' is 5, not a list of head-map rows"),
    ("head_map", "4.0->2.0", "'head_map' is '4.0->2.0', not a list"),
    ("head_map", [[1, 0, 0]], "head_map is not a head map"),
    ("teacher", "x", "'teacher' is 'x', not a mapping"),
    ("metrics", {"accuracy": "high"}, "accuracy 'high', not a number"),
    ("train_config", {"alpha": "half"}, "train_config.alpha is 'half', not a number"),
    ("train_config", {"loss": 3}, "train_config.loss is 3, not a string"),
    ("train_config", {"head_map": [[1, 0, 0, 2]]}, "train_config.head_map is \\[\\[1, 0, 0, 2\\]\\], not a string"),
    ("parameters", "many", "'parameters' is 'many', not a count"),
    ("epoch", -1, "'epoch' is -1, not a count"),
    ("data", ["x"], "'data' is \\['x'\\], not a string"),
    ("model", ["x"], "'model' is \\['x'\\], not a mapping"),
    ("model", {"name": ["x"]}, "model.name is \\['x'\\], not a model name"),
    ("model", {"name": "cifar-student", "img_size": 200_000}, "model.img_size is 200000, not a size"),
    ("teacher", {"path": ["x"]}, "teacher.path is \\['x'\\], not a string"),
    ("teacher", {"accuracy": "high"}, "teacher.accuracy is 'high', not a number"),
    ("teacher", {"model": ["x"]}, "teacher.model is \\['x'\\], not a mapping"),
    ("teacher", {"model": {"name": "x", "overrides": ["depth"]}}, "teacher.model.overrides is .*not a mapping"),
])
def test_ill_typed_recorded_fields_are_refused_at_the_header(saved, tmp_path: Path, field: str, value,
                                                              match: str) -> None:
    path = _resave(saved, tmp_path / "forged.safetensors", **{field: value})
    with pytest.raises(CheckpointError, match=match):
        read_checkpoint_meta(path)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_absent_optional_fields_still_load(saved, tmp_path: Path) -> None:
    path = _resave(saved, tmp_path / "sparse.safetensors", class_names=None, mean=None, std=None, img_size=None,
                   head_map=None, metrics=None, epoch=None)
    model, meta = load_checkpoint(path)
    assert meta["class_names"] is None and model.num_classes == 3


@pytest.mark.parametrize("field, value, match", [
    ("class_names", ["a", "b"], "names 2 classes but the model predicts 3"),
    ("img_size", 64, "input size 64 px but the model takes 32 px"),
])
def test_recorded_fields_must_describe_the_model(saved, tmp_path: Path, field: str, value, match: str) -> None:
    path = _resave(saved, tmp_path / "other.safetensors", **{field: value})
    read_checkpoint_meta(path)  # well typed: only the model can tell
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


@pytest.mark.parametrize("img_size, patch_size, match", [
    # No top-level img_size: the model record's 200,000 px would be the upload's resize target.
    (200_000, 8, "takes 200000 px images, more than vitkd resizes uploads to \\(4096 px\\)"),
    # Within the size cap, patch 4: (4096 / 4)^2 + 1 = 1,048,577 tokens, 1 head: 1.1e12 values (4.4 TB).
    (4096, 4, "would hold 1,099,513,724,929 values \\(1048577 tokens, 1 heads over all blocks\\)"),
])
def test_a_small_file_cannot_claim_a_huge_token_grid(tmp_path: Path, img_size: int, patch_size: int,
                                                     match: str) -> None:
    """Without a learned position table the token count costs the file nothing: a few KB would make
    every visitor's upload allocate terabytes. Refused when loading, before any image."""
    model = build_model("cifar-student", 2, img_size=img_size, patch_size=patch_size, embed_dim=8, num_heads=1,
                        depth=1, mlp_ratio=1.0, pos_embed="none")
    path = save_checkpoint(model, {"class_names": ["a", "b"], "kind": "student"}, tmp_path / "grid.safetensors")
    with safe_open(str(path), framework="pt") as handle:  # the size as a model override, unseen by the record check
        meta = json.loads(handle.metadata()["vitkd"])
    meta["model"]["overrides"]["img_size"] = meta["model"].pop("img_size")
    save_file(model.state_dict(), str(path), metadata={"vitkd": json.dumps(meta)})
    assert path.stat().st_size < 20_000
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(path)


def test_deeply_nested_metadata_is_a_checkpoint_error(tmp_path: Path) -> None:
    path = tmp_path / "nested.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"vitkd": "[" * 100_000 + "]" * 100_000})
    _assert_names_file(path, "not valid JSON")
