"""AppTest of the Misclassifications and Train pages against tiny trained checkpoints and a tiny image folder."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

import vitkd.scan
from vitkd.evaluation import evaluate_checkpoint
from vitkd.jobs import LOCK_NAME, active_job, cancel_job, job_status, list_jobs

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_pair, image_folder: Path) -> Iterator[dict[str, Path]]:
    """Server configuration through the environment, as a deployment would set it.

    Teardown cancels any training job a test started and left running (a failed assertion between
    Start and Cancel would otherwise leave a 100-epoch run behind).
    """
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    teacher = Path(shutil.copy(tiny_pair.teacher, checkpoints / "tiny-teacher.safetensors"))
    student = Path(shutil.copy(tiny_pair.student, checkpoints / "tiny-student.safetensors"))
    runs = tmp_path / "runs"
    monkeypatch.setenv("VITKD_CHECKPOINT_DIRS", str(checkpoints))
    monkeypatch.setenv("VITKD_DATA_ROOTS", str(image_folder))
    monkeypatch.setenv("VITKD_RUNS_DIR", str(runs))
    monkeypatch.setenv("VITKD_ENABLE_TRAINING", "1")
    st.cache_data.clear()
    try:
        yield {"teacher": teacher, "student": student, "runs": runs, "data": image_folder}
    finally:
        for job in list_jobs(runs):
            if job_status(job).running:
                cancel_job(job)


def _app(env: dict[str, Path], page: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=60)
    at.session_state["vitkd_teacher"] = str(env["teacher"])  # the bundled checkpoints/ may hold other models
    at.session_state["vitkd_student"] = str(env["student"])
    at.switch_page(page)
    at.run()
    assert not at.exception
    return at


def _texts(at: AppTest) -> str:
    return "\n".join(e.value for kind in ("markdown", "caption", "info", "error", "warning", "success")
                     for e in getattr(at, kind))


def test_misclassified_scan_groups_cache_and_open(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real_scan = vitkd.scan.scan_split
    monkeypatch.setattr(vitkd.scan, "scan_split", lambda *a, **k: calls.append(a[4]) or real_scan(*a, **k))
    at = _app(env, "views/misclassified.py")
    split = at.selectbox(key="misc_split")
    test_label = next(o for o in split.options if o.startswith(f"{env['data'].name}/test"))
    assert "Bundled examples" in split.options
    split.set_value(test_label).run()
    at.button[0].click().run()  # Scan
    assert not at.exception
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "40"
    expected = evaluate_checkpoint(env["teacher"], data=f"imagefolder:{env['data']}", split="test")
    assert metrics["Teacher accuracy"] == f"{expected['accuracy']:.1f} %"
    tabs = [t.label for t in at.tabs]
    assert len(tabs) == 4 and tabs[0].startswith("Teacher right, student wrong (")
    assert sum(int(t.rsplit("(", 1)[1].rstrip(")")) for t in tabs) == 40
    table = at.dataframe[0].value
    assert len(table) == 40 and list(table["attention JS (bits)"]) == sorted(table["attention JS (bits)"],
                                                                            reverse=True)
    assert calls == [str(env["data"] / "test")]

    at.radio(key="misc_sort_both_right").set_value("least divergent first").run()  # any rerun: cache hit
    split.set_value(split.options[-1]).run()
    at.selectbox(key="misc_split").set_value(test_label).run()
    assert not at.exception and calls == [str(env["data"] / "test")]  # same split, same models: not rescanned
    assert len(at.dataframe[0].value) == 40

    explore = next(b for b in at.button if b.key and b.key.startswith("misc_open_"))
    opened = Path(explore.key[explore.key.index(str(env["data"])):])  # key: misc_open_<group>_<path>
    explore.click().run()
    assert not at.exception
    assert at.session_state["explore_sent"]["name"] == opened.name
    assert at.session_state["explore_sent"]["bytes"] == opened.read_bytes()
    assert at.session_state["explore_sent"]["label"] is not None


def test_misclassified_examples_class_mismatch_and_no_roots(env: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITKD_DATA_ROOTS")
    at = _app(env, "views/misclassified.py")
    assert "No data roots are configured" in _texts(at)
    assert at.selectbox(key="misc_split").options == ["Bundled examples"]
    at.button[0].click().run()
    assert not at.exception
    assert "is not one of the models' classes" in "\n".join(e.value for e in at.error)  # CIFAR-10 vs tiny colours


def test_train_page_validates_starts_and_cancels(env: dict[str, Path]) -> None:
    at = _app(env, "views/train.py")
    assert "No training runs yet" in _texts(at)
    at.radio(key="train_mode").set_value("distill").run()
    at.selectbox(key="train_teacher").set_value(str(env["teacher"])).run()
    assert at.selectbox(key="train_student").value == "cifar-student"  # the teacher's 8x8 grid at 32 px
    assert "student depth 4 exceeds teacher depth 2" in "\n".join(e.value for e in at.error)  # encoder map
    assert at.button(key="train_start").disabled
    at.text_input(key="train_head_map").input("block:1->3[0,2,4,6]").run()
    assert not at.error and "Valid head map, 4 head pairs" in _texts(at)
    assert not at.button(key="train_start").disabled

    at.radio(key="train_mode").set_value("train").run()
    at.number_input(key="train_epochs").set_value(100).run()
    at.number_input(key="train_batch_size").set_value(40).run()
    at.button(key="train_start").click().run()
    assert not at.exception
    job = active_job(env["runs"])
    assert job is not None and job.command == "train" and "--epochs" in job.args
    assert job.args[job.args.index("--epochs") + 1] == "100"
    assert at.button(key="train_start").disabled  # one run at a time
    assert "running" in _texts(at)

    at.button(key="train_cancel").click().run()
    assert not at.exception
    assert job_status(job).state == "cancelled"
    assert active_job(env["runs"]) is None and not (env["runs"] / LOCK_NAME).exists()
    assert [j.name for j in list_jobs(env["runs"])] == [job.name]
    assert "Cancelled" in "\n".join(e.value for e in at.warning)
    assert not at.button(key="train_start").disabled


def test_train_page_disabled(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITKD_ENABLE_TRAINING", "0")
    at = _app(env, "views/train.py")
    assert "Training from the browser is disabled" in "\n".join(e.value for e in at.info)
    assert not at.button


def test_default_pair_prefers_the_cifar10_teacher_and_its_distilled_student() -> None:
    from app.common import CheckpointEntry, default_pair

    def entry(name: str, classes: list[str]) -> CheckpointEntry:
        meta = {"class_names": classes, "img_size": 32, "head_map": None}
        return CheckpointEntry(f"/ckpt/{name}.safetensors", f"checkpoints/{name}", 0.0, meta, None)

    nette = [entry(f"imagenette-{role}", ["tench"]) for role in ("student-distilled", "teacher", "student-baseline")]
    cifar = [entry(f"cifar10-{role}", ["cat"]) for role in ("student-baseline", "teacher")]
    mine = [entry("my-student", ["cat"])]

    def names(pair: tuple[CheckpointEntry, CheckpointEntry]) -> tuple[str, str]:
        return Path(pair[0].path).stem, Path(pair[1].path).stem

    assert names(default_pair(nette)) == ("imagenette-teacher", "imagenette-student-distilled")
    assert names(default_pair(nette + mine + cifar)) == ("cifar10-teacher", "cifar10-student-baseline")
    distilled = entry("cifar10-student-distilled", ["cat"])
    assert names(default_pair([*mine, distilled, *nette, *cifar])) == ("cifar10-teacher", "cifar10-student-distilled")
