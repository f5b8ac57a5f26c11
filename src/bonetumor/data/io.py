"""One entry point for reading images, whatever their mode or bit depth.

Everything downstream sees a float32 array in [0, 1] of shape (H, W, C) with C = 1 or 3;
it never cares whether the file was 8-bit grey, 16-bit, palette or RGBA.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bonetumor.errors import BadImageError
from bonetumor.utils import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")


def is_image_file(path: str | Path) -> bool:
    """True when the name has an image extension this reader accepts (case-insensitive)."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _to_float(img: Image.Image) -> np.ndarray:
    mode = img.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return np.asarray(img, dtype=np.uint16).astype(np.float32)[..., None] / 65535.0
    if mode == "I":
        arr = np.asarray(img, dtype=np.int64).astype(np.float32)
        # 16-bit greyscale PNG opens as "I" in some Pillow versions.
        return (np.clip(arr, 0, 65535) / 65535.0)[..., None]
    if mode == "F":
        arr = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        return ((arr - lo) / (hi - lo if hi > lo else 1.0))[..., None]
    if mode in ("1", "L"):
        return np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0
    if mode == "LA":
        return np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0
    # RGB, RGBA, P, CMYK, YCbCr ...: alpha is dropped (composited on black by convert).
    return np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as float32 (H, W, C) in [0, 1], C = 1 (grey) or 3 (colour).

    Raises:
        BadImageError: empty, truncated, corrupt or non-image file, naming the file.
    """
    p = Path(path)
    try:
        if p.stat().st_size == 0:
            raise BadImageError(p, "empty file (0 bytes)")
        with Image.open(p) as img:
            img.load()
            arr = _to_float(img)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(p, "file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(p, "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(p, f"cannot decode image ({e})") from None
    if arr.shape[0] < 2 or arr.shape[1] < 2:
        raise BadImageError(p, f"image is too small ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if not np.isfinite(arr).all():
        raise BadImageError(p, "image holds NaN or infinite values")
    return arr


def write_png(path: str | Path, img: np.ndarray, bit_depth: int = 8) -> None:
    """Write a float image in [0, 1] (H, W) as an 8- or 16-bit greyscale PNG, atomically."""
    p = Path(path)
    a = np.clip(np.asarray(img, dtype=np.float64), 0.0, 1.0)
    if bit_depth == 16:
        pil = Image.fromarray(np.round(a * 65535).astype(np.uint16))
    else:
        pil = Image.fromarray(np.round(a * 255).astype(np.uint8))
    with atomic_path(p, fsync=False) as tmp:
        pil.save(tmp, format="PNG")
