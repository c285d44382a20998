"""``python -m vitkd`` end to end in subprocesses: train, distill, eval, and one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkd.checkpoint import load_checkpoint
from vitkd.cli import main

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    """Run ``python -m vitkd ARGS`` from the repo root (env carries ``VITKD_CACHE`` and thread limits)."""
    return subprocess.run([sys.executable, "-m", "vitkd", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=150)


def _assert_one_line_error(result: subprocess.CompletedProcess, match: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert match in lines[0]
    assert "Traceback" not in result.stderr


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> dict[str, Path]:
    """A teacher trained and a student distilled by the CLI, 1 epoch each on ``image_folder``."""
    runs = tmp_path_factory.mktemp("cli_runs")
    common = ["--data", f"imagefolder:{image_folder}", "--epochs", "1", "--batch-size", "32", "--device", "cpu",
              "--threads", "1", "--no-progress"]
    teacher = run_cli("train", "--model", "cifar-student", "--out", str(runs / "teacher"), *common)
    assert teacher.returncode == 0, teacher.stderr
    teacher_ckpt = runs / "teacher" / "last.safetensors"
    student = run_cli("distill", "--model", "cifar-student", "--teacher", str(teacher_ckpt), "--map",
                      "block:3->3[1,0,3,2];2->1[1,0,3,2]", "--loss", "mse", "--alpha", "0.5",
                      "--out", str(runs / "student"), *common)
    assert student.returncode == 0, student.stderr
    return {"teacher": teacher_ckpt, "student": runs / "student" / "last.safetensors",
            "teacher_stdout": Path(json.loads(teacher.stdout.strip().splitlines()[-1])["out"]),
            "student_stdout": Path(json.loads(student.stdout.strip().splitlines()[-1])["out"])}


def _direct_accuracy(checkpoint: Path, test_dir: Path) -> tuple[float, int]:
    """Accuracy computed here: PIL decode, hand normalisation with the checkpoint's mean/std, argmax."""
    model, meta = load_checkpoint(checkpoint)
    classes = sorted(p.name for p in test_dir.iterdir())
    assert classes == meta["class_names"]
    mean = np.asarray(meta["mean"]).reshape(1, 1, 3)
    std = np.asarray(meta["std"]).reshape(1, 1, 3)
    correct = total = 0
    for label, cls in enumerate(classes):
        for file in sorted((test_dir / cls).iterdir()):
            pixels = np.asarray(Image.open(file).convert("RGB"), dtype=np.float64) / 255.0
            x = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)).float()[None]
            with torch.no_grad():
                correct += int(model(x).argmax(-1).item() == label)
            total += 1
    return 100.0 * correct / total, total


def test_train_and_distill_write_loadable_checkpoints(cli_runs: dict[str, Path]) -> None:
    assert cli_runs["teacher_stdout"] == cli_runs["teacher"].parent
    teacher, teacher_meta = load_checkpoint(cli_runs["teacher"])
    student, student_meta = load_checkpoint(cli_runs["student"])
    assert teacher_meta["kind"] == "supervised" and student_meta["kind"] == "distilled"
    assert student_meta["head_map"] == [[tb, th, sb, sh] for tb, sb in ((3, 3), (2, 1))
                                        for sh, th in enumerate([1, 0, 3, 2])]
    assert student_meta["train_config"]["loss"] == "mse" and student_meta["train_config"]["alpha"] == 0.5
    assert student_meta["teacher"]["path"] == str(cli_runs["teacher"])
    assert len(student.blocks) == 4 and student_meta["epoch"] == 1
    for run in ("teacher", "student"):
        lines = (cli_runs[run].parent / "metrics.jsonl").read_text().splitlines()
        assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


@pytest.mark.parametrize("run", ["teacher", "student"])
def test_eval_json_matches_direct_evaluation(cli_runs: dict[str, Path], image_folder: Path, run: str,
                                             capsys: pytest.CaptureFixture) -> None:
    argv = ["eval", str(cli_runs[run]), "--json", "--device", "cpu"]
    if run == "student":  # one real subprocess; the other in-process to save an interpreter start
        result = run_cli(*argv)
        assert result.returncode == 0, result.stderr
        stdout = result.stdout
    else:
        assert main(argv) == 0
        stdout = capsys.readouterr().out
    report = json.loads(stdout.strip().splitlines()[-1])
    assert {"accuracy", "n", "checkpoint"} <= report.keys()
    accuracy, n = _direct_accuracy(cli_runs[run], image_folder / "test")
    assert report["n"] == n == 40 and report["checkpoint"] == str(cli_runs[run])
    assert report["accuracy"] == pytest.approx(accuracy)


def test_unknown_preset_is_one_line_error(image_folder: Path, tmp_path: Path) -> None:
    result = run_cli("train", "--model", "no-such-preset", "--data", f"imagefolder:{image_folder}", "--out",
                     str(tmp_path / "run"), "--epochs", "1", "--no-progress")
    _assert_one_line_error(result, "no-such-preset")


def test_bad_map_is_one_line_error(cli_runs: dict[str, Path], image_folder: Path, tmp_path: Path) -> None:
    result = run_cli("distill", "--model", "cifar-student", "--teacher", str(cli_runs["teacher"]), "--map",
                     "block:9->0", "--data", f"imagefolder:{image_folder}", "--out", str(tmp_path / "run"),
                     "--epochs", "1", "--device", "cpu", "--no-progress")
    _assert_one_line_error(result, "teacher block 9 out of range")


@pytest.mark.parametrize("argv, match", [
    (["eval", "{missing}", "--device", "cpu"], "no such checkpoint"),
    (["eval", "{garbage}", "--device", "cpu"], "not a readable safetensors"),
    (["train", "--model", "cifar-student", "--data", "imagefolder:{missing}", "--out", "{out}", "--no-progress"],
     "does not exist"),
    (["distill", "--model", "cifar-student", "--teacher", "{teacher}", "--map", "heads:1.0->1.0", "--data",
      "imagefolder:{images}", "--out", "{out}", "--no-progress", "--device", "cpu"], "start with"),
])
def test_more_user_errors_in_process(argv: list[str], match: str, cli_runs: dict[str, Path], image_folder: Path,
                                     tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    values = dict(missing=tmp_path / "missing", garbage=garbage, out=tmp_path / "out", teacher=cli_runs["teacher"],
                  images=image_folder)
    assert main([arg.format(**values) for arg in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
