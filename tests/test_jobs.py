"""Training jobs: a real tiny ``python -m vitkd train`` process, one at a time, cancel, resume, stale locks.

Every started job is registered with the ``jobs`` fixture, whose teardown stops whatever still
runs, so no process outlives a failing test.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from test_scan import make_folder

from vitkd.checkpoint import load_checkpoint, read_checkpoint_meta
from vitkd.cli import build_parser
from vitkd.errors import CheckpointError, ConfigError
from vitkd.jobs import (
    LOCK_NAME,
    Job,
    JobBusyError,
    active_job,
    cancel_job,
    config_to_args,
    job_status,
    list_jobs,
    load_job,
    resume_job,
    start_job,
)
from vitkd.models import parse_model_overrides
from vitkd.rundir import RunDir
from vitkd.train import TrainConfig


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobdata")
    make_folder(root / "train", per_class=6, seed=1)
    make_folder(root / "test", per_class=2, seed=2)
    return root


@pytest.fixture
def jobs() -> Iterator[Callable[[Job], Job]]:
    """``jobs(job)`` registers a started job (and returns it); teardown stops every one still running."""
    started: list[Job] = []

    def register(job: Job) -> Job:
        started.append(job)
        return job

    yield register
    for job in started:
        if not _process_gone(job.pid, timeout=0):
            cancel_job(job, timeout=5)


def _config(data_root: Path, epochs: int, batch_size: int = 6) -> dict:
    return {"model": "cifar-student", "data": f"imagefolder:{data_root}", "epochs": epochs, "batch_size": batch_size,
            "warmup_epochs": 0.0, "cache_dir": str(data_root / "cache"), "device": "cpu", "threads": 1}


def _wait(job, until: set[str], timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = job_status(job)
        if status.state in until:
            return status
        time.sleep(0.1)
    raise AssertionError(f"job {job.name} still {job_status(job).state} after {timeout}s; log:\n"
                         f"{job.log_path.read_text()}")


def _process_gone(pid: int, timeout: float = 10.0) -> bool:
    """The pid has exited (a zombie counts: it runs nothing); waits out the last moments of interpreter exit."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _wait_committed(job: Job, epoch: int, timeout: float = 120.0) -> int:
    """Poll the run folder until its state file commits ``epoch`` or later; returns the committed epoch."""
    run = RunDir(job.run_dir)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            committed = run.committed_epoch()
        except CheckpointError:  # read while the trainer replaced it: try again
            committed = 0
        if committed >= epoch:
            return committed
        assert job_status(job).running, job.log_path.read_text()
        time.sleep(0.05)
    raise AssertionError(f"job {job.name} did not commit epoch {epoch} in {timeout}s; log:\n{job.log_path.read_text()}")


def _assert_clean_stop(job: Job, epochs: int) -> int:
    """The stopped job left no temp file and exports matching its committed epoch; returns that epoch."""
    run = RunDir(job.run_dir)
    committed = run.committed_epoch()
    assert 1 <= committed < epochs
    assert list(run.path.glob(".*.tmp")) == []
    assert read_checkpoint_meta(run.last)["epoch"] == committed
    assert [m["epoch"] for m in run.read_metrics()] == list(range(1, committed + 1))
    status = job_status(job)
    assert status.state == "cancelled" and status.resumable, status
    assert status.committed_epoch == committed and status.epochs == epochs
    assert status.message.startswith("stopped by SIGTERM during epoch ")
    assert status.message.endswith(f"--resume continues after epoch {committed} (the last committed)")
    return committed


