"""The one image-file reader: `data convert` and `viz attention` see the same pixels.

Needs only PIL and numpy (no FFCV), so pictures can be drawn where FFCV is missing.
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Images whose samples PIL keeps wider than 8 bits; its own convert("RGB") clips them at 255
# (a white picture) instead of scaling, so `_to_8_bits` scales them first.
WIDE_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")
UINT16_MAX, INT32_MAX = 65535, 2**31 - 1


def load_rgb(path, max_resolution: int | None = None) -> np.ndarray:
    """uint8 `[H, W, 3]` of an image file: EXIF orientation applied, the longer side at most
    `max_resolution` (None: as stored).

    16-bit images (and 32-bit integer ones whose values fit 16 bits, as PIL opens many 16-bit
    files) are scaled by 255/65535, wider 32-bit integers by 255/(2^31 - 1), 32-bit floats in
    [0, 1] by 255 (other floats are taken as 0-255, clipped); alpha is dropped. Raises what
    PIL raises for files it cannot read (UnidentifiedImageError, DecompressionBombError,
    OSError, ...).
    """
    with Image.open(path) as image:
        if max_resolution is not None:
            # JPEG: let libjpeg decode at 1/2..1/8 scale where that still leaves both sides >= max_resolution
            image.draft("RGB", (max_resolution, max_resolution))
        image = ImageOps.exif_transpose(image)
        if image.mode in WIDE_MODES:
            image = _to_8_bits(image)
        image = image.convert("RGB")
    if max_resolution is not None and max(image.size) > max_resolution:
        scale = max_resolution / max(image.size)
        new_size = tuple(max(1, round(side * scale)) for side in image.size)
        image = image.resize(new_size, Image.Resampling.LANCZOS)
    return np.asarray(image)


def _to_8_bits(image: Image.Image) -> Image.Image:
    """A one-channel image of a wide mode as mode L, scaled as `load_rgb` says."""
    values = np.asarray(image, dtype=np.float64)
    if image.mode == "F":
        scale = 255.0 if values.size and values.min() >= 0 and values.max() <= 1 else 1.0
    else:
        scale = 255 / (UINT16_MAX if values.size == 0 or values.max() <= UINT16_MAX else INT32_MAX)
    return Image.fromarray(np.round(values * scale).clip(0, 255).astype(np.uint8))
