"""``python -m vitkd`` end to end in subprocesses: train, distill, eval, and one-line errors."""

from __future__ import annotations

import csv
import json
import os
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


# ------------------------------------------------------------------------------------- models: overrides, weights

def test_model_overrides_reach_the_checkpoint(image_folder: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert main(["train", "--model", "cifar-student", "--model-override", "patch_size=8", "--model-override",
                 "depth=1, qk_norm=true", "--data", f"imagefolder:{image_folder}", "--out", str(out), "--epochs", "1",
                 "--batch-size", "32", "--device", "cpu", "--no-progress"]) == 0
    model, meta = load_checkpoint(out / "last.safetensors")
    assert meta["model"] == {"name": "cifar-student", "num_classes": 4, "img_size": None,
                             "overrides": {"patch_size": 8, "depth": 1, "qk_norm": True}}
    assert meta["train_config"]["model_overrides"] == {"patch_size": 8, "depth": 1, "qk_norm": True}
    assert tuple(model.patch_embed.patch_size) == (8, 8) and len(model.blocks) == 1
    assert tuple(model.patch_embed.grid_size) == (4, 4)


@pytest.mark.parametrize("extra, match", [
    (["--model-override", "colour=red"], "unknown model override 'colour'"),
    (["--model-override", "depth"], "'depth' is not KEY=VALUE"),
    (["--model-override", "num_classes=3"], "'num_classes' is not allowed"),
    (["--model-override", "num_heads=5"], "cannot build preset 'cifar-student' with overrides {'num_heads': 5}"),
    (["--model", "timm:cifar-student"], "drop the 'timm:' prefix"),
    (["--model", "timm:vit_tiny_patch16_224", "--pretrained-file", "{missing}"], "no such file"),
    (["--model", "timm:vit_tiny_patch16_224", "--pretrained", "--pretrained-file", "{missing}"], "pass one"),
    (["--pretrained"], "preset 'cifar-student' has no pretrained weights"),
])
def test_model_option_errors_are_one_line_before_any_data(extra: list[str], match: str, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    argv = ["train", "--model", "cifar-student", "--data", f"imagefolder:{tmp_path / 'no-data'}", "--out",
            str(tmp_path / "out"), "--epochs", "1", "--device", "cpu", "--no-progress"]
    assert main(argv + [arg.format(missing=tmp_path / "missing.safetensors") for arg in extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err


def test_pretrained_without_a_network_is_one_line(image_folder: Path, tmp_path: Path) -> None:
    """timm's download fails offline (forced here, with an empty cache): one line pointing at --pretrained-file."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    result = subprocess.run([sys.executable, "-m", "vitkd", "train", "--model", "timm:vit_tiny_patch16_224",
                             "--pretrained", "--data", f"imagefolder:{image_folder}", "--out", str(tmp_path / "run"),
                             "--epochs", "1", "--device", "cpu", "--no-progress"],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=150, env=env)
    _assert_one_line_error(result, "cannot download timm's pretrained weights for 'vit_tiny_patch16_224'")
    assert "--pretrained-file PATH" in result.stderr
    assert not (tmp_path / "run").exists()  # refused before the data was read or the run folder made


# ----------------------------------------------------------------------------------------------------------- scan

def _plain_forward_counts(teacher_ckpt: Path, student_ckpt: Path, test_dir: Path) -> tuple[dict[str, int], int]:
    """Group counts computed here: PIL decode, each model's own mean/std by hand, timm's fused forward, argmax."""
    preds = {}
    for role, checkpoint in (("teacher", teacher_ckpt), ("student", student_ckpt)):
        model, meta = load_checkpoint(checkpoint)
        mean, std = np.asarray(meta["mean"]).reshape(1, 1, 3), np.asarray(meta["std"]).reshape(1, 1, 3)
        for label, cls in enumerate(meta["class_names"]):
            for file in sorted((test_dir / cls).iterdir()):
                pixels = np.asarray(Image.open(file).convert("RGB"), dtype=np.float64) / 255.0
                x = torch.from_numpy(((pixels - mean) / std).transpose(2, 0, 1)).float()[None]
                with torch.no_grad():
                    preds[role, str(file)] = (int(model(x).argmax(-1).item()), label)
    counts = {"teacher_right_student_wrong": 0, "student_right_teacher_wrong": 0, "both_wrong": 0, "both_right": 0}
    files = sorted({file for _, file in preds})
    for file in files:
        (t_pred, label), (s_pred, _) = preds["teacher", file], preds["student", file]
        group = {(True, False): "teacher_right_student_wrong", (False, True): "student_right_teacher_wrong",
                 (False, False): "both_wrong", (True, True): "both_right"}[(t_pred == label, s_pred == label)]
        counts[group] += 1
    return counts, len(files)


def test_scan_json_and_csv_match_per_image_scan_and_plain_forwards(tiny_pair, image_folder: Path, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from vitkd.scan import scan_split

    csv_path = tmp_path / "out" / "scan.csv"
    argv = ["scan", "--teacher", str(tiny_pair.teacher), "--student", str(tiny_pair.student), "--data",
            f"imagefolder:{image_folder}", "--csv", str(csv_path), "--json", "--device", "cpu", "--batch-size", "16"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out.strip())
    counts, n = _plain_forward_counts(tiny_pair.teacher, tiny_pair.student, image_folder / "test")
    assert report["n"] == n == 40 and report["counts"] == counts and report["skipped"] == 0
    assert report["csv"] == str(csv_path) and report["split"] == "test"
    expected_t = 100.0 * (counts["both_right"] + counts["teacher_right_student_wrong"]) / n
    assert report["teacher_accuracy"] == pytest.approx(expected_t)

    # The per-image path (PIL file by file) on the same folder gives the same rows.
    teacher, teacher_meta = load_checkpoint(tiny_pair.teacher)
    student, student_meta = load_checkpoint(tiny_pair.student)
    reference = scan_split(teacher, teacher_meta, student, student_meta, image_folder / "test")
    assert reference.counts == report["counts"]
    assert report["mean_divergence"] == pytest.approx(sum(r.divergence for r in reference.rows) / n, rel=1e-4)
    with csv_path.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["path", "label", "label_name", "teacher_pred", "teacher_pred_name", "teacher_conf",
                             "student_pred", "student_pred_name", "student_conf", "group", "divergence"]
    assert len(rows) == 40
    for row, ref in zip(rows, reference.rows, strict=True):
        assert (row["path"], int(row["label"]), row["label_name"], int(row["teacher_pred"]),
                int(row["student_pred"]), row["group"]) == (ref.path, ref.label, ref.label_name, ref.teacher_pred,
                                                            ref.student_pred, ref.group)
        assert float(row["teacher_conf"]) == pytest.approx(ref.teacher_conf, abs=1e-5)
        assert float(row["student_conf"]) == pytest.approx(ref.student_conf, abs=1e-5)
        assert float(row["divergence"]) == pytest.approx(ref.divergence, rel=1e-4, abs=1e-8)
    assert len({row["divergence"] for row in rows}) > 1


def test_scan_text_output_in_a_subprocess(tiny_pair, image_folder: Path) -> None:
    result = run_cli("scan", "--teacher", str(tiny_pair.teacher), "--student", str(tiny_pair.student), "--data",
                     f"imagefolder:{image_folder}", "--limit", "8", "--device", "cpu", "--threads", "1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith(f"8 test images of imagefolder:{image_folder}: teacher ")
    counts = {line.split(":")[0].strip(): int(line.rsplit(":", 1)[1]) for line in lines[1:]}
    assert list(counts) == ["Teacher right, student wrong", "Student right, teacher wrong", "Both wrong", "Both right"]
    assert sum(counts.values()) == 8


@pytest.mark.parametrize("argv, match", [
    (["--teacher", "{missing}"], "no such checkpoint"),
    (["--data", "imagefolder:{missing}"], "does not exist"),
    (["--data", "imagefolder:{other}"], "the models predict 4 classes (blue, gray, green, red) but"),
    (["--student", "{renamed}"], "and student classes (red, green, blue, gray) differ"),
    (["--limit", "0"], "limit must be positive"),
    (["--csv", "{not_a_dir}/scan.csv"], "cannot write the scan's CSV to"),
])
def test_scan_user_errors_are_one_line(argv: list[str], match: str, tiny_pair, image_folder: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    from vitkd.checkpoint import save_checkpoint
    from vitkd.models import build_model

    other = tmp_path / "other"
    for split in ("train", "test"):
        (other / split / "cat").mkdir(parents=True)
        Image.new("RGB", (32, 32)).save(other / split / "cat" / "0.png")
    _, meta = load_checkpoint(tiny_pair.student)
    renamed = build_model("cifar-student", 4, patch_size=8, depth=1)  # another grid scans; other classes do not
    renamed_meta = dict({k: meta[k] for k in ("mean", "std", "img_size")}, class_names=["red", "green", "blue", "gray"])
    save_checkpoint(renamed, renamed_meta, tmp_path / "r.safetensors")
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    values = dict(missing=tmp_path / "missing", other=other, renamed=tmp_path / "r.safetensors", not_a_dir=not_a_dir)
    options = {"--teacher": str(tiny_pair.teacher), "--student": str(tiny_pair.student),
               "--data": f"imagefolder:{image_folder}", "--device": "cpu"}
    extra = [arg.format(**values) for arg in argv]
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        options[flag] = value
    assert main(["scan", *(x for item in options.items() for x in item)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and match in err[0], err