def test_config_to_args_round_trips_through_the_cli(tmp_path: Path) -> None:
    config = {"model": "cifar-student", "data": "imagefolder:/d", "epochs": 3, "teacher": "/t.safetensors",
              "head_map": "block:5->3", "alpha": 0.9, "loss": "mse", "gate": "teacher-correct", "bf16": True}
    args = config_to_args(config)
    assert args[0] == "distill"
    parsed = build_parser().parse_args(args + ["--out", str(tmp_path)])
    assert parsed.alpha == 0.9  # the CLI default is 0.5: every value must be spelled out
    rebuilt = {k: getattr(parsed, k) for k in ("model", "data", "epochs", "teacher", "head_map", "alpha", "loss",
                                               "gate", "bf16", "batch_size", "lr", "augment", "seed")}
    expected = TrainConfig.from_dict(dict(config, out_dir=str(tmp_path))).to_dict()
    assert rebuilt == {k: expected[k] for k in rebuilt}
    assert config_to_args({"model": "cifar-student", "data": "cifar10"})[0] == "train"
    with pytest.raises(ConfigError, match="alpha < 1 and logit distillation need a --teacher"):
        config_to_args({"model": "cifar-student", "data": "cifar10", "alpha": 0.5})
    with pytest.raises(ConfigError, match="leave out_dir out"):
        config_to_args({"model": "m", "data": "d", "out_dir": "x"})
    with pytest.raises(ConfigError, match="drop --out"):
        start_job(tmp_path, ["train", "--out", "x"])


def test_job_runs_to_a_loadable_checkpoint_and_is_exclusive(data_root: Path, tmp_path: Path, jobs) -> None:
    runs = tmp_path / "runs"
    job = jobs(start_job(runs, _config(data_root, epochs=1), name="tiny baseline"))
    assert job.name.startswith("tiny-baseline-") and job.args[0] == "train" and "--no-progress" in job.args
    assert active_job(runs) == job
    assert json.loads((runs / LOCK_NAME).read_text()) == {"name": job.name, "pid": job.pid}
    with pytest.raises(JobBusyError, match=f"{job.name} is still running"):
        jobs(start_job(runs, _config(data_root, epochs=1)))
    status = _wait(job, {"finished", "failed", "cancelled"})
    assert status.state == "finished", job.log_path.read_text()
    assert status.fraction == 1.0 and status.epochs == 1 and len(status.metrics) == 1
    assert status.accuracy == status.metrics[0]["accuracy"]
    assert _process_gone(job.pid)
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()  # the finished job's lock is cleared
    model, meta = load_checkpoint(job.checkpoint)
    assert meta["class_names"] == ["cat", "dog", "frog"] and meta["epoch"] == 1
    assert meta["metrics"]["accuracy"] == status.accuracy
    assert json.loads(RunDir(job.run_dir).job_file.read_text())["status"] == "finished"
    assert [j.name for j in list_jobs(runs)] == [job.name]
    assert load_job(job.run_dir) == job
    with pytest.raises(ConfigError, match="already finished its 1 epochs"):
        resume_job(runs, job)


def test_cancel_stops_the_process_and_releases_the_lock(data_root: Path, tmp_path: Path, jobs) -> None:
    runs = tmp_path / "runs"
    job = jobs(start_job(runs, _config(data_root, epochs=200)))
    _wait_committed(job, 1)  # let it get into training, so the cancel interrupts real work
    assert job_status(job).state == "running", job.log_path.read_text()
    status = cancel_job(job)
    assert status.state == "cancelled" and 1 <= len(status.metrics) < 200
    assert _process_gone(job.pid)
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()
    assert job_status(job).state == "cancelled"
    second = jobs(start_job(runs, _config(data_root, epochs=200)))  # the slot is free again
    assert active_job(runs) == second
    with pytest.raises(JobBusyError, match=f"{second.name} is still running"):
        resume_job(runs, job)  # one job per server, resumed ones included
    assert cancel_job(second).state == "cancelled"
    assert [j.name for j in list_jobs(runs)] == [second.name, job.name]


