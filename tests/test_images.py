"""vitkd.images: every bad input is an ImageError with a clear message; every mode becomes the expected RGB."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from vitkd.data import resize_center_crop
from vitkd.errors import ImageError
from vitkd.images import DEFAULT_MAX_PIXELS, DISPLAY_SIDE, load_image, preprocess, to_rgb


def encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def blank_bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG written by hand: tiny on disk, width*height pixels once decoded."""
    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


# --------------------------------------------------------------------------------------------- bad inputs

def test_non_image_bytes_rejected():
    with pytest.raises(ImageError, match="not an image"):
        load_image(b"this is a text file, not a picture\n" * 10)


def test_truncated_jpeg_rejected():
    rng = np.random.default_rng(0)
    data = encode(Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)), "JPEG", quality=90)
    assert load_image(data).size == (64, 64)  # the full file is fine
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(data[: len(data) // 2])


def test_empty_bytes_and_empty_file_rejected(tmp_path: Path):
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(b"")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ImageError, match="0 bytes"):
        load_image(empty)
    with pytest.raises(ImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")


@pytest.mark.parametrize("size", [(1, 1), (7, 100)])
def test_tiny_images_rejected(size):
    with pytest.raises(ImageError, match=rf"{size[0]}x{size[1]} pixels.*at least 8"):
        load_image(encode(Image.new("RGB", size, (1, 2, 3))))
    assert load_image(encode(Image.new("RGB", (8, 8), (1, 2, 3)))).size == (8, 8)


def test_thin_strip_rejected_from_header_without_decoding(monkeypatch):
    """A 6,000,000 x 8 strip is 48 MP (under the limit) and cannot be decoded small: refused by its shape."""
    strip, edge = blank_bilevel_png(129, 8), blank_bilevel_png(8, 128)  # 16.1:1 and exactly 16:1
    assert load_image(edge).size == (8, 128)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("load_image decoded a file it should have rejected from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"129x8 pixels, its long side more than 16 times its short side"):
        load_image(strip)
    with pytest.raises(ImageError, match=r"6000000x8 pixels, its long side more than 16 times"):
        load_image(blank_bilevel_png(6_000_000, 8))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_huge_image_rejected_from_header_without_decoding(tmp_path: Path, monkeypatch):
    path = tmp_path / "huge.png"
    path.write_bytes(blank_bilevel_png(10_000, 10_000))
    assert path.stat().st_size < 100_000  # small on disk, 100 megapixels decoded

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("load_image decoded a file it should have rejected from its header")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(ImageError, match=r"10000x10000 \(100\.0 megapixels\).*50 megapixel limit"):
        load_image(path)
    assert DEFAULT_MAX_PIXELS == 50_000_000
    with pytest.raises(ImageError, match="above the 0.5 megapixel limit"):
        load_image(blank_bilevel_png(1000, 1000), max_pixels=500_000)


def test_decompression_bomb_is_an_image_error():
    # Above twice PIL's MAX_IMAGE_PIXELS, Image.open itself raises DecompressionBombError.
    with pytest.raises(ImageError, match="too large to open safely"):
        load_image(blank_bilevel_png(15_000, 15_000), max_pixels=10**12)


# --------------------------------------------------------------------------------------------- conversions

def test_exif_orientation_applied():
    # Left half red, right half blue; EXIF orientation 6 means "rotate 90 degrees clockwise to display".
    raw = np.zeros((20, 40, 3), dtype=np.uint8)
    raw[:, :20] = (255, 0, 0)
    raw[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    loaded = load_image(encode(Image.fromarray(raw), "JPEG", quality=95, exif=exif))
    assert loaded.size == (20, 40)  # width and height swapped
    px = pixels(loaded)
    # Rotated clockwise, the left (red) half ends on top, the right (blue) half at the bottom.
    np.testing.assert_allclose(px[2:18, 2:18].mean(axis=(0, 1)), (255, 0, 0), atol=12)
    np.testing.assert_allclose(px[22:38, 2:18].mean(axis=(0, 1)), (0, 0, 255), atol=12)
    unrotated = load_image(encode(Image.fromarray(raw), "JPEG", quality=95))
    assert unrotated.size == (40, 20)


def test_rgba_composited_on_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :, 0] = 255
    rgba[:4, :, 3] = 128  # half transparent red
    rgba[4:6, :, 3] = 0  # fully transparent
    rgba[6:, :, 3] = 255  # opaque red
    px = pixels(load_image(encode(Image.fromarray(rgba, "RGBA"))))
    # out = a * red + (1 - a) * white, a = 128/255: green/blue = 255 * 127/255 = 127
    np.testing.assert_allclose(px[0, 0], (255, 127, 127), atol=1)
    np.testing.assert_array_equal(px[4, 0], (255, 255, 255))
    np.testing.assert_array_equal(px[7, 0], (255, 0, 0))


def test_palette_with_transparency_and_palette_alpha():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([10, 20, 30, 0, 200, 0] + [0, 0, 0] * 254)
    pal.paste(1, (0, 4, 8, 8))
    opaque = pixels(load_image(encode(pal)))
    np.testing.assert_array_equal(opaque[0, 0], (10, 20, 30))
    np.testing.assert_array_equal(opaque[7, 7], (0, 200, 0))
    transparent = pixels(load_image(encode(pal, transparency=0)))
    np.testing.assert_array_equal(transparent[0, 0], (255, 255, 255))  # index 0 is transparent -> white
    np.testing.assert_array_equal(transparent[7, 7], (0, 200, 0))
    pa = Image.new("PA", (8, 8))
    pa.putpalette([0, 0, 250] + [0, 0, 0] * 255)
    pa.putdata([(0, 0)] * 32 + [(0, 255)] * 32)
    px = pixels(to_rgb(pa))  # no common file format stores PA, so convert it directly
    np.testing.assert_array_equal(px[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(px[7, 7], (0, 0, 250))


def test_sixteen_bit_greyscale_scaled_not_clipped():
    values = np.array([[0, 257 * 100, 65535, 257 * 200]] * 8, dtype=np.uint16)
    values = np.tile(values, (1, 2))
    source = Image.fromarray(values)
    assert source.mode == "I;16"
    data = encode(source)
    px = pixels(load_image(data))
    np.testing.assert_array_equal(px[0, :4], [[0] * 3, [100] * 3, [255] * 3, [200] * 3])
    as_int32 = pixels(load_image(encode(Image.fromarray(values.astype(np.int32)), "TIFF")))
    np.testing.assert_array_equal(as_int32[0, :4], [[0] * 3, [100] * 3, [255] * 3, [200] * 3])


def test_greyscale_and_bilevel_become_grey_rgb():
    grey = np.full((8, 8), 77, dtype=np.uint8)
    np.testing.assert_array_equal(pixels(load_image(encode(Image.fromarray(grey)))), np.full((8, 8, 3), 77))
    bits = Image.new("1", (8, 8), 0)
    bits.paste(1, (0, 0, 4, 8))
    px = pixels(load_image(encode(bits)))
    np.testing.assert_array_equal(px[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(px[0, 7], (0, 0, 0))


def test_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    np.testing.assert_array_equal(pixels(load_image(buf.getvalue())), np.broadcast_to((255, 0, 0), (16, 16, 3)))


def test_load_from_path_equals_load_from_bytes(tmp_path: Path):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 255, (12, 9, 3), dtype=np.uint8))
    (tmp_path / "x.png").write_bytes(encode(image))
    np.testing.assert_array_equal(pixels(load_image(tmp_path / "x.png")), np.asarray(image))
    np.testing.assert_array_equal(pixels(load_image(str(tmp_path / "x.png"))), np.asarray(image))


# --------------------------------------------------------------------------------------------- preprocess

def test_preprocess_matches_training_crop_and_normalisation():
    rng = np.random.default_rng(2)
    image = Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8))
    mean, std = (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)
    tensor, rgb = preprocess(image, 32, mean, std)
    assert tensor.shape == (1, 3, 32, 32) and tensor.dtype == torch.float32
    expected_rgb = np.asarray(resize_center_crop(image, 32))
    np.testing.assert_array_equal(rgb, expected_rgb)
    by_hand = (expected_rgb.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)  # [H, W, 3]
    np.testing.assert_allclose(tensor[0].permute(1, 2, 0).numpy(), by_hand, atol=1e-5)
    from_array = preprocess(np.asarray(image), 32, mean, std)
    torch.testing.assert_close(from_array.tensor, tensor)


# --------------------------------------------------------------------------------------------- bounded decode

def flat_rgb_png(width: int, height: int, color: tuple[int, int, int] = (40, 120, 200)) -> bytes:
    """A valid flat RGB PNG written row by row: ~width*height/1000 bytes on disk, never built in memory."""
    row = b"\x00" + bytes(color) * width  # filter byte + pixels
    compressor = zlib.compressobj(9)
    body = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8 bits, truecolour
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", body) + png_chunk(b"IEND", b"")


def photo(width: int, height: int, seed: int = 0) -> np.ndarray:
    """Smooth colour blobs plus noise: resampling differences show up, unlike on flat images."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float64)
    return np.clip(smooth + rng.normal(0, 10, (height, width, 3)), 0, 255).astype(np.uint8)


def test_big_compressible_upload_decodes_to_a_small_copy_with_bounded_memory():
    data = flat_rgb_png(7000, 7000)  # 49 megapixels: 147 MB as an RGB array
    assert len(data) < 300_000
    tracemalloc.start()
    try:
        array = np.asarray(load_image(data, max_side=DISPLAY_SIDE, crop_size=32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert array.shape == (DISPLAY_SIDE, DISPLAY_SIDE, 3) and array.dtype == np.uint8
    np.testing.assert_array_equal(array[::97, ::97], np.broadcast_to((40, 120, 200), array[::97, ::97].shape))
    assert peak < 8 * 2**20, f"{peak / 2**20:.0f} MB traced while decoding"  # the full array would be 147 MB


def test_bounded_decode_is_exact_for_images_that_fit_and_close_for_big_ones():
    for size in ((40, 56), (300, DISPLAY_SIDE - 1), (DISPLAY_SIDE, 300)):  # at or below the display size
        small = encode(Image.fromarray(photo(*size, seed=1)))
        np.testing.assert_array_equal(pixels(load_image(small, max_side=DISPLAY_SIDE, crop_size=32)),
                                      pixels(load_image(small)))
    for fmt, size in (("PNG", (1800, 1200)), ("JPEG", (2400, 1500)), ("PNG", (1200, 1800))):
        data = encode(Image.fromarray(photo(*size, seed=2)), fmt)
        full, bounded = load_image(data), load_image(data, max_side=DISPLAY_SIDE, crop_size=32)
        assert max(bounded.size) == DISPLAY_SIDE and bounded.size[0] / bounded.size[1] == pytest.approx(
            size[0] / size[1], rel=0.01)
        for crop in (32, 128, 224):  # what models see: within a few levels of the full-resolution crop
            diff = np.abs(pixels(resize_center_crop(bounded, crop)) - pixels(resize_center_crop(full, crop)))
            assert diff.max() <= 6 and diff.mean() < 0.6, (fmt, size, crop, diff.max(), diff.mean())


def test_bounded_decode_keeps_modes_orientation_and_the_crop_side():
    rgba = np.dstack([photo(1600, 1000, seed=3), np.full((1000, 1600), 128, np.uint8)])
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated clockwise: 1000 wide, 1600 high
    cases = {
        "rgba": encode(Image.fromarray(rgba, "RGBA")),
        "exif-jpeg": encode(Image.fromarray(photo(1600, 1000, seed=4)), "JPEG", quality=95, exif=exif),
        "palette": encode(Image.fromarray(photo(1600, 1000, seed=5)).convert("P")),
        "grey16": encode(Image.fromarray(photo(1600, 1000, seed=6)[..., 0].astype(np.uint16) * 257)),
    }
    for name, data in cases.items():
        full, bounded = load_image(data), load_image(data, max_side=DISPLAY_SIDE)
        assert bounded.mode == "RGB" and max(bounded.size) == DISPLAY_SIDE, name
        assert (bounded.size[0] > bounded.size[1]) == (full.size[0] > full.size[1]), name  # same orientation
        diff = np.abs(pixels(resize_center_crop(bounded, 64)) - pixels(resize_center_crop(full, 64)))
        assert diff.mean() < 2.0, (name, diff.mean())
    # A very wide image keeps a short side of at least the crop size, so the model's crop is not upscaled.
    wide = load_image(encode(Image.fromarray(photo(4000, 300, seed=7))), max_side=DISPLAY_SIDE, crop_size=224)
    assert wide.size == (2987, 224)
