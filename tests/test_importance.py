"""Switching heads off: the capture's head mask against timm's own forward with a hook, the ranking against
a loop written here, the CLI on a tiny checkpoint."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import CLASS_COLORS, write_image_folder
from PIL import Image

import vitkd.data
from vitkd.attention import head_masked_logits
from vitkd.checkpoint import load_checkpoint, save_checkpoint
from vitkd.cli import main
from vitkd.data import load_split, normalize
from vitkd.errors import ConfigError, IncompatibleModelsError
from vitkd.importance import HeadImportance, head_importance, head_importance_checkpoint
from vitkd.models import build_model


def _silenced(model: torch.nn.Module, block: int, head: int) -> torch.utils.hooks.RemovableHandle:
    """timm's fused forward with one head's slice of the output projection's input zeroed (the reference)."""
    attn = model.blocks[block].attn

    def zero(_module: torch.nn.Module, args: tuple[torch.Tensor]) -> tuple[torch.Tensor]:
        x = args[0].clone()
        x[..., head * attn.head_dim:(head + 1) * attn.head_dim] = 0
        return (x,)

    return attn.proj.register_forward_pre_hook(zero)


def _model(name: str = "cifar-student", **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_model(name, num_classes=5, **overrides).eval()


@pytest.mark.parametrize("name, overrides", [("cifar-student", {"depth": 3}),
                                             ("cifar-student-sl", {"depth": 2}),
                                             ("cifar-student-deit", {"depth": 2})])
@pytest.mark.parametrize("block", [0, 1])
def test_head_masks_equal_timm_forwards_with_those_heads_zeroed(name: str, overrides: dict, block: int) -> None:
    model = _model(name, **overrides)
    images = torch.randn(4, 3, 32, 32)
    masks = torch.tensor([[1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 0.0, 1.0], [0.0, 1.0, 1.0, 0.0]])
    with torch.no_grad():
        plain = model(images)
        shown = head_masked_logits(model, images, block, masks)
        references = []
        for row in masks:
            handles = [_silenced(model, block, int(h)) for h in torch.nonzero(row == 0).flatten()]
            try:
                references.append(model(images))
            finally:
                for handle in handles:
                    handle.remove()
    assert shown.shape == (3, 4, 5)
    np.testing.assert_allclose(shown[0], plain, atol=1e-5)  # every head on: the model itself
    for got, reference in zip(shown[1:], references[1:], strict=True):
        assert (reference - plain).abs().max() > 1e-3  # the heads mattered, so the check means something
        np.testing.assert_allclose(got, reference, atol=1e-5)


def test_head_masks_are_checked() -> None:
    model = _model(depth=2)
    with pytest.raises(IncompatibleModelsError, match=r"expected \[K, 4\]"):
        head_masked_logits(model, torch.randn(1, 3, 32, 32), 0, torch.ones(2, 3))
    with pytest.raises(IncompatibleModelsError, match="block 5 out of range"):
        head_masked_logits(model, torch.randn(1, 3, 32, 32), 5, torch.ones(1, 4))


def test_importance_against_a_loop_over_hooked_forwards() -> None:
    model = _model(depth=2)
    torch.manual_seed(1)
    images = torch.randn(60, 3, 32, 32)
    with torch.no_grad():  # heads that weigh (timm initialises them near silent), labels right but for a few
        for blk in model.blocks:
            blk.attn.proj.weight.mul_(30)
        labels = model(images).argmax(-1)
    labels[:7] = (labels[:7] + 1) % 5
    seen: list[tuple[int, int]] = []
    result = head_importance(model, images, labels, batch_size=25, progress=lambda d, t: seen.append((d, t)))
    assert seen == [(i, 9) for i in range(1, 10)]  # 3 batches x (a plain pass + one per block)
    assert len(set(result.masked_accuracy.ravel().tolist())) > 2  # accuracies differ between heads

    def score(logits: torch.Tensor) -> tuple[float, float]:
        return float((logits.argmax(-1) == labels).double().mean()) * 100, float(F.cross_entropy(logits, labels))

    with torch.no_grad():
        accuracy, loss = score(model(images))
        for block in range(2):
            for head in range(4):
                handle = _silenced(model, block, head)
                try:
                    acc_bh, loss_bh = score(model(images))
                finally:
                    handle.remove()
                assert result.masked_accuracy[block, head] == pytest.approx(acc_bh)
                assert result.masked_loss[block, head] == pytest.approx(loss_bh, rel=1e-5)
    assert (result.accuracy, result.n) == (pytest.approx(accuracy), 60)
    assert result.loss == pytest.approx(loss, rel=1e-5)
    with pytest.raises(ValueError, match="eval mode"):
        head_importance(model.train(), images, labels)


def test_ranking_and_drops_by_hand() -> None:
    result = HeadImportance(accuracy=80.0, loss=1.0, masked_accuracy=np.array([[79.0, 80.5], [70.0, 80.0]]),
                            masked_loss=np.array([[1.2, 0.9], [1.5, 1.2]]), n=100)
    np.testing.assert_allclose(result.accuracy_drop, [[1.0, -0.5], [10.0, 0.0]])
    np.testing.assert_allclose(result.loss_increase, [[0.2, -0.1], [0.5, 0.2]])
    assert result.ranking() == [(1, 0), (0, 0), (1, 1), (0, 1)]  # ties keep block-then-head order
    assert result.to_dict()["ranking"] == [[1, 0], [0, 0], [1, 1], [0, 1]]
    assert "1.0 (+0.5000), 0.0 (+0.2000)" in result.to_text()


def test_checkpoint_ranking_reads_train_images_and_refuses_other_classes(tiny_pair, image_folder: Path,
                                                                          tmp_path: Path) -> None:
    result = head_importance_checkpoint(tiny_pair.student, data=f"imagefolder:{image_folder}", limit=7,
                                        device="cpu")
    model, meta = load_checkpoint(tiny_pair.student)
    split = load_split(f"imagefolder:{image_folder}", "train", 32, progress=False)
    picks = [0, 22, 45, 68, 91, 114, 137]  # 7 evenly spaced of 160 (every 160/7 = 22.9), by hand
    direct = head_importance(model, normalize(split.images[picks], meta["mean"], meta["std"]), split.labels[picks])
    assert result.n == 7
    np.testing.assert_allclose(result.masked_loss, direct.masked_loss, rtol=1e-6)
    other = tmp_path / "other"
    for name in ("train", "test"):
        (other / name / "cat").mkdir(parents=True)
        from PIL import Image
        Image.new("RGB", (32, 32)).save(other / name / "cat" / "0.png")
    with pytest.raises(ConfigError, match="trained on"):
        head_importance_checkpoint(tiny_pair.student, data=f"imagefolder:{other}", device="cpu")
    with pytest.raises(ConfigError, match="limit must be positive"):
        head_importance_checkpoint(tiny_pair.student, limit=0, device="cpu")


def test_cli_json(tiny_pair, image_folder: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["heads", str(tiny_pair.teacher), "--data", f"imagefolder:{image_folder}", "--limit", "5",
                 "--device", "cpu", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["n"] == 5 and report["split"] == "train"
    drops = np.array(report["accuracy_drop"])
    assert drops.shape == (2, 8) and len(report["ranking"]) == 16
    increases = np.array(report["loss_increase"])
    ranked = [increases[b, h] for b, h in report["ranking"]]
    assert ranked == sorted(ranked, reverse=True)


def test_checkpoint_ranking_decodes_only_the_ranked_images(tmp_path: Path, monkeypatch) -> None:
    """``heads --limit`` decodes the ranked images and nothing else; a test split needs no train/ folder."""
    root = write_image_folder(tmp_path / "data", seed=4)
    source, classes = f"imagefolder:{root}", sorted(CLASS_COLORS)
    torch.manual_seed(0)
    model = build_model("cifar-student", len(classes), depth=2, num_heads=2, embed_dim=32).eval()
    with torch.no_grad():  # heads that weigh (timm initialises them near silent)
        for blk in model.blocks:
            blk.attn.proj.weight.mul_(30)
    mean, std = [0.5, 0.45, 0.4], [0.25, 0.2, 0.3]
    path = save_checkpoint(model, {"class_names": classes, "mean": mean, "std": std, "img_size": 32, "data": source,
                                   "kind": "teacher", "head_map": None, "metrics": {}}, tmp_path / "m.safetensors")
    decoded: list[str] = []
    real_open = vitkd.data.open_rgb
    monkeypatch.setattr(vitkd.data, "open_rgb", lambda file: decoded.append(str(file)) or real_open(file))
    cache = str(tmp_path / "cache")
    # 7 evenly spaced of the 160 train files (every 160/7 = 22.9: 0, 22, 45, 68, 91, 114, 137; 40 per class), by hand
    ranked = [root / "train" / rel for rel in ("blue/000.png", "blue/022.png", "gray/005.png", "gray/028.png",
                                                "green/011.png", "green/034.png", "red/017.png")]
    result = head_importance_checkpoint(path, limit=7, device="cpu", cache_dir=cache)
    assert decoded == [str(f) for f in ranked]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in ranked]).astype(np.float64) / 255.0
    x = torch.from_numpy((pixels - np.array(mean)) / np.array(std)).permute(0, 3, 1, 2).float()
    direct = head_importance(model, x, torch.tensor([0, 0, 1, 1, 2, 2, 3]))
    assert np.ptp(direct.masked_loss) > 1e-3  # the heads matter: the comparison means something
    assert result.n == 7 and result.loss == pytest.approx(direct.loss, rel=1e-5)
    np.testing.assert_allclose(result.masked_loss, direct.masked_loss, rtol=1e-5)
    # The test split of a root with no train/: 6 of 40 (every 6.67: 0, 6, 13, 20, 26, 33), by hand.
    shutil.rmtree(root / "train")
    decoded.clear()
    assert head_importance_checkpoint(path, split="test", limit=6, device="cpu", cache_dir=cache).n == 6
    assert decoded == [str(root / "test" / rel) for rel in ("blue/000.png", "blue/006.png", "gray/003.png",
                                                            "green/000.png", "green/006.png", "red/003.png")]