def test_cancel_then_resume_twice_reaches_the_last_epoch_once(image_folder: Path, tmp_path: Path, jobs) -> None:
    runs, epochs = tmp_path / "runs", 6
    first = jobs(start_job(runs, _config(image_folder, epochs=epochs, batch_size=8), name="resumed"))
    _wait_committed(first, 1)
    assert cancel_job(first).state == "cancelled"
    assert _process_gone(first.pid) and active_job(runs) is None
    after_first = _assert_clean_stop(first, epochs)

    second = jobs(resume_job(runs, first))
    assert second.run_dir == first.run_dir and second.pid != first.pid
    assert second.args == (*first.args, "--resume") and active_job(runs) == second
    assert job_status(second).running and load_job(first.run_dir) == second
    with pytest.raises(JobBusyError, match="still running"):
        resume_job(runs, first)
    _wait_committed(second, after_first + 1)
    os.killpg(second.pid, signal.SIGTERM)  # stopped by someone else than cancel_job: the log's stop line tells
    assert _process_gone(second.pid)
    after_second = _assert_clean_stop(second, epochs)
    assert after_second > after_first

    third = jobs(resume_job(runs, second))
    assert third.args.count("--resume") == 1 and third.args == second.args
    status = _wait(third, {"finished", "failed", "cancelled"}, timeout=120)
    assert status.state == "finished", third.log_path.read_text()
    run = RunDir(third.run_dir)
    assert run.committed_epoch() == epochs and read_checkpoint_meta(run.last)["epoch"] == epochs
    assert [m["epoch"] for m in run.read_metrics()] == list(range(1, epochs + 1))
    assert [m["epoch"] for m in status.metrics] == list(range(1, epochs + 1))
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()
    record = json.loads(run.job_file.read_text())
    assert record["status"] == "finished" and record["pid"] == third.pid
    assert [(a["pid"], a["status"]) for a in record["attempts"]] == [(first.pid, "cancelled"),
                                                                     (second.pid, "cancelled")]
    assert f"continues after epoch {after_second}" in record["attempts"][1]["message"]
    log = run.log.read_text()
    assert log.count("== resume: ") == 2 and log.count("stopped: stopped by SIGTERM") == 2
    assert [j.name for j in list_jobs(runs)] == [first.name]


def test_a_cancel_from_a_stale_page_leaves_the_resumed_attempt_running(data_root: Path, tmp_path: Path,
                                                                        jobs) -> None:
    """Session A still shows attempt 1; session B resumed it. A's Cancel must not mark attempt 2
    cancelled nor free the one-job lock while attempt 2 trains."""
    runs = tmp_path / "runs"
    first = jobs(start_job(runs, _config(data_root, epochs=200)))
    _wait_committed(first, 1)
    assert cancel_job(first).state == "cancelled"
    second = jobs(resume_job(runs, first))
    assert cancel_job(first).running  # the stale handle cancels nothing and reports the current attempt
    assert job_status(second).running and active_job(runs) == second
    assert json.loads(second.folder.job_file.read_text())["status"] == "running"
    with pytest.raises(JobBusyError):
        start_job(runs, _config(data_root, epochs=1))
    assert cancel_job(second).state == "cancelled" and active_job(runs) is None


def test_a_run_killed_after_its_last_commit_resumes_to_finished(data_root: Path, tmp_path: Path, jobs) -> None:
    """Killed between the final commit and the exports: every epoch is committed, nothing says so.
    Resume repairs the exports and records the end instead of leaving it failed for good."""
    runs = tmp_path / "runs"
    env = dict(os.environ, VITKD_CRASH_AT="last.state.safetensors:2")
    job = jobs(start_job(runs, _config(data_root, epochs=2), env=env))
    status = _wait(job, {"finished", "failed", "cancelled"}, timeout=120)
    run = RunDir(job.run_dir)
    assert status.state == "failed" and run.committed_epoch() == 2, job.log_path.read_text()
    assert read_checkpoint_meta(run.last)["epoch"] == 1  # the exports lag the commit
    assert status.resumable
    resumed = jobs(resume_job(runs, job))
    status = _wait(resumed, {"finished", "failed", "cancelled"}, timeout=120)
    assert status.state == "finished", resumed.log_path.read_text()
    assert read_checkpoint_meta(run.last)["epoch"] == 2 and [m["epoch"] for m in run.read_metrics()] == [1, 2]
    with pytest.raises(ConfigError, match="already finished"):
        resume_job(runs, resumed)


