"""One normalisation rule per checkpoint: ``eval``, the scan (the app's Misclassifications page) and ``heads``
agree with each other and with a forward by hand, also for checkpoints that record no mean/std."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_COLORS, TEST_PER_CLASS, write_image_folder
from PIL import Image

from vitkd.checkpoint import load_checkpoint, save_checkpoint
from vitkd.evaluation import evaluate_checkpoint
from vitkd.importance import head_importance_checkpoint
from vitkd.models import build_model
from vitkd.pairs import norm_stats
from vitkd.scan import scan_folder, scan_split

CLASSES = tuple(sorted(CLASS_COLORS))
HALF = (0.5, 0.5, 0.5)  # timm's ViT mean and std: the fallback for a preset
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))  # timm's deit_* config
RECORDED_STD = (0.25, 0.2, 0.3)
PRESET = ("cifar-student", {})
TIMM_DEIT = ("deit_tiny_patch16_224", {"patch_size": 4})


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An image folder and a cache shared by the cases. Seed 6: normalised with its train statistics (mean ~0.42,
    std ~0.29, eval's old fallback), the absent cases' accuracies differ from the expected ones, and so does the
    timm case's under 0.5 (the old scan/app fallback)."""
    directory = tmp_path_factory.mktemp("eval_norm")
    return write_image_folder(directory / "data", seed=6), str(directory / "cache")


def _checkpoint(path: Path, model_name: str, overrides: dict, recorded: dict) -> Path:
    torch.manual_seed(0)
    model = build_model(model_name, len(CLASSES), img_size=32, depth=1, num_heads=2, embed_dim=32, **overrides)
    with torch.no_grad():  # logits that move with the input's scale, so a wrong normalisation shows
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0.0, 0.5)
        model.head.weight.normal_(0.0, 1.0)
    meta = {"class_names": list(CLASSES), "img_size": 32, "data": "imagefolder:unused", "kind": "teacher",
            "head_map": None, "metrics": {}, **recorded}
    return save_checkpoint(model, meta, path)


def _by_hand(checkpoint: Path, split_dir: Path, mean: tuple[float, ...], std: tuple[float, ...]) -> dict:
    """Per-file prediction and confidence, accuracy and loss of the saved weights on PIL-decoded files
    normalised here with the expected constants."""
    model, _ = load_checkpoint(checkpoint)
    files = sorted(split_dir.rglob("*.png"))
    labels = torch.tensor([CLASSES.index(f.parent.name) for f in files])
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files]).astype(np.float64) / 255.0
    x = torch.from_numpy((pixels - np.array(mean)) / np.array(std)).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        logits = model(x)
    conf, pred = logits.softmax(-1).max(-1)
    return {"accuracy": 100.0 * float((pred == labels).float().mean()),
            "loss": float(torch.nn.functional.cross_entropy(logits, labels)),
            "files": {f.resolve(): (int(p), float(c)) for f, p, c in zip(files, pred, conf, strict=True)}}


@pytest.mark.parametrize(("model", "recorded", "mean", "std"), [
    pytest.param(PRESET, {}, HALF, HALF, id="preset-absent"),
    pytest.param(PRESET, {"mean": None, "std": None}, HALF, HALF, id="preset-null"),
    pytest.param(PRESET, {"mean": None, "std": list(RECORDED_STD)}, HALF, RECORDED_STD, id="preset-std-only"),
    pytest.param(TIMM_DEIT, {}, *IMAGENET, id="timm-deit-absent"),
])
def test_unrecorded_norm_is_one_rule_for_eval_scan_and_heads(data, tmp_path: Path, model, recorded, mean,
                                                              std) -> None:
    root, cache = data
    source = f"imagefolder:{root}"
    checkpoint = _checkpoint(tmp_path / "foreign.safetensors", *model, recorded)
    loaded, meta = load_checkpoint(checkpoint)
    assert norm_stats(meta) == (mean, std)
    expected = _by_hand(checkpoint, root / "test", mean, std)
    assert 0.0 < expected["accuracy"] < 100.0  # predictions vary: an accuracy that could tell rules apart

    result = evaluate_checkpoint(checkpoint, data=source, device="cpu", cache_dir=cache)  # python -m vitkd eval
    assert result["n"] == len(CLASSES) * TEST_PER_CLASS
    assert result["accuracy"] == pytest.approx(expected["accuracy"])
    assert result["loss"] == pytest.approx(expected["loss"], abs=1e-4)

    heads = head_importance_checkpoint(checkpoint, data=source, split="test", limit=None, device="cpu",
                                       cache_dir=cache)  # python -m vitkd heads
    assert heads.accuracy == pytest.approx(expected["accuracy"])
    assert heads.loss == pytest.approx(expected["loss"], abs=1e-4)

    # The app's Misclassifications page: the cached split (scan_folder) and the file-by-file path (scan_split).
    for scan in (scan_folder(loaded, meta, loaded, meta, root / "test", cache_dir=cache),
                 scan_split(loaded, meta, loaded, meta, root / "test")):
        assert len(scan.rows) == len(expected["files"])
        accuracy = 100.0 * sum(r.teacher_pred == r.label for r in scan.rows) / len(scan.rows)
        assert accuracy == pytest.approx(expected["accuracy"])
        for row in scan.rows:
            pred, conf = expected["files"][Path(row.path).resolve()]
            assert row.teacher_pred == pred and row.teacher_conf == pytest.approx(conf, abs=1e-5)


def test_eval_reads_a_root_without_a_train_split(data, tmp_path: Path) -> None:
    """eval normalises with the checkpoint's statistics, so a root holding only test/ (a held-out folder, the
    bundled samples) evaluates; the accuracy is the forward by hand on the same files."""
    import shutil

    root, cache = data
    test_only = tmp_path / "test_only"
    shutil.copytree(Path(root) / "test", test_only / "test")
    checkpoint = _checkpoint(tmp_path / "m.safetensors", *PRESET, {"mean": list(HALF), "std": list(RECORDED_STD)})
    got = evaluate_checkpoint(checkpoint, data=f"imagefolder:{test_only}", device="cpu", cache_dir=cache)
    expected = _by_hand(checkpoint, test_only / "test", HALF, RECORDED_STD)
    assert got["accuracy"] == pytest.approx(expected["accuracy"]) and got["loss"] == pytest.approx(expected["loss"],
                                                                                                   rel=1e-4)
