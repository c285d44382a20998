"""``vitkd.data``: augmentation vs a per-image reference, batching, the decode cache, image folders."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CLASS_COLORS, TEST_PER_CLASS, TRAIN_PER_CLASS, write_image_folder
from PIL import Image

import vitkd.data as data_module
from vitkd.checkpoint import save_checkpoint
from vitkd.data import (
    ImageTensors,
    augment_batch,
    iterate_batches,
    load_split,
    load_subset,
    normalize,
    resize_center_crop,
)
from vitkd.errors import ConfigError
from vitkd.evaluation import evaluate_checkpoint
from vitkd.models import build_model

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


# ------------------------------------------------------------------------------- caches that see the disk

def _rewrite(path: Path, pixels: np.ndarray, mtime_ns: int | None = None) -> None:
    """Overwrite an image in place (same name); its mtime becomes ``mtime_ns``, by default 1 s past the old one."""
    before = path.stat()
    Image.fromarray(pixels).save(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9 if mtime_ns is None else mtime_ns))


def _noise(rng: np.random.Generator, high: int = 256, shape: tuple[int, ...] = (32, 32, 3)) -> np.ndarray:
    return rng.integers(0, high, shape, dtype=np.uint8)


def _assert_same_split(got: ImageTensors, ref: ImageTensors) -> None:
    assert torch.equal(got.images, ref.images) and torch.equal(got.labels, ref.labels)
    assert (got.class_names, got.mean, got.std) == (ref.class_names, ref.mean, ref.std)


def test_cache_follows_files_rewritten_added_and_removed(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", seed=3)
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    rng = np.random.default_rng(7)
    bmp = root / "test" / "red" / "zz.bmp"  # a BMP keeps its byte size when its pixels change: only mtime tells
    Image.fromarray(_noise(rng)).save(bmp)
    fresh_dirs = iter(range(100))

    def reload(n: int) -> ImageTensors:
        got = load_split(source, "test", 32, cache_dir=cache, progress=False)
        _assert_same_split(got, load_split(source, "test", 32, cache_dir=tmp_path / f"fresh{next(fresh_dirs)}",
                                           progress=False))
        assert len(got) == n
        return got

    first = reload(4 * TEST_PER_CLASS + 1)
    for path in sorted((root / "test").rglob("*.png")):  # every test image rewritten in place
        _rewrite(path, _noise(rng))
    rewritten = reload(len(first))
    png = torch.tensor([not name.endswith("zz.bmp") for name in sorted(map(str, (root / "test").rglob("*.*")))])
    assert ((rewritten.images != first.images).flatten(1).any(1) == png).all()  # each PNG changed, the BMP not

    one = root / "test" / "gray" / "003.png"  # size changes, mtime restored: only the size tells
    index = sorted(map(str, (root / "test").rglob("*.*"))).index(str(one))
    size, mtime = one.stat().st_size, one.stat().st_mtime_ns
    _rewrite(one, np.full((32, 32, 3), 9, dtype=np.uint8), mtime_ns=mtime)
    assert one.stat().st_size != size and one.stat().st_mtime_ns == mtime
    resized = reload(len(first))
    assert (resized.images[index] == 9).all() and not torch.equal(resized.images[index], rewritten.images[index])

    size = bmp.stat().st_size  # same size, later mtime
    _rewrite(bmp, _noise(rng))
    assert bmp.stat().st_size == size
    retimed = reload(len(first))
    assert not torch.equal(retimed.images, resized.images)

    Image.fromarray(_noise(rng)).save(root / "test" / "blue" / "new.png")
    reload(len(first) + 1)
    (root / "test" / "green" / "000.png").unlink()
    (root / "test" / "red" / "001.png").unlink()
    reload(len(first) - 1)
    assert len(list(cache.glob("*.safetensors"))) == 2  # superseded versions are deleted: one train, one test


def test_decoder_version_is_part_of_the_key(tmp_path: Path, monkeypatch) -> None:
    root = write_image_folder(tmp_path / "data", seed=12)
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    first = load_split(source, "train", 32, cache_dir=cache, progress=False)
    decoded = []
    original = data_module._decode_folder
    monkeypatch.setattr(data_module, "_decode_folder", lambda *a, **k: decoded.append(1) or original(*a, **k))
    load_split(source, "train", 32, cache_dir=cache, progress=False)
    assert not decoded  # same files, same decoder: a cache hit
    monkeypatch.setattr(data_module, "DECODER_VERSION", data_module.DECODER_VERSION + 1)
    again = load_split(source, "train", 32, cache_dir=cache, progress=False)
    assert decoded == [1]  # a new decoder decodes again
    _assert_same_split(again, first)


def _numpy_stats(split_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in sorted(split_dir.rglob("*.png"))])
    pixels = pixels.astype(np.float64) / 255.0
    return pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))


def test_test_split_stats_come_from_the_current_train_split(tmp_path: Path, monkeypatch) -> None:
    root = write_image_folder(tmp_path / "data", seed=4)
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    # 7 images a chunk: 160 train images are summed in 23 chunks, the last one partial.
    monkeypatch.setattr(data_module, "_CHUNK_ELEMENTS", 7 * 3 * 32 * 32)
    first = load_split(source, "test", 32, cache_dir=cache, progress=False)
    mean, std = _numpy_stats(root / "train")
    np.testing.assert_allclose(first.mean, mean, atol=1e-4)
    np.testing.assert_allclose(first.std, std, atol=1e-4)

    rng = np.random.default_rng(8)
    for path in sorted((root / "train").rglob("*.png")):  # train changes, test does not
        _rewrite(path, _noise(rng, high=100))
    again = load_split(source, "test", 32, cache_dir=cache, progress=False)
    assert torch.equal(again.images, first.images)
    mean, std = _numpy_stats(root / "train")
    np.testing.assert_allclose(again.mean, mean, atol=1e-4)
    np.testing.assert_allclose(again.std, std, atol=1e-4)
    assert np.abs(np.subtract(again.mean, first.mean)).min() > 0.05
    train = load_split(source, "train", 32, cache_dir=cache, progress=False)
    assert (train.mean, train.std) == (again.mean, again.std)


def test_undecodable_file_in_a_folder_is_a_config_error(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", seed=9)
    (root / "train" / "red" / "broken.png").write_bytes(b"not a png at all")
    with pytest.raises(ConfigError, match=r"cannot decode .*broken\.png.*remove or replace"):
        load_split(f"imagefolder:{root}", "train", 32, cache_dir=tmp_path / "cache", progress=False)


# ------------------------------------------------------------------------------------------- centre crop

def test_center_crop_against_hand_computed_offsets(tmp_path: Path) -> None:
    wide = np.zeros((32, 40, 3), dtype=np.uint8)  # 40 wide, 32 high: every column and row distinct
    wide[..., 0] = np.arange(40)[None, :] * 6
    wide[..., 1] = np.arange(32)[:, None] * 7
    wide[..., 2] = 100
    tall = np.ascontiguousarray(wide.transpose(1, 0, 2))  # 32 wide, 40 high
    big = np.random.default_rng(10).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # 64 wide, 48 high
    for split in ("train", "test"):
        (tmp_path / "crop" / split / "a").mkdir(parents=True)
        for name, pixels in (("0_wide", wide), ("1_tall", tall), ("2_big", big)):
            Image.fromarray(pixels).save(tmp_path / "crop" / split / "a" / f"{name}.png")
    got = load_split(f"imagefolder:{tmp_path / 'crop'}", "test", 32, cache_dir=tmp_path / "cache", progress=False)
    crops = got.images.permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(crops[0], wide[:, 4:36])  # no resize: the middle 32 of 40 columns
    np.testing.assert_array_equal(crops[1], tall[4:36, :])  # the middle 32 of 40 rows
    # 64x48 -> shorter side 32: 64 * 32 / 48 = 42.67 -> 43 wide; (43 - 32) // 2 = 5 columns off the left.
    resized = np.asarray(Image.fromarray(big).resize((43, 32), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(crops[2], resized[:, 5:37])


# ------------------------------------------------------------------- subsets: what scans and head rankings read

# 6 evenly spaced of the 40 test files of write_image_folder (step 40/6 = 6.67: positions 0, 6, 13, 20, 26, 33,
# the 10 files of each class in sorted order), by hand.
SUBSET_POSITIONS = (0, 6, 13, 20, 26, 33)
SUBSET_FILES = ("blue/000.png", "blue/006.png", "gray/003.png", "green/000.png", "green/006.png", "red/003.png")


def _pil(files: list[Path]) -> torch.Tensor:
    return torch.from_numpy(np.stack([np.asarray(Image.open(f).convert("RGB")).transpose(2, 0, 1) for f in files]))


def test_load_subset_decodes_only_its_images_and_never_caches_a_part(tmp_path: Path, monkeypatch) -> None:
    root = write_image_folder(tmp_path / "data", seed=7)
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    decoded: list[str] = []
    real_open = data_module.open_rgb
    monkeypatch.setattr(data_module, "open_rgb", lambda path: decoded.append(str(path)) or real_open(path))
    kept = [root / "test" / rel for rel in SUBSET_FILES]
    subset = load_subset(source, "test", 32, limit=6, cache_dir=cache, progress=False)
    assert decoded == [str(f) for f in kept]  # those 6 files: no other test file, no train file
    assert subset.positions == SUBSET_POSITIONS and [Path(p) for p in subset.paths] == kept
    assert torch.equal(subset.images, _pil(kept)) and subset.labels.tolist() == [0, 0, 1, 2, 2, 3]
    assert subset.class_names == tuple(sorted(CLASS_COLORS))
    # The part was not cached as the split: the whole split is read next, all 40 files.
    whole, labels = _pil_folder(root / "test")
    decoded.clear()
    full = load_subset(source, "test", 32, cache_dir=cache, progress=False)
    assert len(decoded) == 4 * TEST_PER_CLASS and torch.equal(full.images, torch.from_numpy(whole))
    assert full.labels.tolist() == labels and full.positions == tuple(range(4 * TEST_PER_CLASS))
    # With the whole split cached, a subset is its rows: nothing decoded, the same images and files.
    decoded.clear()
    again = load_subset(source, "test", 32, limit=6, cache_dir=cache, progress=False)
    assert decoded == [] and torch.equal(again.images, _pil(kept)) and again.paths == subset.paths
    assert load_subset(source, "test", 32, limit=100, cache_dir=cache, progress=False).positions == full.positions
    with pytest.raises(ConfigError, match="limit must be positive"):
        load_subset(source, "test", 32, limit=0, cache_dir=cache, progress=False)


def test_load_subset_reads_a_root_without_train(tmp_path: Path, monkeypatch) -> None:
    root = write_image_folder(tmp_path / "data", seed=7)
    shutil.rmtree(root / "train")  # like the bundled samples/cifar10: test/ only
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    with pytest.raises(ConfigError, match="no train/ subfolder"):
        load_split(source, "test", 32, cache_dir=cache, progress=False)  # training needs train's statistics
    part = load_subset(source, "test", 32, limit=6, cache_dir=cache, progress=False)
    assert [Path(p) for p in part.paths] == [root / "test" / rel for rel in SUBSET_FILES]
    whole, labels = _pil_folder(root / "test")
    full = load_subset(source, "test", 32, cache_dir=cache, progress=False)
    assert torch.equal(full.images, torch.from_numpy(whole)) and full.labels.tolist() == labels


def test_load_subset_of_a_torchvision_dataset_resizes_only_its_images(tmp_path: Path, monkeypatch) -> None:
    """A stand-in for CIFAR (no download in tests): the subset is the rows, resized alone, of the whole split."""
    from types import SimpleNamespace

    rng = np.random.default_rng(3)
    stored = {split: SimpleNamespace(data=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8),
                                     targets=rng.integers(0, 10, n).tolist(), classes=[f"c{i}" for i in range(10)])
              for split, n in (("train", 30), ("test", 40))}
    monkeypatch.setattr(data_module, "_torchvision_dataset", lambda name, split, cache, download: stored[split])
    resized: list[int] = []
    real_resize = data_module._resize_uint8
    monkeypatch.setattr(data_module, "_resize_uint8", lambda images, size: resized.append(len(images))
                        or real_resize(images, size))
    subset = load_subset("cifar10", "test", 48, limit=6, cache_dir=tmp_path / "cache", progress=False)
    assert resized == [6] and subset.positions == SUBSET_POSITIONS
    assert subset.paths == tuple(f"cifar10:test/{i}" for i in SUBSET_POSITIONS)
    assert subset.labels.tolist() == [stored["test"].targets[i] for i in SUBSET_POSITIONS]
    whole = load_split("cifar10", "test", 48, cache_dir=tmp_path / "cache", progress=False)  # today's pixels
    assert torch.equal(subset.images, whole.images[list(SUBSET_POSITIONS)])


# -------------------------------------------------------------------------------- evaluating a checkpoint

def _tiny_checkpoint(path: Path, class_names: tuple[str, ...]) -> Path:
    torch.manual_seed(0)
    model = build_model("cifar-student", len(class_names), depth=1, num_heads=2, embed_dim=32)
    meta = {"class_names": list(class_names), "mean": [0.5, 0.45, 0.4], "std": [0.25, 0.2, 0.3], "img_size": 32,
            "data": "imagefolder:unused", "kind": "teacher", "head_map": None, "metrics": {}}
    return save_checkpoint(model, meta, path)


def _reference_eval(checkpoint: Path, split_dir: Path) -> tuple[float, float]:
    """Accuracy and mean cross-entropy from PIL-decoded files and a plain forward of the saved weights."""
    from vitkd.checkpoint import load_checkpoint

    model, meta = load_checkpoint(checkpoint)
    classes = sorted(p.name for p in split_dir.iterdir())
    files = [(f, classes.index(f.parent.name)) for f in sorted(split_dir.rglob("*.png"))]
    pixels = np.stack([np.asarray(Image.open(f).convert("RGB")) for f, _ in files]).astype(np.float64) / 255.0
    x = torch.from_numpy((pixels - np.array(meta["mean"])) / np.array(meta["std"])).permute(0, 3, 1, 2).float()
    labels = torch.tensor([label for _, label in files])
    with torch.no_grad():
        logits = model(x)
    accuracy = 100.0 * float((logits.argmax(-1) == labels).float().mean())
    return accuracy, float(torch.nn.functional.cross_entropy(logits, labels))


def test_eval_sees_test_images_rewritten_in_place(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", seed=5)
    checkpoint = _tiny_checkpoint(tmp_path / "tiny.safetensors", tuple(sorted(CLASS_COLORS)))
    source, cache = f"imagefolder:{root}", str(tmp_path / "cache")
    before = evaluate_checkpoint(checkpoint, data=source, device="cpu", cache_dir=cache)
    accuracy, loss = _reference_eval(checkpoint, root / "test")
    assert before["accuracy"] == pytest.approx(accuracy) and before["loss"] == pytest.approx(loss, abs=1e-4)

    rng = np.random.default_rng(11)
    for path in sorted((root / "test").rglob("*.png")):
        _rewrite(path, _noise(rng))
    after = evaluate_checkpoint(checkpoint, data=source, device="cpu", cache_dir=cache)
    fresh = evaluate_checkpoint(checkpoint, data=source, device="cpu", cache_dir=str(tmp_path / "fresh"))
    assert after == fresh and after["n"] == 4 * TEST_PER_CLASS
    assert after["loss"] != before["loss"]
    accuracy, loss = _reference_eval(checkpoint, root / "test")
    assert after["accuracy"] == pytest.approx(accuracy) and after["loss"] == pytest.approx(loss, abs=1e-4)


def test_eval_refuses_other_class_names_or_order(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "data", seed=6)  # classes blue, gray, green, red
    source, cache = f"imagefolder:{root}", tmp_path / "cache"
    other = _tiny_checkpoint(tmp_path / "other.safetensors", ("airplane", "automobile", "bird", "cat", "deer"))
    with pytest.raises(ConfigError) as info:
        evaluate_checkpoint(other, data=source, device="cpu", cache_dir=str(cache))
    message = str(info.value)
    assert "\n" not in message and len(message) < 400
    assert "5 classes (airplane, automobile, bird, cat, ...)" in message
    assert "4 classes (blue, gray, green, red)" in message
    reordered = _tiny_checkpoint(tmp_path / "reordered.safetensors", ("red", "green", "blue", "gray"))
    with pytest.raises(ConfigError, match=r"another order: class 0 is 'red' in the checkpoint, 'blue' in the data"):
        evaluate_checkpoint(reordered, data=source, device="cpu", cache_dir=str(cache))
    assert not list(cache.glob("*.safetensors"))  # refused before decoding anything


def test_each_rank_draws_its_own_augmentation() -> None:
    """Identical images on every rank: only the augmentation draws can tell the ranks' batches apart."""
    image = torch.arange(3 * 32 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).view(3, 32, 32)
    data = ImageTensors(image.expand(64, 3, 32, 32).clone(), torch.zeros(64, dtype=torch.int64), ("a",),
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), "synthetic", "train")

    def first_batch(rank: int, world_size: int, epoch: int = 0) -> torch.Tensor:
        return next(iterate_batches(data, 16, train=True, seed=3, epoch=epoch, augment="strong", rank=rank,
                                    world_size=world_size))[0]

    assert not torch.equal(first_batch(0, 2), first_batch(1, 2))
    assert torch.equal(first_batch(1, 2), first_batch(1, 2))  # a pure function of (seed, epoch, rank)
    assert not torch.equal(first_batch(1, 2), first_batch(1, 2, epoch=1))
    # One process keeps the single (seed, epoch) stream: permutation draws, then augmentation draws.
    generator = torch.Generator().manual_seed(3 * 100_003)
    torch.randperm(64, generator=generator)
    expected = augment_batch(data.images[:16], generator, "strong")
    assert torch.equal(first_batch(0, 1), normalize(expected, data.mean, data.std))
