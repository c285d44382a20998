"""The run folder's commit protocol with real processes: SIGKILL anywhere, SIGTERM, the lock, old layouts.

Every crash test compares against an uninterrupted run of the same config, bit for bit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TinyPair
from safetensors.torch import load_file

from vitkd.checkpoint import load_training_state, read_checkpoint_meta, save_training_state
from vitkd.errors import CheckpointError, ConfigError
from vitkd.rundir import RunBusyError, RunDir
from vitkd.train import TrainConfig, train

REPO_ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"epoch_time_s", "wall_time_s"}
# Runs TrainConfig(**json) in a fresh process; exit status and stderr as the CLI gives them.
_TRAIN_SCRIPT = """
import json, sys
from vitkd.train import TrainConfig, train, TrainingStopped
from vitkd.errors import VitkdError
config = TrainConfig.from_dict(json.loads(sys.argv[1]))
try:
    train(config, resume=sys.argv[2] == "resume", progress=False)
except TrainingStopped as exc:
    print(f"stopped: {exc}", file=sys.stderr)
    sys.exit(128 + exc.signum)
except VitkdError as exc:
    print(f"error: {exc}", file=sys.stderr)
    sys.exit(2)
"""


def _config(out_dir: Path, image_folder: Path, cache: Path, **changes: object) -> TrainConfig:
    fields = dict(model="cifar-student", data=f"imagefolder:{image_folder}", out_dir=str(out_dir), epochs=4,
                  batch_size=16, warmup_epochs=0.5, lr=2e-3, device="cpu", cache_dir=str(cache), eval_batch_size=64,
                  augment="strong",
                  # dropout everywhere, so a resumed run only matches if the RNG state is restored
                  model_overrides={"depth": 1, "drop_rate": 0.2, "proj_drop_rate": 0.2, "attn_drop_rate": 0.2})
    fields.update(changes)
    return TrainConfig(**fields)


def _start(config: TrainConfig, resume: bool, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _TRAIN_SCRIPT, json.dumps(config.to_dict()),
                             "resume" if resume else "fresh"], cwd=REPO_ROOT, env=dict(os.environ, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(config: TrainConfig, resume: bool, **env: str) -> subprocess.CompletedProcess:
    proc = _start(config, resume, **env)
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _metrics(run: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in RunDir(run).read_metrics()]


def _assert_same_run(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "last.safetensors")), load_file(str(b / "last.safetensors"))
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "weights differ from the uninterrupted run"
    sa, sb = load_training_state(a / "last.state.safetensors"), load_training_state(b / "last.state.safetensors")
    assert sa["epoch"] == sb["epoch"] and sa["step"] == sb["step"]
    oa, ob = sa["optimizer"]["state"], sb["optimizer"]["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i] if isinstance(oa[i][k], torch.Tensor))
    assert torch.equal(sa["rng_cpu"], sb["rng_cpu"])
    assert _metrics(a) == _metrics(b)
    assert not list(b.glob(".*.tmp")), "temp files left behind"


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, vitkd_cache_dir: Path) -> Path:
    """The uninterrupted run, in its own process like the interrupted ones."""
    out = tmp_path_factory.mktemp("reference") / "run"
    result = _run(_config(out, image_folder, vitkd_cache_dir), resume=False)
    assert result.returncode == 0, result.stderr
    assert [m["epoch"] for m in _metrics(out)] == [1, 2, 3, 4]
    return out


@pytest.mark.slow
def test_sigkill_after_each_file_of_an_epoch_then_resume_is_bit_identical(
        reference: Path, tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path) -> None:
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir)
    # Killed right after the commit (exports not yet written), after last, after metrics, and in epoch 1.
    kills = ["last.state.safetensors:1", "last.safetensors:2", "metrics.jsonl:3", "last.state.safetensors:4"]
    for n, point in enumerate(kills):
        result = _run(config, resume=n > 0, VITKD_CRASH_AT=point)
        assert result.returncode == -signal.SIGKILL, (point, result.stderr)
        epoch = int(point.rsplit(":", 1)[1])
        assert RunDir(config.out_dir).committed_epoch() == epoch
    result = _run(config, resume=True)
    assert result.returncode == 0, result.stderr
    _assert_same_run(reference, Path(config.out_dir))


@pytest.mark.slow
def test_sigkill_at_random_instants_then_resume_is_bit_identical(
        reference: Path, tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path) -> None:
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir)
    rng = random.Random(0)
    for n in range(5):
        proc = _start(config, resume=n > 0)
        try:
            time.sleep(rng.uniform(1.0, 6.0))  # start-up, data, any step or any write of an epoch
        finally:
            proc.kill()
            proc.communicate()
    result = _run(config, resume=True)
    assert result.returncode == 0, result.stderr
    _assert_same_run(reference, Path(config.out_dir))


@pytest.mark.slow
def test_sigterm_stops_at_a_step_boundary_and_resume_is_bit_identical(
        reference: Path, tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path) -> None:
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir)
    run = RunDir(config.out_dir)
    proc = _start(config, resume=False)
    try:
        deadline = time.monotonic() + 120
        while run.committed_epoch() < 1 and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 128 + signal.SIGTERM, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "--resume continues after epoch" in lines[0], err
    committed = run.committed_epoch()
    assert f"after epoch {committed} " in lines[0]
    assert not list(run.path.glob(".*.tmp"))
    assert read_checkpoint_meta(run.last)["epoch"] == committed  # exports match the commit
    assert len(run.read_metrics()) == committed
    result = _run(config, resume=True)
    assert result.returncode == 0, result.stderr
    _assert_same_run(reference, run.path)


def test_a_second_trainer_into_the_same_folder_gets_one_line(tmp_path: Path, image_folder: Path,
                                                              vitkd_cache_dir: Path) -> None:
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir, epochs=1)
    with RunDir(config.out_dir).lock():
        result = _run(config, resume=False)
        with pytest.raises(RunBusyError, match="is in use"):
            train(config, progress=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "is in use" in result.stderr
    assert not RunDir(config.out_dir).state.exists()
    train(config, progress=False)  # the lock is gone with its holder
    assert RunDir(config.out_dir).committed_epoch() == 1


def test_exports_lagging_or_ahead_of_the_commit_are_repaired(tmp_path: Path, image_folder: Path,
                                                             vitkd_cache_dir: Path) -> None:
    straight = _config(tmp_path / "straight", image_folder, vitkd_cache_dir, epochs=3)
    train(straight, progress=False)
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir, epochs=3)
    run = RunDir(config.out_dir)
    train(config, stop_after_epochs=1, progress=False)
    state_after_1 = run.state.read_bytes()
    train(config, resume=True, stop_after_epochs=1, progress=False)
    run.state.write_bytes(state_after_1)  # exports of epoch 2 around a commit of epoch 1
    with open(run.metrics, "a") as log:
        log.write('{"epoch": 2, "torn')  # and a torn line
    train(config, resume=True, progress=False)
    _assert_same_run(Path(straight.out_dir), run.path)


def test_older_two_file_layout_resumes_or_refuses(tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path) -> None:
    straight = _config(tmp_path / "straight", image_folder, vitkd_cache_dir, epochs=2)
    train(straight, progress=False)
    config = _config(tmp_path / "run", image_folder, vitkd_cache_dir, epochs=2)
    run = RunDir(config.out_dir)
    train(config, stop_after_epochs=1, progress=False)
    new_state = load_training_state(run.state)
    old = {k: new_state[k] for k in ("config", "optimizer", "epoch", "step", "rng_cpu", "rng_cuda", "wall_time_s")}
    old["best_accuracy"] = 50.0
    save_training_state(old, run.state)  # what vitkd <= 0.3 wrote: no weights in the state
    train(config, resume=True, progress=False)
    _assert_same_run(Path(straight.out_dir), run.path)

    save_training_state(dict(old, epoch=0), run.state)  # weights and state from different epochs
    with pytest.raises(CheckpointError, match="from epoch 2 but the training state"):
        train(config, resume=True, progress=False)


def test_best_checkpoint_only_with_a_validation_split(tmp_path: Path, image_folder: Path,
                                                      vitkd_cache_dir: Path) -> None:
    plain = _config(tmp_path / "plain", image_folder, vitkd_cache_dir, epochs=2)
    train(plain, progress=False)
    assert not RunDir(plain.out_dir).best.exists()
    assert "val_accuracy" not in RunDir(plain.out_dir).read_metrics()[-1]

    held = _config(tmp_path / "held", image_folder, vitkd_cache_dir, epochs=3, val_fraction=0.25)
    train(held, progress=False)
    rows = RunDir(held.out_dir).read_metrics()
    best_row = max(rows, key=lambda r: (r["val_accuracy"], -r["epoch"]))  # first epoch reaching the max
    best_meta = read_checkpoint_meta(RunDir(held.out_dir).best)
    assert best_meta["epoch"] == best_row["epoch"]
    assert rows[-1]["best_val_accuracy"] == best_row["val_accuracy"]
    # trained on 3/4 of train (160 images, 40 held out, batch 16: 7 steps of 120 images)
    assert rows[0]["step"] == 120 // 16
    meta = read_checkpoint_meta(RunDir(held.out_dir).last)
    assert meta["metrics"]["accuracy"] == rows[-1]["accuracy"] and meta["epoch"] == 3


def test_distillation_refuses_a_teacher_of_other_classes_before_training(
        tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path, tiny_pair: TinyPair) -> None:
    from conftest import write_image_folder

    from vitkd.errors import IncompatibleModelsError

    other = write_image_folder(tmp_path / "other")
    for split in ("train", "test"):
        (other / split / "red").rename(other / split / "scarlet")
    config = _config(tmp_path / "run", other, vitkd_cache_dir, teacher=str(tiny_pair.teacher), alpha=0.5,
                     model_overrides={"depth": 2})
    with pytest.raises(IncompatibleModelsError, match="teacher's classes"):
        train(config, progress=False)
    assert not RunDir(config.out_dir).state.exists()


def test_resume_follows_head_pairs_not_the_map_spelling(tmp_path: Path, image_folder: Path, vitkd_cache_dir: Path,
                                                        tiny_pair: TinyPair) -> None:
    """Same pairs spelled differently resume; a spelling whose meaning changed (grouped default) is refused."""
    def config(head_map: str) -> TrainConfig:
        return _config(tmp_path / "run", image_folder, vitkd_cache_dir, epochs=2, teacher=str(tiny_pair.teacher),
                       alpha=0.5, head_map=head_map, model_overrides={"depth": 2})

    train(config("block:1->1[0,1,2,3]"), stop_after_epochs=1, progress=False)
    with pytest.raises(ConfigError, match="now means"):
        train(config("block:1->1"), resume=True, progress=False)  # 8 -> 4 heads: grouped {0,1}, {2,3}, ...
    train(config("head:1.0->1.0;1.1->1.1;1.2->1.2;1.3->1.3"), resume=True, progress=False)
    assert RunDir(tmp_path / "run").committed_epoch() == 2


def test_a_crash_while_clearing_an_abandoned_run_never_leaves_it_resumable(tmp_path: Path, monkeypatch) -> None:
    """``clear_outputs`` (a fresh start) interrupted after its first deletion: the folder must not resume."""
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    save_training_state({"epoch": 3, "model": {"w": torch.zeros(2)}}, run.state)
    for path in (run.last, run.best, run.metrics, run.progress):
        path.write_text("from the abandoned attempt")
    real_unlink = Path.unlink
    deleted: list[Path] = []

    def unlink_then_crash(self, *args, **kwargs):
        if deleted:
            raise KeyboardInterrupt("the process dies here")
        deleted.append(self)
        return real_unlink(self, *args, **kwargs)

    monkeypatch.setattr(Path, "unlink", unlink_then_crash)
    with pytest.raises(KeyboardInterrupt):
        run.clear_outputs()
    monkeypatch.undo()
    assert run.committed_epoch() == 0 and run.load_state() is None
