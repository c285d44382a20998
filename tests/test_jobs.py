"""Training jobs: a real tiny ``python -m vitkd train`` process, one at a time, cancel, stale locks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_scan import make_folder

from vitkd.checkpoint import load_checkpoint
from vitkd.cli import build_parser
from vitkd.errors import ConfigError
from vitkd.jobs import (
    LOCK_NAME,
    JobBusyError,
    active_job,
    cancel_job,
    config_to_args,
    job_status,
    list_jobs,
    load_job,
    start_job,
)
from vitkd.train import TrainConfig


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("jobdata")
    make_folder(root / "train", per_class=6, seed=1)
    make_folder(root / "test", per_class=2, seed=2)
    return root


def _config(data_root: Path, epochs: int) -> dict:
    return {"model": "cifar-student", "data": f"imagefolder:{data_root}", "epochs": epochs, "batch_size": 6,
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
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return True
        except (ProcessLookupError, FileNotFoundError):
            return True
        time.sleep(0.05)
    return False


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


def test_job_runs_to_a_loadable_checkpoint_and_is_exclusive(data_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    job = start_job(runs, _config(data_root, epochs=1), name="tiny baseline")
    assert job.name.startswith("tiny-baseline-") and job.args[0] == "train" and "--no-progress" in job.args
    assert active_job(runs) == job
    assert json.loads((runs / LOCK_NAME).read_text()) == {"name": job.name, "pid": job.pid}
    with pytest.raises(JobBusyError, match=f"{job.name} is still running"):
        start_job(runs, _config(data_root, epochs=1))
    status = _wait(job, {"finished", "failed", "cancelled"})
    assert status.state == "finished", job.log_path.read_text()
    assert status.fraction == 1.0 and status.epochs == 1 and len(status.metrics) == 1
    assert status.accuracy == status.metrics[0]["accuracy"]
    assert _process_gone(job.pid)
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()  # the finished job's lock is cleared
    model, meta = load_checkpoint(job.checkpoint)
    assert meta["class_names"] == ["cat", "dog", "frog"] and meta["epoch"] == 1
    assert meta["metrics"]["accuracy"] == status.accuracy
    assert json.loads((job.run_dir / "job.json").read_text())["status"] == "finished"
    assert [j.name for j in list_jobs(runs)] == [job.name]
    assert load_job(job.run_dir) == job


def test_cancel_stops_the_process_and_releases_the_lock(data_root: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    job = start_job(runs, _config(data_root, epochs=200))
    deadline = time.monotonic() + 60
    while not (job.run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # let it get into training, so the cancel interrupts real work
    assert job_status(job).state == "running", job.log_path.read_text()
    status = cancel_job(job)
    assert status.state == "cancelled" and 1 <= len(status.metrics) < 200
    assert _process_gone(job.pid)
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()
    assert job_status(job).state == "cancelled"
    second = start_job(runs, _config(data_root, epochs=200))  # the slot is free again
    try:
        assert active_job(runs) == second
    finally:
        assert cancel_job(second).state == "cancelled"
    assert [j.name for j in list_jobs(runs)] == [second.name, job.name]


def test_stale_locks_are_cleared(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for name, pid in (("dead", dead.pid), ("reused", os.getpid())):  # a gone pid; a live pid of another program
        (runs / name).mkdir(parents=True)
        (runs / name / "job.json").write_text(json.dumps({"pid": pid, "args": ["train"], "started": 1.0}))
        (runs / LOCK_NAME).write_text(json.dumps({"name": name, "pid": pid}))
        assert active_job(runs) is None
        assert not (runs / LOCK_NAME).exists()
        assert job_status(load_job(runs / name)).state == "failed"
    (runs / LOCK_NAME).write_text("{torn")
    assert active_job(runs) is None and not (runs / LOCK_NAME).exists()