def test_resume_refuses_runs_without_a_committed_epoch(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = RunDir(runs / "crashed")
    run.path.mkdir(parents=True)
    run.job_file.write_text(json.dumps({"pid": dead.pid, "args": ["train", "--out", str(run.path)], "started": 1.0}))
    run.write_progress({"epoch": 0, "epochs": 3, "batch": 2, "batches": 5})  # died within its first epoch
    job = load_job(run.path)
    assert job_status(job).state == "failed" and job_status(job).epochs == 3 and not job_status(job).resumable
    with pytest.raises(ConfigError, match="no committed epoch"):
        resume_job(runs, job)
    # The log decides between stopped and crashed: the CLI's stop line, unless a later attempt began after it.
    stop_line = "stopped: stopped by SIGTERM during epoch 1; --resume continues after epoch 0 (the last committed)"
    run.log.write_text(f"{stop_line}\n")
    status = job_status(job)
    assert (status.state, status.message) == ("cancelled", stop_line.removeprefix("stopped: "))
    run.job_file.write_text(json.dumps({"pid": dead.pid, "args": ["train"], "started": 1.0, "status": "running"}))
    run.log.write_text(f"{stop_line}\n\n== resume: 2026-01-01 00:00:00, after epoch 0: python -m vitkd train\n")
    status = job_status(job)  # the resumed attempt died before printing anything (SIGKILL, OOM)
    assert (status.state, status.message) == ("failed", "")
    with pytest.raises(ConfigError, match="belongs to"):
        resume_job(tmp_path / "other", job)
    assert not (runs / LOCK_NAME).exists()  # a refused resume leaves the slot free


def test_a_job_the_server_failed_to_record_exits_without_training(data_root: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The server dies (here: raises) after spawning the process but before the lock names it: the
    process must not train on, untracked, beside the next job; it reads EOF instead of ``go`` and exits."""
    from vitkd import jobs as jobs_module

    runs, write_json = tmp_path / "runs", jobs_module._write_json

    def crash_on_lock(path: Path, payload: dict) -> None:
        if path.name == LOCK_NAME:
            raise KeyboardInterrupt("server killed")
        write_json(path, payload)

    monkeypatch.setattr(jobs_module, "_write_json", crash_on_lock)
    with pytest.raises(KeyboardInterrupt):
        start_job(runs, _config(data_root, epochs=1000))
    monkeypatch.undo()
    (run_path,) = [p for p in runs.iterdir() if p.is_dir()]
    job = load_job(run_path)  # the job file was written, so the orphan is visible and can be checked
    try:
        assert _process_gone(job.pid, timeout=30), "the unrecorded job kept running"
    finally:
        if not _process_gone(job.pid, timeout=0):
            os.killpg(job.pid, signal.SIGKILL)
    assert "nothing was trained" in job.log_path.read_text()
    assert not RunDir(run_path).state.exists() and active_job(runs) is None
    assert job_status(job).state == "failed"


def test_a_stale_job_handle_leaves_a_newer_attempts_record_alone(tmp_path: Path) -> None:
    """A page still holding the first attempt (its process dead) must not mark the attempt another
    session has since resumed as ended; the current attempt's end is still recorded."""
    dead = [subprocess.Popen([sys.executable, "-c", "pass"]) for _ in range(2)]
    for process in dead:
        process.wait()
    run = RunDir(tmp_path / "runs" / "resumed")
    run.path.mkdir(parents=True)
    run.job_file.write_text(json.dumps({"pid": dead[0].pid, "args": ["train"], "started": 1.0, "status": "running"}))
    first = load_job(run.path)
    run.job_file.write_text(json.dumps({"pid": dead[1].pid, "args": ["train", "--resume"], "started": 2.0,
                                        "status": "running"}))
    assert job_status(first).state == "failed"
    assert json.loads(run.job_file.read_text()) == {"pid": dead[1].pid, "args": ["train", "--resume"],
                                                     "started": 2.0, "status": "running"}
    assert job_status(load_job(run.path)).state == "failed"
    record = json.loads(run.job_file.read_text())
    assert record["pid"] == dead[1].pid and record["status"] == "failed" and record["ended"] >= 2.0


def test_stale_locks_are_cleared(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("dead", dead.pid), ("reused", os.getpid())):  # a gone pid; a live pid of another program
        (runs / name).mkdir(parents=True)
        RunDir(runs / name).job_file.write_text(json.dumps({"pid": pid, "args": ["train"], "started": 1.0}))
        (runs / LOCK_NAME).write_text(json.dumps({"name": name, "pid": pid}))
        assert active_job(runs) is None
        assert not (runs / LOCK_NAME).exists()
        assert job_status(load_job(runs / name)).state == "failed"
    (runs / LOCK_NAME).write_text("{torn")
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()


def test_config_to_args_passes_model_overrides_and_weights(tmp_path: Path) -> None:
    config = {"model": "timm:vit_tiny_patch16_224", "data": "imagefolder:/d", "epochs": 3,
              "model_overrides": {"patch_size": 8, "depth": 2, "global_pool": "avg", "qk_norm": True},
              "pretrained_file": "/w/tiny.safetensors"}
    args = config_to_args(config)
    expected = ["train", "--model", "timm:vit_tiny_patch16_224", "--data", "imagefolder:/d", "--epochs", "3",
                "--batch-size", "128", "--lr", "0.001", "--min-lr", "1e-05", "--weight-decay", "0.05",
                "--warmup-epochs", "2.0", "--label-smoothing", "0.0", "--augment", "basic", "--seed", "0",
                "--model-override", "patch_size=8", "--model-override", "depth=2", "--model-override",
                "global_pool=avg", "--model-override", "qk_norm=true", "--pretrained-file", "/w/tiny.safetensors",
                "--device", "auto", "--val-fraction", "0.0"]
    assert args == expected
    parsed = build_parser().parse_args(args + ["--out", str(tmp_path)])
    assert parse_model_overrides(parsed.model_overrides) == config["model_overrides"]
    assert parsed.pretrained_file == "/w/tiny.safetensors" and parsed.pretrained is False
    assert "--pretrained" in config_to_args({"model": "timm:vit_tiny_patch16_224", "data": "d", "pretrained": True})
    with pytest.raises(ConfigError, match="unknown model override 'checkpoint_path'"):
        config_to_args({"model": "cifar-student", "data": "d", "model_overrides": {"checkpoint_path": "x.pth"}})


def test_student_presets_for_a_teacher_put_its_grid_first_and_keep_other_grids() -> None:
    """At the cifar-teacher's 32 px: patch 4 presets give its 8x8 grid, patch 8 (seed-*) 4x4, patch 16 (nette-*)
    2x2; all can be distilled into (other grids are resampled), the teacher's grid first."""
    from vitkd.jobs import preset_shape, student_presets_for

    got = student_presets_for(preset_shape("cifar-teacher"))
    same = ["cifar-teacher", "cifar-student", "cifar-teacher-sl", "cifar-student-sl", "cifar-student-deit"]
    assert got[:len(same)] == same
    assert set(got[len(same):]) == {"seed-teacher", "seed-student", "nette-teacher", "nette-student",
                                    "nette-student-deit"}
    # A teacher at 36 px: only presets whose patch divides 36 (patch 4), all on its 9x9 grid.
    assert student_presets_for(preset_shape("cifar-teacher", 36)) == same
