"""AppTest of the Misclassifications, Train and Models pages against tiny trained checkpoints and a tiny image
folder; the bundled samples; each checkpoint's recipe; DeiT students paired with plain teachers."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from streamlit.testing.v1 import AppTest

import vitkd.scan
from app import common
from vitkd.attention import TokenLayout, capture_attention
from vitkd.checkpoint import save_checkpoint
from vitkd.errors import IncompatibleModelsError
from vitkd.evaluation import evaluate_checkpoint
from vitkd.jobs import LOCK_NAME, active_job, cancel_job, job_status, list_jobs
from vitkd.models import build_model
from vitkd.pairs import check_pair, describe_recipe, load_pair, model_summary, restrict_tokens, training_recipe

REPO_ROOT = Path(__file__).resolve().parents[1]
APP = str(REPO_ROOT / "app" / "streamlit_app.py")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_pair, image_folder: Path) -> Iterator[dict[str, Path]]:
    """Server configuration through the environment, as a deployment would set it.

    Teardown cancels any training job a test started and left running (a failed assertion between
    Start and Cancel would otherwise leave a 100-epoch run behind). No test touches the network: the
    Train page is told there is none (``common.network_available``).
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
    monkeypatch.setattr(common, "network_available", lambda *a, **k: False)
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
    real_scan = vitkd.scan.scan_folder
    monkeypatch.setattr(vitkd.scan, "scan_folder", lambda *a, **k: calls.append(a[4]) or real_scan(*a, **k))
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

    assert not any(str(env["data"]) in (b.key or "") for b in at.button)  # widget keys reach the browser
    explore = next(b for b in at.button if b.key and b.key.startswith("misc_open_"))
    real_read_bytes = Path.read_bytes

    def gone(self):
        if self.is_relative_to(env["data"]):
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real_read_bytes(self)

    monkeypatch.setattr(Path, "read_bytes", gone)  # the file vanished from the server after the scan
    explore.click().run()
    assert not at.exception and "explore_sent" not in at.session_state
    assert any("can no longer be read on the server" in e.value for e in at.error)
    monkeypatch.setattr(Path, "read_bytes", real_read_bytes)
    explore = next(b for b in at.button if b.key and b.key.startswith("misc_open_"))
    explore.click().run()
    assert not at.exception
    sent = at.session_state["explore_sent"]
    opened = [p for p in (env["data"] / "test").rglob(sent["name"]) if p.read_bytes() == sent["bytes"]]
    assert len(opened) == 1  # the file itself, with its folder's class as the label
    assert sorted(d.name for d in (env["data"] / "test").iterdir())[sent["label"]] == opened[0].parent.name


def test_misclassified_examples_class_mismatch_and_no_roots(env: dict[str, Path],
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITKD_DATA_ROOTS")
    monkeypatch.setattr(common, "SAMPLES_DIR", env["runs"] / "no-samples")
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
    assert "Training from the browser is off" in "\n".join(e.value for e in at.info)
    assert not at.button


def test_default_pair_prefers_the_cifar10_teacher_and_its_distilled_student() -> None:
    from app.common import CheckpointEntry, default_pair

    def entry(name: str, classes: list[str]) -> CheckpointEntry:
        meta = {"class_names": classes, "img_size": 32, "head_map": None}
        return CheckpointEntry(f"/ckpt/{name}.safetensors", f"checkpoints/{name}", "", meta, None)

    nette = [entry(f"imagenette-{role}", ["tench"]) for role in ("student-distilled", "teacher", "student-baseline")]
    cifar = [entry(f"cifar10-{role}", ["cat"]) for role in ("student-baseline", "teacher")]
    mine = [entry("my-student", ["cat"])]

    def names(pair: tuple[CheckpointEntry, CheckpointEntry]) -> tuple[str, str]:
        return Path(pair[0].path).stem, Path(pair[1].path).stem

    assert names(default_pair(nette)) == ("imagenette-teacher", "imagenette-student-distilled")
    assert names(default_pair(nette + mine + cifar)) == ("cifar10-teacher", "cifar10-student-baseline")
    distilled = entry("cifar10-student-distilled", ["cat"])
    assert names(default_pair([*mine, distilled, *nette, *cifar])) == ("cifar10-teacher", "cifar10-student-distilled")


# --------------------------------------------------------------------------------------------- bundled samples

def test_samples_are_exactly_what_the_script_makes(tmp_path: Path) -> None:
    """samples/ holds the first files (by name) of each class, byte for byte; a rerun reproduces it."""
    import importlib.util

    datasets = REPO_ROOT.parent / "shared" / "datasets"
    if not (datasets / "cifar10" / "test").is_dir():
        pytest.skip(f"{datasets} not present")
    spec = importlib.util.spec_from_file_location("make_samples", REPO_ROOT / "scripts" / "make_samples.py")
    make_samples = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_samples)
    assert make_samples.main(["--datasets", str(datasets), "--out", str(tmp_path)]) == 0
    bundled = REPO_ROOT / "samples"
    for split, per_class in (("cifar10/test", 100), ("imagenette/val", 50)):
        made = sorted(p.relative_to(tmp_path).as_posix() for p in (tmp_path / split).rglob("*") if p.is_file())
        have = sorted(p.relative_to(bundled).as_posix() for p in (bundled / split).rglob("*") if p.is_file())
        assert made == have and len(have) == 10 * per_class
        assert all((tmp_path / rel).read_bytes() == (bundled / rel).read_bytes() for rel in have)
    total = sum(p.stat().st_size for p in bundled.rglob("*") if p.is_file())
    assert total < 5e6, f"samples/ is {total / 1e6:.1f} MB: keep the repository small"


