"""``vitkd.train``: an interrupted + resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TinyPair

from vitkd.checkpoint import load_checkpoint, load_training_state, read_checkpoint_meta
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
        assert meta_b["head_map"] == [[1, h, 1, h] for h in range(4)] + [[0, h, 0, h] for h in range(4)]

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
