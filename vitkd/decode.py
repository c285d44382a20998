"""The one image decoder: a file to 8-bit RGB, and the centre crop every model input goes through.

Training folders (``data``), scans (``scan``) and uploads (``images``) all call these, so one
file gives one uint8 array on every path: first frame, EXIF orientation applied, alpha
composited on white, 16-bit greyscale scaled to 8 bits, palette/CMYK/greyscale to RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

__all__ = ["DECODER_VERSION", "IMAGE_EXTENSIONS", "decode_rgb", "open_rgb", "to_rgb", "resize_center_crop"]

# Part of every decode cache key: bump it whenever a change here changes any decoded pixel.
DECODER_VERSION = 2
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


def open_rgb(path: str | Path) -> Image.Image:
    """Decode an image file to 8-bit RGB with ``decode_rgb`` (no size limits: for server-side folders)."""
    with Image.open(path) as image:
        return decode_rgb(image)


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to ``size`` (bicubic) and centre-crop to ``size`` x ``size``."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))