def test_misclassified_scans_the_bundled_samples_without_configuration(env: dict[str, Path],
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITKD_DATA_ROOTS")
    at = AppTest.from_file(APP, default_timeout=120)
    at.session_state["vitkd_teacher"] = str(REPO_ROOT / "checkpoints" / "cifar10-teacher.safetensors")
    at.session_state["vitkd_student"] = str(REPO_ROOT / "checkpoints" / "cifar10-student-distilled.safetensors")
    at.switch_page("views/misclassified.py")
    at.run()
    assert not at.exception
    assert "No data roots are configured" not in _texts(at)
    options = at.selectbox(key="misc_split").options
    assert any(o.startswith("cifar10/test") for o in options) and any(o.startswith("imagenette/val") for o in options)
    at.selectbox(key="misc_split").set_value(next(o for o in options if o.startswith("cifar10/test"))).run()
    at.number_input(key="misc_limit").set_value(100).run()
    at.button[0].click().run()  # Scan
    assert not at.exception and not at.error
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Images"] == "100"
    assert 50.0 <= float(metrics["Teacher accuracy"].split()[0]) <= 100.0  # 75.5 % on the whole test split


def test_train_page_offers_cifar_downloads_only_with_a_network(env: dict[str, Path],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VITKD_DATA_ROOTS")
    at = _app(env, "views/train.py")  # the bundled samples have no train/ split: nothing to train on
    info = "\n".join(i.value for i in at.info)
    assert "No training data" in info and "VITKD_DATA_ROOTS" in info

    monkeypatch.setattr(common, "network_available", lambda *a, **k: True)
    at.run()
    assert not at.exception
    assert at.selectbox(key="train_data").options[-2:] == [
        "CIFAR-10 (torchvision, downloaded on first use, 170 MB)",
        "CIFAR-100 (torchvision, downloaded on first use, 170 MB)"]
    at.radio(key="train_mode").set_value("train").run()
    at.selectbox(key="train_data").set_value("cifar10").run()
    command = at.code[0].value
    assert "--data cifar10" in command and "--download" in command
    assert not at.button(key="train_start").disabled


def test_train_page_distils_a_deit_student_with_deit_hard(env: dict[str, Path]) -> None:
    at = _app(env, "views/train.py")
    at.radio(key="train_mode").set_value("distill").run()
    at.selectbox(key="train_teacher").set_value(str(env["teacher"])).run()
    assert "cifar-student-deit" in at.selectbox(key="train_student").options  # a plain teacher's 8x8 grid + dist
    at.selectbox(key="train_student").set_value("cifar-student-deit").run()
    at.text_input(key="train_head_map").input("block:1->3[0,2,4,6]").run()
    assert not at.exception and not at.error
    command = at.code[0].value
    assert "distill --model cifar-student-deit" in command and "--kd deit-hard" in command
    at.radio(key="train_mode").set_value("train").run()
    assert "cifar-student-deit" not in at.selectbox(key="train_model").options  # needs a teacher


def test_train_page_sets_weighting_and_logit_kd_and_kd_alone(env: dict[str, Path]) -> None:
    at = _app(env, "views/train.py")
    at.radio(key="train_mode").set_value("distill").run()
    at.selectbox(key="train_teacher").set_value(str(env["teacher"])).run()
    at.text_input(key="train_head_map").input("block:1->3[0,2,4,6]").run()
    assert at.number_input(key="train_kd_temperature").disabled  # no KD term yet
    at.selectbox(key="train_weighting").set_value("student-confidence").run()
    at.number_input(key="train_kd_weight").set_value(0.5).run()
    at.number_input(key="train_kd_temperature").set_value(2.0).run()
    assert not at.exception and not at.error
    command = at.code[0].value
    for flag in ("--map block:1->3[0,2,4,6]", "--weighting student-confidence", "--kd-weight 0.5",
                 "--kd-temperature 2.0", "--alpha 0.5"):
        assert f" {flag} " in command, (flag, command)

    at.slider(key="train_alpha").set_value(1.0).run()  # logit distillation alone: no head map, no weighting
    assert not at.exception and not at.error
    command = at.code[0].value
    assert " --alpha 1.0 " in command and " --kd-weight 0.5 " in command
    assert "--map" not in command and " --weighting none " in command
    assert not at.button(key="train_start").disabled
    at.text_input(key="train_head_map").input("nonsense").run()  # unused at alpha 1: does not block
    assert not at.button(key="train_start").disabled

    at.number_input(key="train_kd_weight").set_value(0.0).run()  # alpha 1 and no KD: the teacher teaches nothing
    assert "Set a logit KD weight" in _texts(at)
    assert "the teacher teaches nothing" in "\n".join(e.value for e in at.error)
    assert at.button(key="train_start").disabled


# --------------------------------------------------------------------------------------------- recipes

RECIPES = [
    ({}, None, "not recorded"),
    ({"train_config": {"teacher": None, "alpha": 1.0}}, {"distilled": False}, "labels only (cross-entropy)"),
    ({"train_config": {"teacher": "t.safetensors", "head_map": "block:4->2", "loss": "kl", "alpha": 0.5,
                       "gate": "teacher-correct", "weighting": "student-doubt", "kd": "none", "kd_weight": 0.5,
                       "kd_temperature": 2.0}},
     {"attention": True, "gate": "teacher-correct", "weighting": "student-doubt", "kd_weight": 0.5},
     "KL attention loss on head map block:4->2, alpha 0.5 (0.5 CE + 0.5 attention); gate teacher-correct; "
     "weighting student-doubt; logit KD weight 0.5, temperature 2"),
    ({"train_config": {"teacher": "t.safetensors", "head_map": None, "alpha": 1.0, "kd_weight": 0.5}},
     {"attention": False, "kd": "none", "kd_temperature": 4.0}, "logit KD weight 0.5, temperature 4"),
    ({"train_config": {"teacher": "t.safetensors", "head_map": None, "alpha": 1.0, "kd": "deit-hard"}},
     {"attention": False, "kd": "deit-hard"},
     "DeiT hard-label distillation (distillation head learns the teacher's argmax)"),
    # An older checkpoint whose typed spec meant one-to-one heads then: the resolved rows say what trained.
    ({"train_config": {"teacher": "t.safetensors", "head_map": "block:4->2", "loss": "kl", "alpha": 0.5},
      "head_map": [[4, 0, 2, 0], [4, 1, 2, 1]]},
     {"head_map": "block:4->2", "head_pairs": "T4.0->S2.0, T4.1->S2.1"},
     "KL attention loss on T4.0->S2.0, T4.1->S2.1 (typed block:4->2), alpha 0.5 (0.5 CE + 0.5 attention)"),
    # An older checkpoint: no weighting/kd keys (TrainConfig's defaults apply).
    ({"train_config": {"teacher": "t.safetensors", "head_map": "encoder", "loss": "mse", "alpha": 0.1,
                       "gate": "none"}},
     {"weighting": "none", "kd": "none", "kd_weight": 0.0},
     "MSE attention loss on head map encoder, alpha 0.1 (0.1 CE + 0.9 attention)"),
]


@pytest.mark.parametrize("meta, expected, text", RECIPES)
def test_training_recipe_from_metadata(meta: dict, expected: dict | None, text: str) -> None:
    recipe = training_recipe(meta)
    if expected is None:
        assert recipe is None
    else:
        assert {k: recipe[k] for k in expected} == expected
    assert describe_recipe(recipe) == text


def test_recipe_in_the_summary_the_sidebar_and_the_models_page(env: dict[str, Path]) -> None:
    pair = load_pair(env["teacher"], env["student"])
    summary = model_summary(pair.student, pair.student_meta)
    # The tiny pair: 2 blocks each, 8 teacher heads in even groups of two per student head.
    assert summary["recipe_text"] == ("KL attention loss on T0.{0,1}->S0.0, T0.{2,3}->S0.1, T0.{4,5}->S0.2, "
                                      "T0.{6,7}->S0.3, T1.{0,1}->S1.0, T1.{2,3}->S1.1, T1.{4,5}->S1.2, "
                                      "T1.{6,7}->S1.3 (typed encoder), alpha 0.5 (0.5 CE + 0.5 attention)")
    assert f"| Recipe | {common.escape_markdown(summary['recipe_text'])} |" in common.summary_markdown(summary)
    at = _app(env, "views/models.py")
    sidebar = "\n".join(m.value for m in at.sidebar.markdown)
    assert "| Recipe | labels only (cross-entropy) |" in sidebar  # the teacher
    assert f"| Recipe | {common.escape_markdown(summary['recipe_text'])} |" in sidebar  # the student
    table = at.dataframe[0].value
    recipes = dict(zip(table["checkpoint"], table["recipe"], strict=True))
    assert recipes["checkpoints/tiny-student"] == summary["recipe_text"]
    assert recipes["checkpoints/tiny-teacher"] == "labels only (cross-entropy)"


# --------------------------------------------------------------------------------------------- DeiT pairs

META = {"class_names": ["a", "b", "c", "d"], "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "img_size": 32}


@pytest.fixture(scope="module")
def deit_pair(tmp_path_factory: pytest.TempPathFactory, sharpen) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("deit")
    torch.manual_seed(0)
    teacher = save_checkpoint(sharpen(build_model("cifar-teacher", 4, depth=2), 4.0), META,
                              folder / "teacher.safetensors")
    student = save_checkpoint(sharpen(build_model("cifar-student-deit", num_classes=4, depth=2), 4.0),
                              dict(META, head_map=[[1, h, 1, h] for h in range(4)]), folder / "deit.safetensors")
    return teacher, student


def test_a_deit_student_pairs_with_a_plain_teacher(deit_pair: tuple[Path, Path]) -> None:
    teacher, student = deit_pair
    for first, second, deit_role in ((teacher, student, "student"), (student, teacher, "teacher")):
        pair = load_pair(first, second)
        plain_role = "teacher" if deit_role == "student" else "student"
        assert pair.layout == TokenLayout(1, (8, 8)) == pair.model_layout(plain_role)
        assert pair.model_layout(deit_role) == TokenLayout(2, (8, 8))
        assert pair.tokens(plain_role) == tuple(range(65))
        assert pair.tokens(deit_role) == (0, *range(2, 66))  # CLS, then the 64 patches: the distillation token goes
    pair = load_pair(teacher, student)
    assert pair.head_map is not None and not pair.notes


def test_deit_maps_compare_cls_and_patches(deit_pair: tuple[Path, Path]) -> None:
    teacher, student = deit_pair
    pair = load_pair(teacher, student)
    images = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        probs = capture_attention(pair.student, images).attn_probs[1][0].numpy()  # [H, 66, 66]
    kept = restrict_tokens(probs, pair.tokens("student"))
    assert kept.shape == (4, 65, 65)
    # Independent reference: drop token 1's row and column by hand, renormalise every row.
    for h in range(4):
        for q_new, q in enumerate([0, *range(2, 66)]):
            row = np.delete(probs[h, q], 1)
            np.testing.assert_allclose(kept[h, q_new], row / row.sum(), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(kept.sum(-1), 1.0, rtol=1e-5)
    assert probs[:, :, 1].min() > 0  # the distillation token did take attention, so renormalising mattered


def test_pairs_still_refuse_other_token_layouts(deit_pair: tuple[Path, Path], tmp_path: Path) -> None:
    teacher, student = deit_pair
    registers = save_checkpoint(build_model("cifar-student", 4, depth=2, reg_tokens=1), META,
                                tmp_path / "registers.safetensors")
    with pytest.raises(IncompatibleModelsError, match="prefix tokens differ"):  # a register is not a DeiT token
        load_pair(teacher, registers)
    # Patch grids may differ: a 4x4 DeiT student against the 8x8 plain teacher, compared on 4x4 without its
    # distillation token; two DeiT models on different grids keep both prefix tokens.
    coarse = save_checkpoint(build_model("cifar-student-deit", 4, depth=2, patch_size=8), META,
                             tmp_path / "coarse.safetensors")
    pair = load_pair(teacher, coarse)
    assert pair.layout == TokenLayout(1, (4, 4)) and pair.map_layout("teacher") == TokenLayout(1, (8, 8))
    assert pair.tokens("student") == (0, *range(2, 18))
    deit_student = build_model("cifar-student-deit", 4, depth=2)
    pair = check_pair(build_model("cifar-student-deit", 4, depth=2, patch_size=8), META, deit_student, META)
    assert pair.layout == TokenLayout(2, (4, 4)) and pair.map_layout("student") == TokenLayout(2, (8, 8))
    no_cls = build_model("cifar-student", 4, depth=2, class_token=False, global_pool="avg")  # no prefix token
    with pytest.raises(IncompatibleModelsError, match="prefix tokens differ"):  # 2 prefix tokens against 0
        check_pair(no_cls, META, deit_student, META)
