"""The one image decoder: a file to 8-bit RGB, and the centre crop every model input goes through.

Training folders (``data``), scans (``scan``) and uploads (``images``) all call these, so one
file gives one uint8 array on every path: first frame, EXIF orientation applied, alpha
composited on white, 16-bit greyscale scaled to 8 bits, palette/CMYK/greyscale to RGB.
``decode_rgb_bounded`` is the same decoder for images larger than what is shown (uploads): it
never builds the full-resolution RGB copy, and gives ``decode_rgb``'s pixels for images that fit.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DECODER_VERSION", "IMAGE_EXTENSIONS", "decode_rgb", "decode_rgb_bounded", "open_rgb", "to_rgb",
           "resize_center_crop"]

# Part of every decode cache key: bump it whenever a change here changes any decoded pixel.
DECODER_VERSION = 3  # 3: elongated images resampled over their centre crop only
MAX_RESIZED_AREA = 16  # resize_center_crop resizes a whole image only up to this many crops' area
# What image folders and scans pick up (torchvision's image extensions plus GIF, which uploads accept).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif")

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode: alpha is composited on white, 16-bit greyscale is scaled to 8 bits.

    PIL's own ``convert`` clips 16-bit values at 255 (almost all white), hence the explicit scaling.
    """
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode in _SIXTEEN_BIT_MODES or mode == "I":
        # "I" is how 16-bit PNG/TIFF greyscale reaches older Pillow: treat it as 0..65535.
        values = np.asarray(image).astype(np.float64)
        grey = np.clip(np.rint(np.clip(values, 0, 65535) / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    elif mode in ("PA", "LA", "La", "RGBa"):
        image = image.convert("RGBA")
    elif mode == "L" or mode == "1":
        image = image.convert("RGB")
    if image.mode == "RGBA":
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image).convert("RGB")
    return image.convert("RGB")  # CMYK, YCbCr, LAB, HSV, F (clipped to 0..255), RGB copies


def decode_rgb(image: Image.Image) -> Image.Image:
    """An opened image (header parsed) to 8-bit RGB: first frame, EXIF orientation, then ``to_rgb``.

    Raises what PIL raises (``OSError``, ``ValueError``, ``SyntaxError``, ``EOFError``) on bad data.
    """
    image.seek(0)  # first frame of a GIF / multi-frame file
    image.load()  # decode now: truncated data raises here
    return to_rgb(ImageOps.exif_transpose(image))


def decode_rgb_bounded(image: Image.Image, max_side: int, min_short_side: int = 0,
                       reducing_gap: float = 2.0) -> Image.Image:
    """``decode_rgb`` to at most ``max_side`` pixels on the long side, reduced while decoding.

    An image that fits (long side <= ``max_side``, or short side <= ``min_short_side``) is exactly
    ``decode_rgb(image)``. A larger one comes out scaled so its long side is ``max_side``, or its
    short side ``min_short_side`` when that is larger (so a centre crop of that size is never
    upscaled), and is never held as full-resolution RGB: a JPEG is decoded at 1/2, 1/4 or 1/8
    scale (``Image.draft``), other formats are shrunk by an integer factor (``Image.reduce``, as in
    ``Image.thumbnail`` with ``reducing_gap``) before the bicubic resize and the conversion to RGB.
    The pixels differ slightly from resizing ``decode_rgb``'s full-resolution result (a few levels
    of 255 after ``resize_center_crop``). Palette and 1-bit images are converted first (resizing
    them would pick nearest neighbours), 16-bit greyscale is resized without the integer reduction.
    """
    image.seek(0)  # first frame of a GIF / multi-frame file
    width, height = image.size
    scale = max(max_side / max(width, height), min_short_side / min(width, height))
    if scale >= 1.0:
        return decode_rgb(image)
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    # JPEG only (a no-op elsewhere): DCT scaling to the smallest size at least reducing_gap times the target.
    image.draft(None, (math.ceil(target[0] * reducing_gap), math.ceil(target[1] * reducing_gap)))
    image.load()  # decode now: truncated data raises here
    stored = image.size
    ImageOps.exif_transpose(image, in_place=True)  # no copy unless the image is rotated
    if image.size != stored and stored[0] != stored[1]:
        target = (target[1], target[0])
    if image.mode in ("P", "PA", "1"):
        image = to_rgb(image)
    gap = None if image.mode in _SIXTEEN_BIT_MODES else reducing_gap  # Image.reduce has no 16-bit modes
    return to_rgb(image.resize(target, Image.Resampling.BICUBIC, reducing_gap=gap))


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to 8-bit RGB with ``decode_rgb`` (no size limits: for server-side folders)."""
    with Image.open(path) as image:
        return decode_rgb(image)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to ``size`` x ``size``.

    An elongated image (the resized whole above ``MAX_RESIZED_AREA`` crops) is resampled over its
    centre only (PIL's ``box``): a 1,000,000 x 8 strip would otherwise be upscaled whole to
    4,000,000 x 32 before the crop. The two ways differ by rounding (PIL's two passes clip to
    8 bits in between), so ordinary images keep the full resize and their exact pixels.
    """
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    left, top = (nw - size) // 2, (nh - size) // 2
    if nw * nh > MAX_RESIZED_AREA * size * size:
        sx, sy = w / nw, h / nh  # the crop's window in source pixels, at the full resize's scale
        box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
        return image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    return image.crop((left, top, left + size, top + size))
