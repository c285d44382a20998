"""Pure image helpers for attention maps: upsample, colour, blend, tile, encode.

Like pytorch-grad-cam's ``show_cam_on_image``: every function takes arrays and returns a
new array, never touching its inputs, and rejects out-of-range arguments with a message.
Images are RGB uint8 [H, W, 3]; maps are float [h, w].
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from types import MappingProxyType

import cv2
import numpy as np

__all__ = ["COLORMAPS", "INTERPOLATIONS", "upsample_map", "normalize_map", "overlay", "enlarge_image",
           "add_border", "add_caption", "tile_images", "encode_png"]

COLORMAPS: Mapping[str, int] = MappingProxyType({
    "inferno": cv2.COLORMAP_INFERNO,
    "viridis": cv2.COLORMAP_VIRIDIS,
    "magma": cv2.COLORMAP_MAGMA,
    "plasma": cv2.COLORMAP_PLASMA,
    "turbo": cv2.COLORMAP_TURBO,
    "jet": cv2.COLORMAP_JET,
    "hot": cv2.COLORMAP_HOT,
    "bone": cv2.COLORMAP_BONE,
})
INTERPOLATIONS: Mapping[str, int] = MappingProxyType({
    "cubic": cv2.INTER_CUBIC,
    "linear": cv2.INTER_LINEAR,
    "nearest": cv2.INTER_NEAREST,
})


def _size_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    h, w = size
    return int(h), int(w)


def upsample_map(attn_map: np.ndarray, size: int | Sequence[int], interpolation: str = "cubic") -> np.ndarray:
    """[h, w] -> float32 [H, W] with OpenCV (half-pixel centres, like ``F.interpolate(align_corners=False)``)."""
    m = np.asarray(attn_map, dtype=np.float32)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D map [h, w], got shape {m.shape}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {tuple(INTERPOLATIONS)}, got {interpolation!r}")
    h, w = _size_hw(size)
    if (h, w) == m.shape:
        return m.copy()
    return cv2.resize(m, (w, h), interpolation=INTERPOLATIONS[interpolation])


def normalize_map(attn_map: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale to [0, 1] with ``vmin``/``vmax`` (default: the map's own range), clipping outside values.

    A shared ``vmin``/``vmax`` puts several maps on one colour scale. A constant map gives zeros.
    """
    m = np.asarray(attn_map, dtype=np.float32)
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError(f"map range must be finite, got vmin={lo} vmax={hi}")
    if hi <= lo:
        return np.zeros_like(m)
    return np.clip((m - lo) / (hi - lo), 0.0, 1.0)


def overlay(image_rgb: np.ndarray, attn_map: np.ndarray, alpha: float = 0.5, colormap: str = "inferno",
            vmin: float | None = None, vmax: float | None = None, interpolation: str = "cubic") -> np.ndarray:
    """Blend a colour-mapped attention map over an RGB image: ``(1 - alpha) * image + alpha * heat``.

    ``attn_map`` [h, w] is upsampled to the image size. The colour scale is ``[vmin, vmax]``,
    by default the (original, not upsampled) map's range; values outside are clipped.
    Returns a new uint8 [H, W, 3].
    """
    img = np.asarray(image_rgb)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if colormap not in COLORMAPS:
        raise ValueError(f"colormap must be one of {tuple(COLORMAPS)}, got {colormap!r}")
    m = np.asarray(attn_map, dtype=np.float32)
    if m.ndim != 2 or not np.isfinite(m).all():
        raise ValueError(f"attention map must be a finite 2-D array, got shape {m.shape}")
    lo = float(m.min()) if vmin is None else float(vmin)
    hi = float(m.max()) if vmax is None else float(vmax)
    scaled = normalize_map(upsample_map(m, img.shape[:2], interpolation), lo, hi)
    heat_bgr = cv2.applyColorMap(np.rint(scaled * 255.0).astype(np.uint8), COLORMAPS[colormap])
    heat = cv2.cvtColor(heat_bgr, cv2.COLOR_BGR2RGB).astype(np.float32)
    blended = (1.0 - alpha) * img.astype(np.float32) + alpha * heat
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def enlarge_image(image_rgb: np.ndarray, size: int | Sequence[int], interpolation: str = "cubic") -> np.ndarray:
    """Resize an RGB uint8 image to ``size`` (e.g. a 32x32 crop to a viewable 192x192)."""
    img = np.asarray(image_rgb)
    h, w = _size_hw(size)
    if img.shape[:2] == (h, w):
        return img.copy()
    return cv2.resize(img, (w, h), interpolation=INTERPOLATIONS[interpolation])


def add_border(image_rgb: np.ndarray, color: Sequence[int] = (255, 196, 0), width: int = 3) -> np.ndarray:
    """A copy with a ``width``-pixel frame in ``color`` drawn inside its edge (marks highlighted tiles)."""
    out = np.array(image_rgb, dtype=np.uint8, copy=True)
    c = np.asarray(color, dtype=np.uint8)
    out[:width], out[-width:], out[:, :width], out[:, -width:] = c, c, c, c
    return out


def add_caption(image_rgb: np.ndarray, text: str, height: int = 18, scale: float = 0.42) -> np.ndarray:
    """A copy with a white strip below holding ``text`` (ASCII) in black; used for exported figures."""
    img = np.asarray(image_rgb, dtype=np.uint8)
    strip = np.full((height, img.shape[1], 3), 255, dtype=np.uint8)
    (text_w, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
    if text_w > img.shape[1] - 6:  # shrink long captions to fit the tile
        scale *= (img.shape[1] - 6) / text_w
    cv2.putText(strip, text, (3, height - 5), cv2.FONT_HERSHEY_SIMPLEX, scale, (0, 0, 0), 1, cv2.LINE_AA)
    return np.concatenate([img, strip], axis=0)


def tile_images(images: Sequence[np.ndarray], columns: int, pad: int = 4, background: int = 255) -> np.ndarray:
    """Arrange RGB images row-major in a grid of ``columns``; cells take the largest image's size."""
    if not images:
        raise ValueError("tile_images needs at least one image")
    columns = max(1, min(int(columns), len(images)))
    rows = -(-len(images) // columns)
    cell_h = max(im.shape[0] for im in images)
    cell_w = max(im.shape[1] for im in images)
    grid = np.full((rows * cell_h + (rows + 1) * pad, columns * cell_w + (columns + 1) * pad, 3), background,
                   dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, columns)
        top, left = pad + r * (cell_h + pad), pad + c * (cell_w + pad)
        grid[top:top + im.shape[0], left:left + im.shape[1]] = im
    return grid


def encode_png(image_rgb: np.ndarray) -> bytes:
    """PNG bytes of an RGB uint8 image (for download buttons and files)."""
    img = np.asarray(image_rgb, dtype=np.uint8)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise ValueError(f"cannot encode an image of shape {img.shape} as PNG")
    return buf.tobytes()
