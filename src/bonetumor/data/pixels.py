"""Pixel values: how stored values become floats in [0, 1] (windows), and how volumes are sliced.

The bottom of the data layer: every reader (readers.py, dicom.py, nifti.py) maps its stored
values to [0, 1] with these functions and the user's ``ReadOptions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bonetumor.errors import BonetumorError


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
    return scale_between(values, a, b)


def scale_between(values: np.ndarray, a: float, b: float) -> np.ndarray:
    """Values mapped linearly so that ``a``..``b`` spans [0, 1], clipped (float32)."""
    return np.clip((values.astype(np.float32) - a) / (b - a if b > a else 1.0), 0.0, 1.0).astype(np.float32)


def apply_window(values: np.ndarray, window: str | None, ref: np.ndarray | None = None) -> np.ndarray | None:
    """Apply a user window to stored values; None when no window is set (the format's default applies)."""
    w = parse_window(window)
    if w is None:
        return None
    kind, a, b = w
    return linear_window(values, a, b) if kind == "cw" else percentile_window(values, a, b, ref)
