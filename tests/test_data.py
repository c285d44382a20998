"""``vitkd.data``: augmentation vs a per-image reference, batching, the decode cache, image folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_COLORS, TEST_PER_CLASS, TRAIN_PER_CLASS, write_image_folder
from PIL import Image

import vitkd.data as data_module
from vitkd.data import ImageTensors, augment_batch, iterate_batches, load_split, normalize, resize_center_crop
from vitkd.errors import ConfigError

pytestmark = pytest.mark.timeout(60)


def reference_augment(images: torch.Tensor, seed: int, policy: str, padding: int = 4) -> torch.Tensor:
    """Pad, crop, flip (and cutout) one image at a time with numpy, from the same random draws."""
    gen = torch.Generator().manual_seed(seed)
    B, C, H, W = images.shape
    pad = max(1, round(padding * H / 32))
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen).tolist()
    flip = (torch.rand(B, generator=gen) < 0.5).tolist()
    if policy == "strong":
        cy = torch.randint(0, H, (B,), generator=gen).tolist()
        cx = torch.randint(0, W, (B,), generator=gen).tolist()
    out = []
    for i in range(B):
        padded = np.zeros((C, H + 2 * pad, W + 2 * pad), dtype=np.uint8)
        padded[:, pad:pad + H, pad:pad + W] = images[i].numpy()
        crop = padded[:, oy[i]:oy[i] + H, ox[i]:ox[i] + W]
        if flip[i]:
            crop = crop[:, :, ::-1]
        crop = crop.copy()
        if policy == "strong":
            half = (H // 4) // 2
            for y in range(H):
                for x in range(W):
                    if abs(y - cy[i]) <= half and abs(x - cx[i]) <= half:
                        crop[:, y, x] = 0
        out.append(torch.from_numpy(crop))
    return torch.stack(out)


@pytest.mark.parametrize("size", [32, 16])
@pytest.mark.parametrize("policy", ["basic", "strong"])
def test_augment_matches_per_image_reference(size: int, policy: str) -> None:
    images = torch.randint(1, 256, (16, 3, size, size), generator=torch.Generator().manual_seed(0),
                           dtype=torch.uint8)  # no zeros: padding and cutout pixels are recognisable
    got = augment_batch(images, torch.Generator().manual_seed(5), policy)
    assert got.dtype == torch.uint8 and got.shape == images.shape
    assert torch.equal(got, reference_augment(images, 5, policy))
    assert not torch.equal(got, images) and (got == 0).any()  # some shift, some padding
    assert torch.equal(augment_batch(images, torch.Generator().manual_seed(5), "none"), images)


def test_augment_rejects_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="unknown augmentation"):
        augment_batch(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), torch.Generator(), "heavy")


def _toy_split(n: int = 50) -> ImageTensors:
    gen = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (n, 3, 8, 8), generator=gen, dtype=torch.uint8)
    return ImageTensors(images, torch.arange(n) % 3, ("a", "b", "c"), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "toy",
                        "train")


def test_iterate_batches_deterministic_and_normalised() -> None:
    data = _toy_split()
    first = list(iterate_batches(data, 16, train=True, seed=3, epoch=2))
    again = list(iterate_batches(data, 16, train=True, seed=3, epoch=2))
    other = list(iterate_batches(data, 16, train=True, seed=3, epoch=3))
    assert len(first) == 3  # 50 // 16, last partial batch dropped in training
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(first, other, strict=True))

    # the same batches by hand: one generator, permutation first, then each batch's augmentation
    gen = torch.Generator().manual_seed(3 * 100_003 + 2)
    order = torch.randperm(50, generator=gen)
    mean = torch.tensor(data.mean).view(1, 3, 1, 1)
    std = torch.tensor(data.std).view(1, 3, 1, 1)
    for b, (x, y) in enumerate(first):
        idx = order[b * 16:(b + 1) * 16]
        raw = augment_batch(data.images[idx], gen, "basic")
        assert torch.allclose(x, (raw.float() / 255.0 - mean) / std, atol=1e-5)
        assert torch.equal(y, data.labels[idx])

    evals = list(iterate_batches(data, 16, train=False))
    assert [len(y) for _, y in evals] == [16, 16, 16, 2]
    assert torch.equal(torch.cat([y for _, y in evals]), data.labels)
    assert torch.allclose(torch.cat([x for x, _ in evals]), normalize(data.images, data.mean, data.std))


def test_iterate_batches_ranks_are_disjoint() -> None:
    data = _toy_split(40)
    seen = []
    for rank in range(2):
        batches = list(iterate_batches(data, 5, train=True, seed=0, rank=rank, world_size=2, augment="none"))
        assert len(batches) == 4
        for x, _ in batches:
            for img in x:
                seen.append(next(i for i in range(40) if torch.allclose(
                    img, normalize(data.images[i:i + 1], data.mean, data.std)[0])))
    assert sorted(seen) == list(range(40))


def _pil_folder(split_dir: Path) -> tuple[np.ndarray, list[int]]:
    """Independent decode: sorted class folders, sorted files, PIL -> uint8 CHW."""
    images, labels = [], []
    for label, cls in enumerate(sorted(p.name for p in split_dir.iterdir())):
        for file in sorted((split_dir / cls).iterdir()):
            images.append(np.asarray(Image.open(file).convert("RGB")).transpose(2, 0, 1))
            labels.append(label)
    return np.stack(images), labels


def test_imagefolder_decode_stats_and_cache(image_folder: Path, tmp_path: Path, monkeypatch) -> None:
    source = f"imagefolder:{image_folder}"
    cache = tmp_path / "cache"
    train = load_split(source, "train", 32, cache_dir=cache, progress=False)
    expected, labels = _pil_folder(image_folder / "train")
    assert len(train) == 4 * TRAIN_PER_CLASS and train.class_names == tuple(sorted(CLASS_COLORS))
    assert torch.equal(train.images, torch.from_numpy(expected)) and train.labels.tolist() == labels
    pixels = expected.astype(np.float64) / 255.0
    np.testing.assert_allclose(train.mean, pixels.mean(axis=(0, 2, 3)), atol=1e-4)
    np.testing.assert_allclose(train.std, pixels.std(axis=(0, 2, 3)), atol=1e-4)

    test = load_split(source, "test", 32, cache_dir=cache, progress=False)
    assert len(test) == 4 * TEST_PER_CLASS and test.mean == train.mean and test.std == train.std
    cached = sorted(cache.glob("*.safetensors"))
    assert len(cached) == 2

    def no_decode(*args, **kwargs):
        raise AssertionError("cache miss: the folder was decoded again")

    monkeypatch.setattr(data_module, "_decode_folder", no_decode)
    for split, first in (("train", train), ("test", test)):
        hit = load_split(source, split, 32, cache_dir=cache, progress=False)
        assert torch.equal(hit.images, first.images) and torch.equal(hit.labels, first.labels)
        assert (hit.class_names, hit.mean, hit.std) == (first.class_names, first.mean, first.std)
    monkeypatch.undo()

    for path in cached:  # a broken cache file is rebuilt, not trusted
        path.write_bytes(b"garbage")
    rebuilt = load_split(source, "train", 32, cache_dir=cache, progress=False)
    assert torch.equal(rebuilt.images, train.images)

    resized = load_split(source, "train", 16, cache_dir=cache, progress=False)
    assert resized.images.shape == (len(train), 3, 16, 16)


def test_default_cache_dir_is_isolated(vitkd_cache_dir: Path) -> None:
    assert data_module.default_cache_dir() == vitkd_cache_dir
    assert Path.home() / ".cache" not in vitkd_cache_dir.parents


def test_val_folder_is_the_test_split(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "with_val", seed=1, test_dir="val")
    test = load_split(f"imagefolder:{root}", "test", 32, cache_dir=tmp_path / "cache", progress=False)
    expected, labels = _pil_folder(root / "val")
    assert torch.equal(test.images, torch.from_numpy(expected)) and test.labels.tolist() == labels


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_split(f"imagefolder:{tmp_path / 'missing'}", "train", 32, cache_dir=tmp_path, progress=False)
    (tmp_path / "only_train" / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "only_train" / "train" / "a" / "x.png")
    with pytest.raises(ConfigError, match="no test or val"):
        load_split(f"imagefolder:{tmp_path / 'only_train'}", "test", 32, cache_dir=tmp_path, progress=False)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no valid file|no images found"):
        load_split(f"imagefolder:{tmp_path / 'empty'}", "train", 32, cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="unknown data source"):
        load_split("mnist", "train", 32, cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="split"):
        load_split(f"imagefolder:{tmp_path / 'only_train'}", "val", 32, cache_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="cifar10 is not in"):
        load_split("cifar10", "train", 32, cache_dir=tmp_path / "no_cifar", progress=False)


def test_normalize_and_resize() -> None:
    images = torch.tensor([[[[0, 255]], [[51, 102]], [[255, 0]]]], dtype=torch.uint8)  # [1, 3, 1, 2]
    got = normalize(images, (0.5, 0.2, 0.0), (0.5, 0.2, 1.0))
    expected = torch.tensor([[[[-1.0, 1.0]], [[0.0, 1.0]], [[1.0, 0.0]]]])
    assert torch.allclose(got, expected, atol=1e-6)

    wide = Image.new("RGB", (64, 48), (10, 20, 30))
    assert resize_center_crop(wide, 32).size == (32, 32)
    square = Image.new("RGB", (32, 32))
    assert resize_center_crop(square, 32) is square
