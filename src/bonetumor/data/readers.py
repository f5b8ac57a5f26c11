"""One entry point for reading images, whatever their format, mode or bit depth.

Everything downstream sees a float32 array in [0, 1] of shape (H, W, C) with C = 1 or 3; it
never cares whether the file was an 8-bit JPEG, a 16-bit PNG, a DICOM frame or a NIfTI slice.
A volume (NIfTI, multi-frame DICOM) is read one 2-D slice at a time: ``frame`` picks it.

As MONAI's ``LoadImage`` does, ``read_image`` asks a registry of readers, one per format, which
one takes the file (by its name; an extension-less file by its first bytes) and hands it over.
A new format is one more ``Reader`` in ``READERS``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from bonetumor.data import dicom, nifti
from bonetumor.data.pixels import ReadOptions, apply_window
from bonetumor.errors import BadImageError, first_line

# Pillow already warns for these; its own warning is replaced by the one-line error below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class Reader:
    """One file format: the names it takes, a content check for names without an extension,
    and ``read(path, frame, options)`` -> float32 (H, W, C) in [0, 1]."""

    kind: str
    suffixes: tuple[str, ...]
    read: Callable[[Path, int | None, ReadOptions], np.ndarray]
    sniff: Callable[[bytes], bool] | None = None


def _to_float(img: Image.Image, window: str | None) -> np.ndarray:
    mode = img.mode
    if mode.startswith("I;16") or mode == "I" or mode == "F":
        raw = np.asarray(img).astype(np.float32)
        user = apply_window(raw, window)
        if user is not None:
            return user[..., None]
        if mode == "F":  # float TIFF: no fixed range, so its own min..max
            lo, hi = float(np.nanmin(raw)), float(np.nanmax(raw))
            return ((raw - lo) / (hi - lo if hi > lo else 1.0))[..., None]
        # 16-bit greyscale opens as "I;16" or "I" depending on the Pillow version.
        return (np.clip(raw, 0, 65535) / 65535.0)[..., None]
    if mode in ("1", "L", "LA"):
        raw = np.asarray(img.convert("L"), dtype=np.float32)
        user = apply_window(raw, window)
        return (user if user is not None else raw / 255.0)[..., None]
    # RGB, RGBA, P, CMYK, YCbCr ...: alpha is dropped (composited on black by convert).
    raw = np.asarray(img.convert("RGB"), dtype=np.float32)
    user = apply_window(raw, window)
    return user if user is not None else raw / 255.0


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    if img.mode not in ("1", "L", "I;16", "I", "F", "RGB"):
        img = img.convert("RGB")
    return img.resize((max(2, round(w * scale)), max(2, round(h * scale))), Image.Resampling.BOX)


def _header_size(p: Path) -> tuple[int, int]:
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(p) as img:
            return img.size
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def read_pillow(p: Path, frame: int | None, options: ReadOptions) -> np.ndarray:
    """A PNG, JPEG, TIFF, BMP or WebP file (any mode or bit depth) as float32 (H, W, C)."""
    limit = Image.MAX_IMAGE_PIXELS
    if options.allow_large:
        Image.MAX_IMAGE_PIXELS = None  # the user vouched for their files; one-way by design
    try:
        with Image.open(p) as img:
            n = img.size[0] * img.size[1]
            if limit and not options.allow_large and n > limit:
                raise Image.DecompressionBombError(n)
            img.draft(img.mode, (options.max_side, options.max_side))  # JPEG decodes at reduced scale
            img.load()
            return _to_float(_shrink(img, options.max_side), options.window)
    except Image.DecompressionBombError:
        w, h = _header_size(p)
        raise BadImageError(p, f"{w}x{h} = {w * h:,} pixels is above Pillow's decompression-bomb limit of "
                               f"{limit:,}; if you trust the file, pass --allow-large-images") from None


READERS = (
    # NIfTI first: ".nii.gz" is two suffixes.
    Reader("nifti", (".nii", ".nii.gz"), nifti.read_nifti_slice),
    # PACS exports often have no extension: DICOM says so at byte 128.
    Reader("dicom", (".dcm", ".dicom", ".ima"), dicom.read_dicom, sniff=lambda head: head[128:132] == b"DICM"),
    Reader("image", (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp"), read_pillow),
)


def reader_for(path: str | Path) -> Reader | None:
    """The reader that takes ``path``: by its name, or by its first bytes when it has no extension."""
    name = Path(path).name.lower()
    for reader in READERS:
        if name.endswith(reader.suffixes):
            return reader
    if Path(name).suffix == "":
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return None
        return next((r for r in READERS if r.sniff is not None and r.sniff(head)), None)
    return None


def image_kind(path: str | Path) -> str | None:
    """'image', 'dicom' or 'nifti' (the reader's kind), or None for a file no reader takes."""
    reader = reader_for(path)
    return reader.kind if reader is not None else None


def is_image_file(path: str | Path) -> bool:
    """True when a reader takes the file (by name; extension-less DICOM by content)."""
    return reader_for(path) is not None


def shrink_array(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Area-average an (H, W, C) float array so that its longer side is at most ``max_side``."""
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    import torch.nn.functional as F

    scale = max_side / max(h, w)
    size = (max(2, round(h * scale)), max(2, round(w * scale)))
    t = torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1)[None]
    return F.interpolate(t, size=size, mode="area")[0].permute(1, 2, 0).numpy()


def read_image(path: str | Path, frame: int | None = None, options: ReadOptions | None = None) -> np.ndarray:
    """Read an image, a DICOM frame or a NIfTI slice as float32 (H, W, C) in [0, 1], C = 1 or 3.

    Args:
        frame: the slice of a volume (NIfTI, multi-frame DICOM); None for a 2-D image.
        options: windowing, slicing and size limits (defaults: the file's own window).

    Raises:
        BadImageError: empty, truncated, corrupt or non-image file, naming the file.
    """
    p, options = Path(path), options or ReadOptions()
    reader = reader_for(p)
    try:
        if p.stat().st_size == 0:
            raise BadImageError(p, "empty file (0 bytes)")
        arr = (reader.read if reader is not None else read_pillow)(p, frame, options)
    except BadImageError:
        raise
    except FileNotFoundError:
        raise BadImageError(p, "file not found") from None
    except UnidentifiedImageError:
        raise BadImageError(p, "not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError) as e:
        if getattr(e, "errno", None) == 40:
            raise BadImageError(p, "symbolic link loop") from None
        raise BadImageError(p, f"cannot decode image ({first_line(e)})") from None
    if arr.ndim != 3 or arr.shape[0] < 2 or arr.shape[1] < 2:
        raise BadImageError(p, f"image is too small ({arr.shape[1]}x{arr.shape[0]} pixels)")
    if not np.isfinite(arr).all():
        raise BadImageError(p, "image holds NaN or infinite values")
    return np.ascontiguousarray(shrink_array(arr, options.max_side), dtype=np.float32)


def load_tensor(path: str | Path, frame: int | None = None, options: ReadOptions | None = None,
                rgb: bool = True) -> torch.Tensor:
    """Read an image (or a volume's slice) as a float tensor 3xHxW in [0, 1]; with ``rgb``
    False, a grey image stays 1xHxW."""
    arr = read_image(path, frame, options)
    x = torch.from_numpy(arr).permute(2, 0, 1).contiguous()
    return x.expand(3, -1, -1).contiguous() if rgb and x.shape[0] == 1 else x
