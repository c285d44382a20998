"""User images in, model inputs out: safe decoding of whatever a user drops in, and the crop the model sees.

``load_image`` reads only the header before deciding whether to decode, so a huge or
malicious file is rejected without allocating its pixels. Everything a user can get
wrong raises ``ImageError`` with a message naming the problem. The pixels themselves come from
``vitkd.decode``, the decoder training data and scans use, so an upload is the image they see.
With ``max_side`` (the app passes ``DISPLAY_SIDE``), a large image is decoded straight to a
small copy (``decode_rgb_bounded``): memory follows what is shown, not what was uploaded.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .data import normalize
from .decode import decode_rgb, decode_rgb_bounded, resize_center_crop, to_rgb
from .errors import ImageError

__all__ = ["DEFAULT_MAX_PIXELS", "MIN_SIDE", "MAX_ASPECT", "DISPLAY_SIDE", "Preprocessed", "load_image", "to_rgb",
           "preprocess"]

DEFAULT_MAX_PIXELS = 50_000_000  # 50 MP: a large photo; ~150 MB decoded, still bounded
MIN_SIDE = 8  # below this an image carries no usable content for a patch grid
# Longest side over shortest. Bounds what a thin strip costs: one whose short side is below the
# crop decodes whole (it cannot be reduced), and the app keeps that copy.
MAX_ASPECT = 16
DISPLAY_SIDE = 512  # long side of the one copy the app keeps of an upload (it shows and crops from that)


class Preprocessed(NamedTuple):
    """``tensor`` [1, 3, S, S] normalised model input and ``rgb`` [S, S, 3] uint8: the crop it came from."""

    tensor: torch.Tensor
    rgb: np.ndarray


def _describe(source: bytes | str | Path) -> str:
    return "uploaded image" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)


def load_image(source: bytes | str | Path, max_pixels: int = DEFAULT_MAX_PIXELS,
               min_side: int = MIN_SIDE, *, max_side: int | None = None, crop_size: int = 0,
               decode_slot: contextlib.AbstractContextManager | None = None) -> Image.Image:
    """Decode an image file or its bytes to an 8-bit RGB ``PIL.Image`` (EXIF orientation applied).

    Rejects, with ``ImageError``: empty files, non-images, truncated files, images with a side
    below ``min_side``, longer than ``MAX_ASPECT`` times their short side, or above ``max_pixels``
    (all checked from the header, before decoding).
    GIFs and other multi-frame files give their first frame.

    Args:
        max_side: when given, an image with a longer side is decoded straight to one whose long side
            is ``max_side`` (``decode_rgb_bounded``), keeping its short side at least ``crop_size`` so the
            model's centre crop is never upscaled. Images that fit decode exactly as without it.
        crop_size: see ``max_side``.
        decode_slot: entered around the pixel decode only (after the header checks), e.g. a semaphore
            that bounds how many decodes run at once in a server.
    """
    what = _describe(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    else:
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{path}: no such image file")
        data = path.read_bytes()
    if not data:
        raise ImageError(f"{what} is empty (0 bytes): choose an image file (PNG, JPEG, WebP, BMP or GIF)")
    try:
        image = Image.open(io.BytesIO(data))  # parses the header only
    except Image.DecompressionBombError as exc:
        raise ImageError(f"{what} is too large to open safely ({exc}); the limit is "
                         f"{max_pixels / 1e6:g} megapixels: downscale it first") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(f"{what} is not an image PIL can read (PNG, JPEG, WebP, BMP, GIF, TIFF...)") from exc
    except (OSError, ValueError, SyntaxError) as exc:
        raise ImageError(f"{what} has a corrupt header ({exc})") from exc
    with image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageError(f"{what} is {width}x{height} ({width * height / 1e6:.1f} megapixels), above the "
                             f"{max_pixels / 1e6:g} megapixel limit: downscale it first")
        if min(width, height) < min_side:
            raise ImageError(f"{what} is {width}x{height} pixels; images need at least {min_side} pixels "
                             "on each side")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise ImageError(f"{what} is {width}x{height} pixels, its long side more than {MAX_ASPECT} times its "
                             "short side: the model sees only a centre square of it; crop the part you want first")
        try:
            with decode_slot if decode_slot is not None else contextlib.nullcontext():
                if max_side is None:
                    return decode_rgb(image)  # the decoder training data and scans use too
                return decode_rgb_bounded(image, max_side, crop_size)  # same pixels when the image fits
        except Image.DecompressionBombError as exc:
            raise ImageError(f"{what} is too large to decode safely ({exc})") from exc
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"{what} is truncated or corrupt and cannot be decoded ({exc})") from exc


def preprocess(image: Image.Image | np.ndarray, img_size: int, mean: tuple[float, ...] | list[float],
               std: tuple[float, ...] | list[float]) -> Preprocessed:
    """Resize the shorter side to ``img_size``, centre-crop, normalise: exactly what training's data path does.

    Returns the model input [1, 3, S, S] and the uint8 crop [S, S, 3], so attention maps
    overlay the pixels the model actually saw.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] array, got {image.dtype} {image.shape}")
        image = Image.fromarray(image)
    elif image.mode != "RGB":
        image = to_rgb(image)
    crop = np.asarray(resize_center_crop(image, int(img_size)), dtype=np.uint8).copy()
    chw = torch.from_numpy(crop).permute(2, 0, 1).unsqueeze(0)
    return Preprocessed(tensor=normalize(chw, tuple(mean), tuple(std)), rgb=crop)
