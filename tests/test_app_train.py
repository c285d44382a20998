"""AppTest of the Train page's Resume button: a cancelled run with committed epochs continues in its folder."""

from __future__ import annotations

import time
from pathlib import Path

from test_app_pages import _app, env  # noqa: F401 - env is a fixture used by name

from vitkd.errors import CheckpointError
from vitkd.jobs import active_job, cancel_job, job_status, list_jobs, start_job
from vitkd.rundir import RunDir


def _committed_job(runs: Path, data: Path, epochs: int):
    """A real job cancelled after its first committed epoch (a tiny model on the tiny image folder)."""
    config = {"model": "cifar-student", "data": f"imagefolder:{data}", "epochs": epochs, "batch_size": 8,
              "warmup_epochs": 0.0, "device": "cpu", "threads": 1}
    job = start_job(runs, config, name="to-resume")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if RunDir(job.run_dir).committed_epoch() >= 1:
                    break
            except CheckpointError:  # read while the trainer replaced it
                pass
            assert job_status(job).running, job.log_path.read_text()
            time.sleep(0.05)
    finally:
        status = cancel_job(job)
    assert status.state == "cancelled" and status.resumable, (status, job.log_path.read_text())
    return job, status


def test_resume_button_continues_a_cancelled_run(env: dict[str, Path]) -> None:  # noqa: F811 - the fixture
    epochs = 50
    job, status = _committed_job(env["runs"], env["data"], epochs)
    resumed = None
    try:
        at = _app(env, "views/train.py")
        warning = "\n".join(e.value for e in at.warning)
        assert f"Cancelled: stopped by SIGTERM during epoch {status.committed_epoch + 1}" in warning
        assert f"Resume** continues after epoch {status.committed_epoch}" in warning
        at.radio(key="train_mode").set_value("train").run()  # a valid new-run form: only a running job disables it
        assert not at.button(key="train_start").disabled

        at.button(key="train_resume").click().run()
        assert not at.exception
        resumed = active_job(env["runs"])
        assert resumed is not None and resumed.run_dir == job.run_dir and resumed.pid != job.pid
        assert resumed.args == (*job.args, "--resume")
        assert job_status(resumed).running
        assert [j.name for j in list_jobs(env["runs"])] == [job.name]
        assert at.button(key="train_start").disabled  # one run at a time, resumed ones included
        assert "train_resume" not in [b.key for b in at.button]
        assert any(b.key == "train_cancel" for b in at.button)
    finally:
        if resumed is not None:
            cancel_job(resumed)
        elif (running := active_job(env["runs"])) is not None:
            cancel_job(running)


def test_no_resume_button_for_a_run_without_a_committed_epoch(env: dict[str, Path]) -> None:  # noqa: F811
    config = {"model": "cifar-student", "data": f"imagefolder:{env['data']}", "epochs": 50, "batch_size": 1,
              "warmup_epochs": 0.0, "device": "cpu", "threads": 1}  # 160 steps an epoch: seconds to cancel in
    job = start_job(env["runs"], config, name="early")
    try:
        deadline = time.monotonic() + 60
        while not RunDir(job.run_dir).read_progress() and time.monotonic() < deadline:
            assert job_status(job).running, job.log_path.read_text()
            time.sleep(0.05)
    finally:
        status = cancel_job(job)  # within the first epoch: nothing committed
    assert status.state == "cancelled" and status.epochs == 50 and status.committed_epoch == 0, status
    at = _app(env, "views/train.py")
    assert "Cancelled" in "\n".join(e.value for e in at.warning)
    assert "train_resume" not in [b.key for b in at.button]
