"""One entry point for reading images, whatever their format, mode or bit depth.

Everything downstream sees a float32 array in [0, 1] of shape (H, W, C) with C = 1 or 3; it
never cares whether the file was an 8-bit JPEG, a 16-bit PNG, a DICOM frame or a NIfTI slice.
A volume (NIfTI, multi-frame DICOM) is read one 2-D slice at a time: ``frame`` picks it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from bonetumor.errors import BadImageError, BonetumorError, first_line
from bonetumor.utils import atomic_path

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".webp")
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
NIFTI_EXTENSIONS = (".nii", ".nii.gz")
# Pillow already warns for these; its own warning is replaced by the one-line error below.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class ReadOptions:
    """How pixel values become [0, 1] and how volumes are sliced. Saved with every run.

    window: None uses the file's own (DICOM header window or VOI LUT; NIfTI 0.5-99.5 percentiles
        of the volume; PNG/JPEG/TIFF their full bit range); "C,W" a centre and width in stored
        (DICOM: rescaled, e.g. Hounsfield) units; "pLO,pHI" percentiles of the image (volume).
    slice_axis: the NIfTI axis that 2-D slices are taken across (2 = axial in RAS volumes).
    allow_large: read images above Pillow's decompression-bomb limit (trusted files only).
    max_side: longer images are shrunk (area average) while read, so a 4000x4000 radiograph
        costs a few MB downstream; the model input (image_size) is far smaller anyway.
    """

    window: str | None = None
    slice_axis: int = 2
    allow_large: bool = False
    max_side: int = 1024


def parse_window(window: str | None) -> tuple[str, float, float] | None:
    """'C,W' -> ('cw', C, W); 'pLO,pHI' -> ('pct', LO, HI); None -> None. Bad text: BonetumorError."""
    if window is None or str(window).strip().lower() in ("", "auto", "none"):
        return None
    text = str(window).strip().lower()
    kind = "pct" if text.startswith("p") else "cw"
    try:
        a, b = (float(v.strip().lstrip("p")) for v in text.split(","))
    except ValueError:
        raise BonetumorError(f"--window {window!r}: expected CENTRE,WIDTH (e.g. 40,400) or pLOW,pHIGH (e.g. p1,p99)") from None
    if kind == "cw" and b <= 0:
        raise BonetumorError(f"--window {window!r}: the width must be positive")
    if kind == "pct" and not 0 <= a < b <= 100:
        raise BonetumorError(f"--window {window!r}: percentiles must satisfy 0 <= low < high <= 100")
    return kind, a, b


def linear_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2.1) mapped to [0, 1]."""
    width = max(float(width), 1.0)
    out = (values.astype(np.float64) - (centre - 0.5)) / (width - 1.0 if width > 1 else 1.0) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def percentile_window(values: np.ndarray, lo: float, hi: float, ref: np.ndarray | None = None) -> np.ndarray:
    """Scale so that the lo-th..hi-th percentiles of ``ref`` (default: the values) span [0, 1]."""
    ref = values if ref is None else ref
    a, b = np.percentile(ref, [lo, hi])
    return np.clip((values.astype(np.float32) - a) / (b - a if b > a else 1.0), 0.0, 1.0).astype(np.float32)


def apply_window(values: np.ndarray, window: str | None, ref: np.ndarray | None = None) -> np.ndarray | None:
    """Apply a user window to stored values; None when no window is set (the format's default applies)."""
    w = parse_window(window)
    if w is None:
        return None
    kind, a, b = w
    return linear_window(values, a, b) if kind == "cw" else percentile_window(values, a, b, ref)


def image_kind(path: str | Path) -> str | None:
    """'image', 'dicom' or 'nifti' from the file name; extension-less files are sniffed for DICOM."""
    name = Path(path).name.lower()
    if name.endswith(NIFTI_EXTENSIONS):
        return "nifti"
    suffix = Path(name).suffix
    if suffix in DICOM_EXTENSIONS:
        return "dicom"
    if suffix in IMAGE_EXTENSIONS:
        return "image"
    if suffix == "":  # PACS exports often have no extension: DICOM says so at byte 128
        try:
            with open(path, "rb") as f:
                head = f.read(132)
        except OSError:
            return None
        return "dicom" if head[128:132] == b"DICM" else None
    return None


def is_image_file(path: str | Path) -> bool:
    """True when this reader accepts the file (by name; extension-less DICOM by content)."""
    return image_kind(path) is not None


def _shrink(img: Image.Image, max_side: int) -> Image.Image:
    w, h = img.size
    if max(w, h) <= max_side:
        return img
    scale = max_side / max(w, h)
    if img.mode not in ("1", "L", "I;16", "I", "F", "RGB"):
        img = img.convert("RGB")
    return img.resize((max(2, round(w * scale)), max(2, round(h * scale))), Image.Resampling.BOX)


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


def _read_pillow(p: Path, options: ReadOptions) -> np.ndarray:
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


def _header_size(p: Path) -> tuple[int, int]:
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with Image.open(p) as img:
            return img.size
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def shrink_array(arr: np.ndarray, max_side: int) -> np.ndarray:
    """Area-average an (H, W, C) float array so that its longer side is at most ``max_side``."""
    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return arr
    import torch
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
    kind = image_kind(p)
    try:
        if p.stat().st_size == 0:
            raise BadImageError(p, "empty file (0 bytes)")
        if kind == "dicom":
            from bonetumor.data.dicom import read_dicom

            arr = read_dicom(p, frame, options)
        elif kind == "nifti":
            from bonetumor.data.volumes import read_nifti_slice

            arr = read_nifti_slice(p, frame, options)
        else:
            arr = _read_pillow(p, options)
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
