"""AppTest of the Train page: the Resume button (a cancelled run continues in its folder), model overrides, typed timm
models and their pretrained weights, the teacher head ranking."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from test_app_explore import plotly_array
from test_app_pages import APP, _app, env  # noqa: F401 - env is a fixture used by name

from app import common
from vitkd.errors import CheckpointError
from vitkd.importance import head_importance_checkpoint
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


def _command(at) -> str:
    """The page's "Command line" block."""
    codes = [c.value for c in at.code if c.value.startswith("python -m vitkd ")]
    assert len(codes) == 1, codes
    return codes[0]


def test_train_page_passes_model_overrides_to_the_job(env: dict[str, Path]) -> None:  # noqa: F811 - the fixture
    at = _app(env, "views/train.py")
    at.radio(key="train_mode").set_value("train").run()
    at.text_input(key="train_overrides").input("patch_size=8, depth=2").run()
    assert not at.exception and not at.error
    assert "2 blocks x 4 heads, 32 px input, 4x4 patch grid." in [c.value for c in at.caption]
    assert " --model cifar-student " in _command(at)
    assert " --model-override patch_size=8 --model-override depth=2 " in _command(at)
    at.button(key="train_start").click().run()
    job = active_job(env["runs"])
    try:
        assert job is not None and job.command == "train"
        at_override = [job.args[i + 1] for i, arg in enumerate(job.args) if arg == "--model-override"]
        assert at_override == ["patch_size=8", "depth=2"]
    finally:
        if job is not None:
            cancel_job(job)


def test_train_page_refuses_bad_overrides(env: dict[str, Path]) -> None:  # noqa: F811 - the fixture
    at = _app(env, "views/train.py")
    at.radio(key="train_mode").set_value("train").run()
    at.text_input(key="train_overrides").input("colour=red").run()
    assert not at.exception
    assert any("unknown model override 'colour'" in e.value for e in at.error)
    assert at.button(key="train_start").disabled
    at.text_input(key="train_overrides").input("num_heads=5").run()  # parses, but the model cannot be built
    assert any("num_heads" in e.value and "cannot build preset 'cifar-student'" in e.value for e in at.error)
    assert at.button(key="train_start").disabled
    at.text_input(key="train_overrides").input("depth=100000000").run()  # would build 10^8 blocks to check it
    assert any("depth=100000000 is out of range" in e.value and "0 to 64" in e.value for e in at.error)
    assert at.button(key="train_start").disabled


def _app_with(env: dict[str, Path], **state: str) -> AppTest:  # noqa: F811 - env is the fixture's value
    """The Train page with widget values set before its first run: what a user typed into the model picker.

    (AppTest can only select existing options; a typed ``timm:NAME`` is an option once the page has it.)
    """
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["vitkd_teacher"] = str(env["teacher"])
    at.session_state["vitkd_student"] = str(env["student"])
    for key, value in state.items():
        at.session_state[key] = value
    at.switch_page("views/train.py")
    at.run()
    assert not at.exception
    return at


def test_train_page_takes_a_typed_timm_model(env: dict[str, Path]) -> None:  # noqa: F811 - the fixture
    at = _app_with(env, train_mode="train", train_model="timm:vit_tiny_patch16_224",
                   train_overrides="depth=1, embed_dim=8, num_heads=2")
    assert not at.error
    assert at.selectbox(key="train_model").value == "timm:vit_tiny_patch16_224"
    assert at.selectbox(key="train_model").options[-1] == "timm:vit_tiny_patch16_224"  # kept as an option
    assert "1 blocks x 2 heads, 224 px input, 14x14 patch grid." in [c.value for c in at.caption]
    assert " --model timm:vit_tiny_patch16_224 " in _command(at)
    assert " --model-override depth=1 --model-override embed_dim=8 --model-override num_heads=2 " in _command(at)
    assert not at.button(key="train_start").disabled
    at.text_input(key="train_overrides").input("depth=1, embed_dim=8, num_heads=2, patch_size=8").run()
    assert "1 blocks x 2 heads, 224 px input, 28x28 patch grid." in [c.value for c in at.caption]

    # a timm student of the tiny teacher, at the teacher's 32 px (its 8x8 grid resampled onto the student's 4x4)
    at = _app_with(env, train_mode="distill", train_teacher=str(env["teacher"]),
                   train_student="timm:vit_tiny_patch16_224",
                   train_overrides="depth=1, embed_dim=8, num_heads=2, patch_size=8")
    assert not at.error
    assert any("Student: 1 blocks x 2 heads" in c.value for c in at.caption)
    command = _command(at)
    assert command.startswith("python -m vitkd distill --model timm:vit_tiny_patch16_224 ")
    assert " --img-size 32 " in command
    assert " --model-override depth=1 --model-override embed_dim=8 --model-override num_heads=2 " \
           "--model-override patch_size=8 " in command

    at = _app_with(env, train_mode="train", train_model="timm:no_such_vit")
    assert any("unknown model 'no_such_vit'" in e.value for e in at.error)
    assert at.button(key="train_start").disabled


@pytest.mark.parametrize("online", [True, False])
def test_train_page_offers_timms_pretrained_weights_only_with_a_network(
        env: dict[str, Path], online: bool, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811 - the fixture
    hosts = []
    monkeypatch.setattr(common, "network_available", lambda host="cs.toronto.edu", **_: hosts.append(host) or online)
    at = _app_with(env, train_mode="train", train_model="timm:vit_tiny_patch16_224",
                   train_overrides="depth=1, embed_dim=8, num_heads=2")
    box = at.checkbox(key="train_pretrained")
    assert box.disabled is (not online) and "huggingface.co" in hosts
    assert " --pretrained" not in _command(at)
    if online:
        box.check().run()
        assert not at.exception and " --pretrained " in _command(at) + " "
    else:  # a browser user cannot tick it; the help says what to do offline
        assert "--pretrained-file" in box.help
    # A preset has no timm weights: no checkbox.
    at = _app_with(env, train_mode="train", train_model="cifar-student")
    assert not [c for c in at.checkbox if c.key == "train_pretrained"]


def test_train_page_ranks_the_teachers_heads_on_training_images(env: dict[str, Path]) -> None:  # noqa: F811
    at = _app(env, "views/train.py")
    at.radio(key="train_mode").set_value("distill").run()
    at.selectbox(key="train_teacher").set_value(str(env["teacher"])).run()
    at.text_input(key="train_overrides").input("depth=2").run()  # a student the 2-block teacher can teach
    assert not at.get("plotly_chart")  # nothing is computed before the button
    at.number_input(key="train_rank_limit").set_value(40).run()
    at.button(key="train_rank").click().run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    chart = next(c for c in at.get("plotly_chart") if c.proto.id.endswith("train_rank_chart"))
    shown = plotly_array(json.loads(chart.proto.spec)["data"][0]["z"]).reshape(2, 8)
    expected = head_importance_checkpoint(env["teacher"], data=f"imagefolder:{env['data']}", split="train",
                                          limit=40, batch_size=common.RANK_BATCH_SIZE, device="cpu")
    np.testing.assert_allclose(shown, expected.loss_increase, rtol=1e-6, atol=1e-9)
    top = ", ".join(f"{b}.{h}" for b, h in expected.ranking()[:8])
    assert any("40 training images" in c.value and top in c.value for c in at.caption)
