"""``vitkd.decode``: one file, one uint8 crop on the training, scan and upload paths, equal to a numpy reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import vitkd.data
import vitkd.decode
import vitkd.images
from vitkd.data import load_split, normalize
from vitkd.images import load_image, preprocess
from vitkd.models import build_model
from vitkd.scan import _decode_resized, scan_split

pytestmark = pytest.mark.timeout(120)

SIZE = 32


def _write_kinds(folder: Path) -> dict[str, np.ndarray | None]:
    """Write one file of each kind under ``folder/<class>/``; return the expected crop per file (None: no reference).

    Every reference is computed here with numpy from the pixels written (or, for JPEGs, from
    PIL's plain decode of the stored pixels), never with ``vitkd.decode``.
    """
    rng = np.random.default_rng(0)
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir(parents=True)
    expected: dict[str, np.ndarray | None] = {}

    # RGBA, 40 wide x 32 high, partial alpha: composited on white by hand, then columns 4..35.
    rgba = rng.integers(0, 256, (32, 40, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(folder / "a" / "rgba.png")
    alpha = rgba[..., 3:].astype(np.float64) / 255.0
    on_white = np.rint(rgba[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    expected["a/rgba.png"] = on_white[:, 4:36]

    # 16-bit greyscale, 32 wide x 48 high, the full 0..65535 range: v / 257 rounded, then rows 8..39.
    grey16 = rng.integers(0, 65536, (48, 32)).astype(np.uint16)
    grey16[0, :4] = (0, 65535, 257 * 100, 256)
    Image.fromarray(grey16).save(folder / "a" / "gray16.png")
    assert Image.open(folder / "a" / "gray16.png").mode.startswith("I")
    grey8 = np.rint(grey16.astype(np.float64) / 257.0).astype(np.uint8)
    expected["a/gray16.png"] = np.repeat(grey8[8:40, :, None], 3, axis=2)

    # Palette with a transparent index 0: transparent pixels are white.
    palette = np.array([[10, 20, 30], [0, 200, 0], [250, 5, 5]], dtype=np.uint8)
    indices = rng.integers(0, 3, (32, 32)).astype(np.uint8)
    pal = Image.fromarray(indices, "P")
    pal.putpalette(palette.ravel().tolist() + [0, 0, 0] * 253)
    pal.save(folder / "a" / "palette.png", transparency=0)
    ref = palette[indices]
    ref[indices == 0] = 255
    expected["a/palette.png"] = ref

    # CMYK JPEG: no independent reference, only the same array on every path.
    Image.fromarray(rng.integers(0, 256, (32, 32, 4), dtype=np.uint8), "CMYK").save(folder / "a" / "cmyk.jpg",
                                                                                    quality=95)
    expected["a/cmyk.jpg"] = None

    # EXIF orientation 6 on a 32 wide x 40 high JPEG: displayed rotated 90 degrees clockwise (40 x 32),
    # so the crop is columns 4..35 of the clockwise rotation of the stored pixels.
    raw = np.zeros((40, 32, 3), dtype=np.uint8)
    raw[:, :, 0] = np.arange(32)[None, :] * 8  # red grows to the right
    raw[:, :, 1] = np.arange(40)[:, None] * 6  # green grows downwards
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(raw).save(folder / "b" / "exif6.jpg", quality=95, exif=exif)
    with Image.open(folder / "b" / "exif6.jpg") as stored:
        stored_pixels = np.asarray(stored.convert("RGB"))  # PIL never rotates on its own
    assert stored_pixels.shape == (40, 32, 3)
    expected["b/exif6.jpg"] = np.rot90(stored_pixels, k=-1)[:, 4:36]

    # Greyscale: the value in all three channels.
    grey = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    Image.fromarray(grey).save(folder / "b" / "grey.png")
    expected["b/grey.png"] = np.repeat(grey[:, :, None], 3, axis=2)

    # Animated GIF: the first frame (red left, blue right), not the second (all green).
    first = np.zeros((32, 32, 3), dtype=np.uint8)
    first[:, :16] = (255, 0, 0)
    first[:, 16:] = (0, 0, 255)
    frames = [Image.fromarray(first), Image.new("RGB", (32, 32), (0, 255, 0))]
    frames[0].save(folder / "b" / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected["b/anim.gif"] = first

    # A photo that needs a resize (64 x 48): only the same array on every path.
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(folder / "b" / "photo.jpg")
    expected["b/photo.jpg"] = None
    return expected


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray | None]]:
    """``ROOT/{train,test}/{a,b}/<one file per kind>``: the same files in both splits."""
    root = tmp_path_factory.mktemp("kinds")
    expected = _write_kinds(root / "test")
    _write_kinds(root / "train")
    return root, expected


def test_public_names_come_from_one_decoder() -> None:
    assert vitkd.data.resize_center_crop is vitkd.decode.resize_center_crop
    assert vitkd.images.resize_center_crop is vitkd.decode.resize_center_crop
    assert vitkd.images.to_rgb is vitkd.decode.to_rgb
    assert vitkd.images.normalize is vitkd.data.normalize


def test_every_path_gives_the_same_uint8_crop(kinds, tmp_path: Path) -> None:
    root, expected = kinds
    split = load_split(f"imagefolder:{root}", "test", SIZE, cache_dir=tmp_path / "cache", progress=False)
    names = sorted(expected)  # class folder, then file name: the order image folders list files in
    assert split.class_names == ("a", "b") and len(split) == len(names)
    assert split.labels.tolist() == [0 if n.startswith("a/") else 1 for n in names]
    for i, name in enumerate(names):
        path = root / "test" / name
        cached = split.images[i].permute(1, 2, 0).numpy()  # (a) training data
        tensors, kept, skipped = _decode_resized([path], [SIZE])  # (b) the scan
        assert kept == [0] and not skipped
        scanned = tensors[SIZE][0].permute(1, 2, 0).numpy()
        uploaded = preprocess(load_image(path), SIZE, split.mean, split.std).rgb  # (c) uploads
        assert cached.shape == (SIZE, SIZE, 3) and cached.dtype == np.uint8
        np.testing.assert_array_equal(scanned, cached, err_msg=f"scan vs training data: {name}")
        np.testing.assert_array_equal(uploaded, cached, err_msg=f"upload vs training data: {name}")
        if expected[name] is not None:
            np.testing.assert_array_equal(cached, expected[name], err_msg=f"decoded vs numpy reference: {name}")


def test_same_prediction_on_every_path(kinds, tmp_path: Path) -> None:
    root, _ = kinds
    split = load_split(f"imagefolder:{root}", "test", SIZE, cache_dir=tmp_path / "cache", progress=False)
    torch.manual_seed(0)
    model = build_model("cifar-student", 2, depth=1, num_heads=2, embed_dim=32).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.attn.qkv.weight.normal_(0.0, 0.5)
        from_data = model(normalize(split.images, split.mean, split.std)).softmax(-1)
    meta = {"class_names": list(split.class_names), "mean": list(split.mean), "std": list(split.std),
            "img_size": SIZE}
    scan = scan_split(model, meta, model, meta, root / "test")
    assert len(scan.rows) == len(split) and not scan.skipped
    for i, row in enumerate(scan.rows):
        with torch.no_grad():
            upload = model(preprocess(load_image(row.path), SIZE, split.mean, split.std).tensor).softmax(-1)[0]
        assert row.teacher_pred == int(from_data[i].argmax()) == int(upload.argmax()), row.path
        assert row.teacher_conf == pytest.approx(float(from_data[i].max()), abs=1e-5)
        torch.testing.assert_close(upload, from_data[i], atol=1e-5, rtol=0)


def _full_resize_then_crop(image: Image.Image, size: int) -> np.ndarray:
    """Reference: resize the whole image (short side to ``size``, bicubic), then cut the centre square."""
    w, h = image.size
    nw, nh = max(size, round(w * size / min(w, h))), max(size, round(h * size / min(w, h)))
    left, top = (nw - size) // 2, (nh - size) // 2
    resized = image.resize((nw, nh), Image.Resampling.BICUBIC)
    return np.asarray(resized.crop((left, top, left + size, top + size))).astype(int)


def test_ordinary_images_keep_the_full_resize_pixels() -> None:
    rng = np.random.default_rng(0)
    for w, h in [(64, 48), (33, 200), (500, 40), (37, 37), (16, 113), (20, 60)]:  # down- and upscaled
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        got = np.asarray(vitkd.decode.resize_center_crop(image, SIZE)).astype(int)
        np.testing.assert_array_equal(got, _full_resize_then_crop(image, SIZE))


def test_elongated_strip_is_resampled_over_its_crop_only(monkeypatch) -> None:
    """A 4,000 x 8 strip must not be upscaled whole to 16,000 x 32 first; its crop still matches the full resize."""
    x = np.linspace(0.0, 40.0 * np.pi, 4000)
    smooth = (127.5 + 100 * np.sin(x)[None, :, None] * np.linspace(0.5, 1.0, 8)[:, None, None]).repeat(3, axis=2)
    strip = Image.fromarray(smooth.round().astype(np.uint8))
    reference = _full_resize_then_crop(strip, SIZE)
    sizes: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        sizes.append(tuple(size))
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    got = np.asarray(vitkd.decode.resize_center_crop(strip, SIZE)).astype(int)
    assert got.shape == (SIZE, SIZE, 3)
    assert sizes and max(w * h for w, h in sizes) <= 16 * SIZE * SIZE, sizes
    assert np.abs(got - reference).max() <= 2  # the same window at the same scale; PIL rounds in between passes
    tall = strip.transpose(Image.Transpose.ROTATE_90)
    got_tall = np.asarray(vitkd.decode.resize_center_crop(tall, SIZE)).astype(int)
    assert np.abs(got_tall - _full_resize_then_crop(tall, SIZE)).max() <= 2
