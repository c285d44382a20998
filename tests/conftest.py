"""Shared fixtures: a tiny generated image folder and a tiny teacher/student checkpoint pair.

Everything lives under pytest's tmp dirs; ``VITKD_CACHE`` points at a temp folder for the
whole session so no test writes to ``~/.cache/vitkd``. No network, CPU only.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import torch
from PIL import Image

# Per-class base colours: classes differ in colour so a 1-epoch model can learn something.
CLASS_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 200, 40),
    "blue": (40, 40, 200),
    "gray": (128, 128, 128),
}
IMAGE_SIZE = 32
TRAIN_PER_CLASS = 40
TEST_PER_CLASS = 10


class TinyPair(NamedTuple):
    """Checkpoint paths of a tiny supervised teacher and a student distilled from it (1 epoch each)."""

    teacher: Path
    student: Path


def write_image_folder(root: Path, seed: int = 0, test_dir: str = "test") -> Path:
    """Write ROOT/{train,TEST_DIR}/<class>/<n>.png: 32x32 noisy colour squares with a bright patch."""
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", TRAIN_PER_CLASS), (test_dir, TEST_PER_CLASS)):
        for class_idx, (name, color) in enumerate(CLASS_COLORS.items()):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                noise = rng.normal(0, 30, size=(IMAGE_SIZE, IMAGE_SIZE, 3))
                pixels = np.clip(np.asarray(color, dtype=np.float64) + noise, 0, 255)
                y, x = rng.integers(0, IMAGE_SIZE - 8, size=2)
                pixels[y:y + 8, x:x + 8] = 255 - 40 * class_idx  # class-dependent bright patch
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="session", autouse=True)
def torch_threads() -> Iterator[int]:
    """One intra-op thread (``VITKD_TEST_THREADS`` to change), also for subprocesses via ``OMP_NUM_THREADS``.

    Tiny models gain nothing from threads, and on a CPU shared with another job two OpenMP
    threads spin against each other: a training step measured 15x slower with 2 threads than 1.
    """
    threads = int(os.environ.get("VITKD_TEST_THREADS", "1"))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", str(threads))
        yield threads
    torch.set_num_threads(before)


def sharpen_attention(model: torch.nn.Module, factor: float = 6.0) -> torch.nn.Module:
    """Scale query/key weights so random-init attention is far from uniform (maps and divergences differ)."""
    with torch.no_grad():
        for blk in model.blocks:
            dim = blk.attn.qkv.weight.shape[1]
            blk.attn.qkv.weight[: 2 * dim] *= factor
    return model.eval()


@pytest.fixture(scope="session")
def sharpen() -> Callable[..., torch.nn.Module]:
    """``sharpen_attention`` for test modules (conftest is not importable as a module)."""
    return sharpen_attention


@pytest.fixture(scope="session", autouse=True)
def vitkd_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Point ``VITKD_CACHE`` at a session temp folder (also inherited by CLI subprocesses)."""
    cache = tmp_path_factory.mktemp("vitkd_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITKD_CACHE", str(cache))
        yield cache


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a generated folder: train/ (160 PNGs) and test/ (40 PNGs), 4 classes, 32x32."""
    return write_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="session")
def image_folder_source(image_folder: Path) -> str:
    """The ``load_split``/``--data`` source string for ``image_folder``."""
    return f"imagefolder:{image_folder}"


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory, image_folder: Path, vitkd_cache_dir: Path) -> TinyPair:
    """A 2-block teacher (8 heads) trained 1 epoch on ``image_folder`` and a 2-block student (4 heads)
    distilled from it for 1 epoch with the encoder map; returns their ``last.safetensors`` paths."""
    from vitkd.train import TrainConfig, train

    runs = tmp_path_factory.mktemp("tiny_pair")
    common = dict(data=f"imagefolder:{image_folder}", epochs=1, batch_size=32, warmup_epochs=0.0, device="cpu",
                  cache_dir=str(vitkd_cache_dir), eval_batch_size=64)
    teacher_cfg = TrainConfig(model="cifar-teacher", out_dir=str(runs / "teacher"),
                              model_overrides={"depth": 2, "embed_dim": 64}, **common)
    train(teacher_cfg, progress=False)
    teacher = runs / "teacher" / "last.safetensors"
    student_cfg = TrainConfig(model="cifar-student", out_dir=str(runs / "student"), model_overrides={"depth": 2},
                              teacher=str(teacher), head_map="encoder", loss="kl", alpha=0.5, **common)
    train(student_cfg, progress=False)
    return TinyPair(teacher=teacher, student=runs / "student" / "last.safetensors")

