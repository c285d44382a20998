"""``vitkd.train``: an interrupted + resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from conftest import TinyPair
from PIL import Image
from safetensors.torch import load_file, save_file

import vitkd.train
from vitkd.checkpoint import load_checkpoint, load_training_state, read_checkpoint_meta
from vitkd.cli import main
from vitkd.data import load_split
from vitkd.errors import ConfigError
from vitkd.models import build_model
from vitkd.train import TrainConfig, evaluate, lr_at_step, train

pytestmark = pytest.mark.timeout(120)

TIMING_KEYS = {"epoch_time_s", "wall_time_s"}


def _config(out_dir: Path, image_folder: Path, cache: Path, **changes) -> TrainConfig:
    fields = dict(model="cifar-student", data=f"imagefolder:{image_folder}", out_dir=str(out_dir), epochs=2,
                  batch_size=32, warmup_epochs=0.5, lr=2e-3, device="cpu", cache_dir=str(cache),
                  eval_batch_size=64, augment="strong",
                  # dropout everywhere, so the resumed run only matches if the RNG state is restored
                  model_overrides={"depth": 2, "drop_rate": 0.2, "proj_drop_rate": 0.2, "attn_drop_rate": 0.2})
    fields.update(changes)
    return TrainConfig(**fields)


def _metrics(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS} for line in lines]


@pytest.mark.slow
@pytest.mark.parametrize("distill", [False, True], ids=["supervised", "distilled"])
def test_resume_is_bit_identical(distill: bool, tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path,
                                 request: pytest.FixtureRequest) -> None:
    extra = {}
    if distill:
        pair: TinyPair = request.getfixturevalue("tiny_pair")
        extra = dict(teacher=str(pair.teacher), head_map="block:1->1;0->0", loss="kl", alpha=0.5,
                     gate="teacher-correct", kd_weight=0.5)
    straight = _config(tmp_path / "straight", image_folder, vitkd_cache_dir, **extra)
    split = _config(tmp_path / "split", image_folder, vitkd_cache_dir, **extra)

    train(straight, progress=False)
    first = train(split, stop_after_epochs=1, progress=False)
    assert first["epoch"] == 1 and not json.loads((tmp_path / "split" / "progress.json").read_text())["done"]
    train(split, resume=True, progress=False)

    a, meta_a = load_checkpoint(tmp_path / "straight" / "last.safetensors")
    b, meta_b = load_checkpoint(tmp_path / "split" / "last.safetensors")
    state_a, state_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert meta_a["epoch"] == meta_b["epoch"] == 2
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "split")
    assert [m["epoch"] for m in _metrics(tmp_path / "split")] == [1, 2]
    assert json.loads((tmp_path / "split" / "progress.json").read_text())["done"]

    opt_a = load_training_state(tmp_path / "straight" / "last.state.safetensors")["optimizer"]["state"]
    opt_b = load_training_state(tmp_path / "split" / "last.state.safetensors")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i][k], opt_b[i][k]) for i in opt_a for k in opt_a[i])

    # the resumed model differs from the one saved after epoch 1 (it really trained on)
    assert meta_b["kind"] == ("distilled" if distill else "supervised")
    if distill:
        # 8 teacher heads -> 4 student heads: each student head follows an even group of two
        assert meta_b["head_map"] == ([[1, [2 * h, 2 * h + 1], 1, h] for h in range(4)]
                                      + [[0, [2 * h, 2 * h + 1], 0, h] for h in range(4)])

    # the recorded accuracy is the accuracy of the saved weights on the test split
    test = load_split(straight.data, "test", 32, cache_dir=vitkd_cache_dir, progress=False)
    assert evaluate(b, test)["accuracy"] == pytest.approx(meta_b["metrics"]["accuracy"])

    # resuming a finished run trains nothing more
    again = train(split, resume=True, progress=False)
    assert again["epoch"] == 2
    c, _ = load_checkpoint(tmp_path / "split" / "last.safetensors")
    assert all(torch.equal(state_b[k], v) for k, v in c.state_dict().items())


def test_resume_with_changed_config_raises(tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path) -> None:
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir, model_overrides={"depth": 1})
    train(config, stop_after_epochs=1, progress=False)
    changed = _config(tmp_path / "run", image_folder, vitkd_cache_dir, model_overrides={"depth": 1}, lr=5e-3)
    with pytest.raises(ConfigError, match=r"different config.*\['lr'\]"):
        train(changed, resume=True, progress=False)


def test_resume_refuses_training_data_that_changed(tmp_path: Path, image_folder: Path,
                                                    vitkd_cache_dir: Path) -> None:
    """Files added to (or replaced in) the folder between sessions would shift the schedule and the batch order."""
    import shutil

    folder = shutil.copytree(image_folder, tmp_path / "images")
    config = _config(tmp_path / "run", folder, vitkd_cache_dir, model_overrides={"depth": 1}, epochs=3)
    train(config, stop_after_epochs=1, progress=False)
    extra = sorted((folder / "train").rglob("*.png"))[0]
    shutil.copy(extra, extra.with_name("added.png"))
    with pytest.raises(ConfigError, match=r"training data .* changed since epoch 1 \(160 images then, 161 now\)"):
        train(config, resume=True, progress=False)
    extra.with_name("added.png").unlink()
    pixels = np.asarray(Image.open(extra)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(extra)  # one pixel of one image
    with pytest.raises(ConfigError, match=r"changed since epoch 1 \(same image count, other pixels"):
        train(config, resume=True, progress=False)
    shutil.copy(image_folder / "train" / extra.relative_to(folder / "train"), extra)  # restored: resumes
    train(config, resume=True, stop_after_epochs=1, progress=False)  # one more epoch
    assert read_checkpoint_meta(tmp_path / "run" / "last.safetensors")["epoch"] == 2


def test_resume_refuses_a_teacher_whose_content_changed(tmp_path: Path, image_folder: Path,
                                                         vitkd_cache_dir: Path) -> None:
    """A bundled or re-trained teacher is rewritten at the same path: the resumed epochs would distil from
    another model than the first ones, and the path alone cannot tell."""
    import hashlib
    import shutil

    small = {"depth": 1}
    for seed in (0, 1):
        train(_config(tmp_path / f"teacher{seed}", image_folder, vitkd_cache_dir, model="cifar-teacher",
                      model_overrides=small, epochs=1, seed=seed), progress=False)
    teacher = tmp_path / "teacher.safetensors"
    shutil.copy(tmp_path / "teacher0" / "last.safetensors", teacher)
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir, model_overrides=small, epochs=3,
                     teacher=str(teacher), head_map="block:0->0", alpha=0.5)
    train(config, stop_after_epochs=1, progress=False)
    recorded = read_checkpoint_meta(tmp_path / "run" / "last.safetensors")["teacher"]["sha256"]
    assert recorded == hashlib.sha256(teacher.read_bytes()).hexdigest()
    shutil.copy(tmp_path / "teacher1" / "last.safetensors", teacher)  # same path, same shape, other weights
    with pytest.raises(ConfigError, match=r"teacher .* is not the file the run .* learned from until epoch 1"):
        train(config, resume=True, progress=False)
    shutil.copy(tmp_path / "teacher0" / "last.safetensors", teacher)  # restored: resumes
    train(config, resume=True, stop_after_epochs=1, progress=False)
    assert read_checkpoint_meta(tmp_path / "run" / "last.safetensors")["epoch"] == 2


def test_tiny_pair_fixture(tiny_pair: TinyPair) -> None:
    teacher_meta = read_checkpoint_meta(tiny_pair.teacher)
    student_meta = read_checkpoint_meta(tiny_pair.student)
    assert teacher_meta["kind"] == "supervised" and student_meta["kind"] == "distilled"
    assert student_meta["teacher"]["path"] == str(tiny_pair.teacher)
    assert len(student_meta["head_map"]) == 2 * 4  # encoder map: 2 student blocks x 4 heads
    assert teacher_meta["epoch"] == student_meta["epoch"] == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "positive"),
    (dict(lr=0.0), "learning rate"),
    (dict(augment="heavy"), "augmentation"),
    (dict(loss="l2"), "attention loss"),
    (dict(gate="maybe"), "gate"),
    (dict(alpha=0.5), "teacher"),
])
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        TrainConfig(model="cifar-student", data="cifar10", out_dir="unused", **kwargs)
    with pytest.raises(ConfigError, match="unknown training config keys"):
        TrainConfig.from_dict({"model": "m", "data": "d", "out_dir": "o", "epoch": 3})


def test_lr_schedule_by_hand() -> None:
    # warmup 4 steps to 1.0, then cosine over the remaining 8 steps down to 0.0
    assert [lr_at_step(s, 12, 4, 1.0, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert lr_at_step(4, 12, 4, 1.0, 0.0) == pytest.approx(1.0)
    assert lr_at_step(8, 12, 4, 1.0, 0.0) == pytest.approx(0.5)
    assert lr_at_step(12, 12, 4, 1.0, 0.1) == pytest.approx(0.1)


def test_resume_allows_runtime_options_and_new_default_fields() -> None:
    config = TrainConfig(model="cifar-student", data="cifar10", out_dir="x", lr=2e-3)
    saved = config.to_dict()
    # device / compile / eval batch size may change on resume; a field vitkd added later is fine at its default
    runtime = TrainConfig(model="cifar-student", data="cifar10", out_dir="x", lr=2e-3, device="cpu", compile=True,
                          eval_batch_size=64)
    assert runtime.resume_mismatch(saved) == []
    older = {k: v for k, v in saved.items() if k not in ("compile", "kd_weight")}
    assert config.resume_mismatch(older) == []
    assert TrainConfig(model="cifar-student", data="cifar10", out_dir="x", lr=2e-3,
                       label_smoothing=0.1).resume_mismatch(older) == ["label_smoothing"]
    assert TrainConfig(model="cifar-student", data="cifar10", out_dir="x").resume_mismatch(saved) == ["lr"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_distillation_tracks_eager(tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path,
                                            tiny_pair: TinyPair, monkeypatch: pytest.MonkeyPatch) -> None:
    """--compile (teacher forward + attention loss) trains the same run as eager, up to float rounding,
    and the compiled functions really ran (an eager fallback would compare eager with eager)."""
    import warnings

    from vitkd.compiling import CompiledOrEager

    wrappers: list[CompiledOrEager] = []
    real_init = CompiledOrEager.__init__

    def recording_init(self: CompiledOrEager, *args, **kwargs) -> None:
        real_init(self, *args, **kwargs)
        wrappers.append(self)

    monkeypatch.setattr(CompiledOrEager, "__init__", recording_init)
    extra = dict(teacher=str(tiny_pair.teacher), head_map="encoder", loss="kl", alpha=0.5, epochs=1,
                 model_overrides={"depth": 2})
    eager = train(_config(tmp_path / "eager", image_folder, vitkd_cache_dir, **extra), progress=False)
    assert wrappers == []
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="torch.compile of .* failed")  # the fallback's warning
        compiled = train(_config(tmp_path / "compiled", image_folder, vitkd_cache_dir, compile=True, **extra),
                         progress=False)
    assert len(wrappers) >= 2, [w.what for w in wrappers]  # the teacher forward and the attention loss
    assert all(w.compiled_ran and not w.eager_only for w in wrappers), [w.what for w in wrappers]
    for key in ("train_loss", "train_ce", "train_att"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4), key
    a, _ = load_checkpoint(tmp_path / "eager" / "last.safetensors")
    b, _ = load_checkpoint(tmp_path / "compiled" / "last.safetensors")
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-4, msg=name)


def test_logit_distillation_alone_and_its_config_errors() -> None:
    base = {"model": "cifar-student", "data": "cifar10", "out_dir": "x", "teacher": "t.safetensors"}
    assert TrainConfig(**base, alpha=1.0, kd_weight=1.0).head_map is None  # no attention term
    assert TrainConfig(**base, alpha=0.5).head_map == "encoder"
    with pytest.raises(ConfigError, match="no weight"):
        TrainConfig(**base, alpha=1.0, kd_weight=1.0, head_map="encoder")
    with pytest.raises(ConfigError, match="teaches nothing"):
        TrainConfig(**base, alpha=1.0)


def test_logit_distillation_alone_trains_without_attention(tmp_path: Path, image_folder: Path,
                                                           vitkd_cache_dir: Path, tiny_pair: TinyPair) -> None:
    """alpha 1 + kd_weight: CE + KD on class logits only; the checkpoint records no head map."""
    metrics = train(_config(tmp_path / "kd", image_folder, vitkd_cache_dir, teacher=str(tiny_pair.teacher),
                            alpha=1.0, kd_weight=1.0, epochs=1, compile=True,
                            model_overrides={"depth": 2}), progress=False)
    assert metrics["train_kd"] > 0 and "train_att" not in metrics
    assert metrics["train_loss"] == pytest.approx(metrics["train_ce"] + metrics["train_kd"], rel=1e-5)
    meta = read_checkpoint_meta(tmp_path / "kd" / "last.safetensors")
    assert meta["kind"] == "distilled" and meta["head_map"] is None


@pytest.mark.parametrize("extra", [
    dict(model="cifar-student-deit", kd="deit-hard", alpha=0.5, head_map="head:1.0->1.0;1.1->1.1",
         weighting="student-confidence"),
    dict(model="cifar-student-deit", kd="deit-hard", alpha=1.0),
    dict(model="cifar-student", alpha=0.5, head_map="head:1.0->1.0", gate="student-correct"),
], ids=["deit+attention", "deit-alone", "student-correct"])
def test_issue12_recipes_train_end_to_end(extra: dict, tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path,
                                          tiny_pair: TinyPair) -> None:
    """DeiT-token students (hard distillation, alone or with attention) and student-side weighting train and save."""
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir, teacher=str(tiny_pair.teacher), epochs=1,
                     **dict(extra, model_overrides={"depth": 2}))
    metrics = train(config, progress=False)
    assert metrics["epoch"] == 1 and metrics["train_loss"] > 0
    assert ("train_kd" in metrics) == (config.kd == "deit-hard")
    assert ("train_att" in metrics) == (config.head_map is not None)
    model, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert meta["train_config"]["kd"] == config.kd and meta["train_config"]["weighting"] == config.weighting
    test = load_split(config.data, "test", 32, cache_dir=vitkd_cache_dir, progress=False)
    assert evaluate(model, test)["accuracy"] == pytest.approx(metrics["accuracy"])  # eval: mean of the two heads
    if config.kd == "deit-hard":  # the distillation head learned (it gets gradients only in distilled training)
        torch.manual_seed(config.seed)
        initial = build_model(config.model, num_classes=4, **config.model_overrides)
        assert not torch.equal(initial.head_dist.weight, model.head_dist.weight)


@pytest.mark.parametrize("extra, match", [
    (dict(model="cifar-student-deit", alpha=0.5), "distillation token"),
    (dict(model="cifar-student", kd="deit-hard", alpha=0.5), "needs a student with a distillation token"),
    (dict(model="cifar-student", alpha=0.5, model_overrides={"patch_drop_rate": 0.25}), "patch_drop_rate"),
])
def test_distillation_checks_run_before_any_data_is_read(extra: dict, match: str, tmp_path: Path,
                                                         tiny_pair: TinyPair) -> None:
    config = _config(tmp_path / "run", tmp_path / "no-such-folder", tmp_path / "cache",
                     teacher=str(tiny_pair.teacher), epochs=1, **extra)
    with pytest.raises(ConfigError, match=match):
        train(config, progress=False)


def test_warmup_must_end_before_the_run_does() -> None:
    with pytest.raises(ConfigError, match="warmup_epochs"):
        TrainConfig(model="cifar-student", data="cifar10", out_dir="x", epochs=2, warmup_epochs=2.0)


# ------------------------------------------------------------------ issue 14: other patch grids, head groups


def _grid_config(tmp_path: Path, image_folder: Path, cache: Path, teacher: Path, **changes) -> TrainConfig:
    """A cifar-student with 8 px patches (a 4x4 grid) under the tiny teacher (8x8 grid, 8 heads per block)."""
    fields = dict(model="cifar-student", model_overrides={"patch_size": 8, "depth": 2},
                  data=f"imagefolder:{image_folder}", out_dir=str(tmp_path / "run"), epochs=1, batch_size=32,
                  warmup_epochs=0.0, device="cpu", cache_dir=str(cache), eval_batch_size=64,
                  teacher=str(teacher), head_map="block:1->1;0->0", loss="kl", alpha=0.5)
    fields.update(changes)
    return TrainConfig(**fields)


def _reference_targets(teacher_attn: torch.Tensor, kind: str) -> torch.Tensor:
    """Teacher maps [B, 8, 65, 65] (CLS + 8x8) -> targets [B, 4, 17, 17] (CLS + 4x4), with reshapes alone.

    Heads {2j, 2j+1} -> student head j: mean probability (kl) or mean logit (mse). Then per 2x2 patch
    cell: queries averaged; keys summed (kl: a student key holds its four teacher keys' mass) or
    averaged (mse logits); the CLS row and column resampled along one axis only.
    """
    b = teacher_attn.shape[0]
    x = teacher_attn.double()
    if kind == "kl":
        x = x.softmax(-1)
    x = (x[:, 0::2] + x[:, 1::2]) / 2                                           # [B, 4, 65, 65]
    key_op = (lambda v: v.sum(dim=(-3, -1))) if kind == "kl" else (lambda v: v.mean(dim=(-3, -1)))
    cls_cls = x[..., :1, :1]
    cls_keys = key_op(x[..., :1, 1:].reshape(b, 4, 1, 4, 2, 4, 2)).reshape(b, 4, 1, 16)
    cls_col = x[..., 1:, :1].reshape(b, 4, 4, 2, 4, 2, 1).mean(dim=(3, 5)).reshape(b, 4, 16, 1)
    patches = x[..., 1:, 1:].reshape(b, 4, 4, 2, 4, 2, 64).mean(dim=(3, 5)).reshape(b, 4, 16, 64)
    patches = key_op(patches.reshape(b, 4, 16, 4, 2, 4, 2)).reshape(b, 4, 16, 16)
    out = torch.cat([torch.cat([cls_cls, cls_keys], -1), torch.cat([cls_col, patches], -1)], -2)
    return out.log() if kind == "kl" else out


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_grid_distillation_step_matches_a_reference(kind: str, tmp_path: Path, image_folder: Path,
                                                    vitkd_cache_dir: Path, tiny_pair: TinyPair) -> None:
    """One step's attention term: teacher heads grouped 8 -> 4 and resampled 8x8 -> 4x4 in the capture path."""
    from vitkd.attention import capture_attention
    from vitkd.data import iterate_batches
    from vitkd.distill import attention_loss
    from vitkd.rundir import RunDir
    from vitkd.train import _check_before_data, _setup, _step_terms

    config = _grid_config(tmp_path, image_folder, vitkd_cache_dir, tiny_pair.teacher, loss=kind)
    run = _setup(config, RunDir(config.out_dir), 0, 1, torch.device("cpu"), _check_before_data(config), False)
    run.forward.eval()  # no dropout: the reference forward below sees the same student
    images, labels = next(iter(iterate_batches(run.train_data, 32, train=False)))
    terms = _step_terms(run, images, labels)
    with torch.no_grad():
        t_attn = capture_attention(run.teacher, images, [0, 1]).attn_logits
        s_attn = capture_attention(run.student, images, [0, 1]).attn_logits
    student_maps = torch.cat([s_attn[1], s_attn[0]], dim=1)  # block:1->1;0->0, every student head
    targets = torch.cat([_reference_targets(t_attn[1], kind), _reference_targets(t_attn[0], kind)], dim=1)
    expected = attention_loss(student_maps.double(), targets, kind)
    assert terms["att"].item() == pytest.approx(expected.item(), rel=1e-4)
    assert terms["att"].item() > 0 and torch.isfinite(terms["loss"])
    # the gradient of the attention term reaches the student, never the teacher
    assert all(p.grad is None for p in run.teacher.parameters())
    grads = torch.autograd.grad(terms["loss"], list(run.student.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("kind", ["kl", "mse"])
def test_distillation_onto_a_coarser_patch_grid_trains_and_records_the_map(
        kind: str, tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path, tiny_pair: TinyPair) -> None:
    import math

    from vitkd.attention import token_layout
    from vitkd.headmap import HeadMap

    config = _grid_config(tmp_path, image_folder, vitkd_cache_dir, tiny_pair.teacher, loss=kind,
                          head_map="head:1.{0,1,2}->1.0;1.5->1.1;0.{6,7}->0.3")
    metrics = train(config, progress=False)
    assert math.isfinite(metrics["train_loss"]) and metrics["train_att"] > 0
    model, meta = load_checkpoint(tmp_path / "run" / "last.safetensors")
    assert token_layout(model).grid_size == (4, 4) and meta["kind"] == "distilled"
    assert meta["head_map"] == [[1, [0, 1, 2], 1, 0], [1, 5, 1, 1], [0, [6, 7], 0, 3]]
    assert HeadMap.from_list(meta["head_map"]).validate(2, 8, 2, 4).describe() == (
        "T1.{0,1,2}->S1.0, T1.5->S1.1, T0.{6,7}->S0.3")
    test = load_split(config.data, "test", 32, cache_dir=vitkd_cache_dir, progress=False)
    assert evaluate(model, test)["accuracy"] == pytest.approx(metrics["accuracy"])


def test_cli_distils_onto_a_finer_patch_grid(tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path) -> None:
    """``python -m vitkd distill``: a 4x4-grid teacher (8 heads) -> the cifar-student preset (8x8 grid, 4 heads),
    teacher maps resampled bilinearly, block map grouping the teacher's heads 8 -> 4."""
    import math
    import subprocess
    import sys

    teacher_cfg = TrainConfig(model="cifar-teacher", data=f"imagefolder:{image_folder}",
                              out_dir=str(tmp_path / "teacher"), epochs=1, batch_size=32, warmup_epochs=0.0,
                              device="cpu", cache_dir=str(vitkd_cache_dir), eval_batch_size=64,
                              model_overrides={"patch_size": 8, "depth": 1, "embed_dim": 32})
    train(teacher_cfg, progress=False)
    result = subprocess.run(
        [sys.executable, "-m", "vitkd", "distill", "--model", "cifar-student", "--teacher",
         str(tmp_path / "teacher" / "last.safetensors"), "--map", "block:0->3", "--loss", "kl", "--alpha", "0.5",
         "--data", f"imagefolder:{image_folder}", "--out", str(tmp_path / "student"), "--epochs", "1",
         "--batch-size", "32", "--device", "cpu", "--threads", "1", "--no-progress"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=150)
    assert result.returncode == 0, result.stderr
    metrics = json.loads((tmp_path / "student" / "metrics.jsonl").read_text().splitlines()[-1])
    assert math.isfinite(metrics["train_loss"]) and metrics["train_att"] > 0
    _, meta = load_checkpoint(tmp_path / "student" / "last.safetensors")
    assert meta["head_map"] == [[0, [2 * h, 2 * h + 1], 3, h] for h in range(4)]


@pytest.mark.parametrize("changes, match", [
    (dict(model_overrides={"patch_size": 8, "depth": 2, "reg_tokens": 1}),
     r"1 prefix \+ 8x8 grid.*2 prefix \+ 4x4 grid.*prefix tokens"),
    (dict(img_size=64, model_overrides={"patch_size": 8, "depth": 2}),
     "teacher reads 32x32 images and the student 64x64"),
    (dict(head_map="head:1.{0,1}->1.0;0.2->1.0"), "mapped twice, to teacher blocks 1 and 0"),
])
def test_grid_distillation_refuses_what_cannot_work(changes: dict, match: str, tmp_path: Path,
                                                    tiny_pair: TinyPair) -> None:
    from vitkd.errors import VitkdError

    config = _grid_config(tmp_path, tmp_path / "no-such-folder", tmp_path / "cache", tiny_pair.teacher, **changes)
    with pytest.raises(VitkdError, match=match):  # before any data is read
        train(config, progress=False)


def test_experiment_teacher_given_as_a_checkpoint_path(tmp_path: Path) -> None:
    import yaml

    from vitkd.experiment import load_experiment

    spec = {"out_dir": str(tmp_path / "runs"), "data": "cifar10",
            "runs": [{"name": "kd", "model": "cifar-student", "teacher": "elsewhere/teacher/last.safetensors",
                      "head_map": "block:5->3", "alpha": 0.5},
                     {"name": "bad", "model": "cifar-student", "teacher": "no-such-run", "alpha": 0.5}]}
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match="'no-such-run', which is not an earlier run"):
        load_experiment(path)
    spec["runs"].pop()
    path.write_text(yaml.safe_dump(spec))
    _, runs = load_experiment(path)
    assert runs[0][1].teacher == "elsewhere/teacher/last.safetensors"
    # the issue-14 study: the CIFAR-10 study's teacher into a 4x4-grid student, and its labels-only baseline
    _, runs = load_experiment(Path(__file__).resolve().parents[1] / "configs" / "cifar10_grid.yaml")
    by_name = {name: config for name, config, _ in runs}
    assert set(by_name) == {"student-grid-baseline", "student-grid-h2h-kl"}
    for config in by_name.values():
        assert config.model == "cifar-student" and config.model_overrides == {"patch_size": 8}
        assert config.out_dir.startswith("runs/cifar10-grid/")
    distilled = by_name["student-grid-h2h-kl"]
    assert distilled.teacher == "runs/cifar10/teacher/last.safetensors" and distilled.loss == "kl"
    assert distilled.alpha == 0.5 and by_name["student-grid-baseline"].teacher is None


def test_deit_student_on_a_coarser_grid_trains(tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path,
                                               tiny_pair: TinyPair) -> None:
    """A DeiT student (CLS + distillation token + 4x4) under the plain 8x8 teacher: its maps lose the
    distillation token, then match the teacher's maps resampled onto 4x4."""
    config = _grid_config(tmp_path, image_folder, vitkd_cache_dir, tiny_pair.teacher, model="cifar-student-deit",
                          kd="deit-hard")
    metrics = train(config, progress=False)
    assert torch.isfinite(torch.tensor(metrics["train_loss"])) and metrics["train_att"] > 0 and "train_kd" in metrics


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_teacher_capture_with_resampling_matches_eager() -> None:
    """What ``--compile`` runs: the teacher forward, the head groups and the resampling in one compiled graph."""
    import functools
    import warnings

    from vitkd.attention import token_layout
    from vitkd.compiling import CompiledOrEager
    from vitkd.headmap import parse_head_map
    from vitkd.resample import token_resample_matrix
    from vitkd.train import _teacher_outputs

    torch.manual_seed(0)
    teacher = build_model("cifar-teacher", 4, depth=2, embed_dim=32).eval().requires_grad_(False)
    student = build_model("cifar-student", 4, depth=2, patch_size=8)
    head_map = parse_head_map("block:1->1;0->0", 2, 8, 2, 4)
    layouts = (token_layout(teacher), token_layout(student))
    images = torch.randn(8, 3, 32, 32)
    for kind in ("kl", "mse"):
        capture = functools.partial(_teacher_outputs, teacher, lambda x: x, head_map, kind, layouts,
                                    token_resample_matrix(*layouts))
        compiled = CompiledOrEager(capture, "the teacher forward")
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error")  # a compile failure would warn and fall back
            fast, eager = compiled(images), capture(images)
        assert compiled.compiled_ran and not compiled.eager_only
        assert fast[1].shape == (8, 8, 17, 17)
        torch.testing.assert_close(fast[1], eager[1], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ a timm model from a local weights file

TINY_TIMM = {"depth": 1, "embed_dim": 8, "num_heads": 2, "patch_size": 8}  # vit_tiny_patch16_224, shrunk


def _write_timm_file(path: Path, **changes) -> Path:
    """A tiny timm ViT's weights (10 classes, 32 px) saved with safetensors, as a user would bring them."""
    model = timm.create_model("vit_tiny_patch16_224", num_classes=10, img_size=32, **dict(TINY_TIMM, **changes))
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.mark.parametrize("command", ["train", "distill"])
def test_pretrained_file_initialises_the_first_step(command: str, tmp_path: Path, image_folder: Path,
                                                    vitkd_cache_dir: Path, tiny_pair: TinyPair,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    weights = _write_timm_file(tmp_path / "tiny-vit.safetensors")
    expected = load_file(str(weights))  # read back independently of vitkd and timm
    sha256 = hashlib.sha256(weights.read_bytes()).hexdigest()
    first: list[dict[str, torch.Tensor]] = []
    real_step = vitkd.train._step_terms

    def recording_step(run, images, labels):
        if not first:  # the student as the first step sees it, before any update
            first.append({k: v.detach().clone() for k, v in run.student.state_dict().items()})
        return real_step(run, images, labels)

    monkeypatch.setattr(vitkd.train, "_step_terms", recording_step)
    out = tmp_path / "run"
    argv = [command, "--model", "timm:vit_tiny_patch16_224", "--img-size", "32", "--pretrained-file", str(weights),
            "--data", f"imagefolder:{image_folder}", "--out", str(out), "--epochs", "1", "--batch-size", "32",
            "--device", "cpu", "--cache-dir", str(vitkd_cache_dir), "--no-progress"]
    for key, value in TINY_TIMM.items():
        argv += ["--model-override", f"{key}={value}"]
    if command == "distill":  # the teacher's 8x8 grid resampled onto this student's 4x4
        argv += ["--teacher", str(tiny_pair.teacher), "--alpha", "0.5"]
    assert main(argv) == 0
    assert first, "no training step ran"
    body = [k for k in expected if not k.startswith("head.")]
    assert body and all(torch.equal(first[0][k], expected[k]) for k in body)
    assert first[0]["head.weight"].shape == (4, 8)  # 4 classes in the data, 10 in the file: a new head
    last = out / "last.safetensors"
    meta = read_checkpoint_meta(last)
    assert meta["init_weights"] == {"source": "file", "file": "tiny-vit.safetensors", "sha256": sha256}
    assert meta["model"] == {"name": "vit_tiny_patch16_224", "num_classes": 4, "img_size": 32,
                             "overrides": TINY_TIMM}
    weights.unlink()  # the checkpoint holds its weights: loading it never needs (or opens) the file
    model, _ = load_checkpoint(last)
    assert not torch.equal(model.blocks[0].attn.qkv.weight, expected["blocks.0.attn.qkv.weight"])  # it trained


@pytest.mark.parametrize("changes, match", [
    ({"depth": 2}, "--pretrained-file tiny-vit.safetensors does not fit vit_tiny_patch16_224"),
    ({"embed_dim": 16}, "size mismatch for cls_token"),
])
def test_a_mismatched_pretrained_file_is_refused_before_any_data_is_read(changes: dict, match: str,
                                                                        tmp_path: Path) -> None:
    weights = _write_timm_file(tmp_path / "tiny-vit.safetensors", **changes)
    config = TrainConfig(model="timm:vit_tiny_patch16_224", data=f"imagefolder:{tmp_path / 'no-such-folder'}",
                         out_dir=str(tmp_path / "run"), epochs=1, warmup_epochs=0.0, img_size=32, device="cpu",
                         model_overrides=TINY_TIMM, pretrained_file=str(weights))
    with pytest.raises(ConfigError, match=re.escape(match)):
        train(config, progress=False)
    assert not (tmp_path / "run").exists()


def test_train_config_checks_model_overrides() -> None:
    fields = dict(model="cifar-student", data="cifar10", out_dir="x", epochs=2)
    with pytest.raises(ConfigError, match="unknown model override 'pretrained_cfg'"):
        TrainConfig(**fields, model_overrides={"pretrained_cfg": {"file": "x.pth"}})
    with pytest.raises(ConfigError, match="pass one"):
        TrainConfig(**fields, pretrained=True, pretrained_file="x.safetensors")
