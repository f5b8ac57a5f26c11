"""DICOM frames as a reader would see them: pydicom decodes, this module only orders its steps.

Stored value -> modality LUT (rescale slope/intercept: Hounsfield units for CT) -> the user's
window, else the header's VOI LUT or window centre/width, else the frame's min..max -> inverted
for MONOCHROME1 (where 0 is white). Compressed transfer syntaxes use pydicom's pixel handlers;
the JPEG-LS, JPEG 2000 and 12-bit JPEG ones come with ``pip install 'bonetumor[dicom]'``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bonetumor.data.pixels import ReadOptions, apply_window, linear_window
from bonetumor.errors import BadImageError, first_line

DECODERS_HINT = "install the DICOM decoders: pip install 'bonetumor[dicom]' (pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg)"


@dataclass(frozen=True)
class DicomInfo:
    """Header facts used to group files into series and order their slices."""

    frames: int
    series: str | None
    position: float | None  # along the slice normal, in mm
    instance: int | None
    has_pixels: bool


def _read(p: Path, pixels: bool):
    import pydicom
    from pydicom.errors import InvalidDicomError

    # With pixels, large elements are deferred: the pixel data is read only when decoded.
    opts = {"stop_before_pixels": not pixels, "defer_size": "1 MB" if pixels else None}
    try:
        with open(p, "rb") as f:
            ds = pydicom.dcmread(f, **opts)
            if not pixels:  # where the pixel data starts: what follows is all it can hold
                ds.bonetumor_pixels_at = f.tell()
        return ds
    except InvalidDicomError:
        # Files without the 128-byte preamble are still common; accept them only if they parse
        # as a dataset that looks like DICOM, so a text file named .dcm is not taken for one.
        try:
            ds = pydicom.dcmread(p, force=True, **opts)
        except Exception:  # noqa: BLE001 - any parser failure means "not DICOM"
            ds = None
        if ds is None or not ("SOPClassUID" in ds or "PixelData" in ds or "Rows" in ds):
            raise BadImageError(p, "not a DICOM file (no DICM header and no DICOM elements)") from None
        return ds
    except (EOFError, OSError, ValueError, TypeError, KeyError) as e:
        raise BadImageError(p, f"truncated or corrupt DICOM header ({first_line(e)})") from None


def _sop_name(ds) -> str:
    uid = ds.get("SOPClassUID")
    return getattr(uid, "name", None) or str(uid or "unknown")


MAX_FRAMES = 100_000  # more than any multi-frame series; a reference is made per frame before decoding


def _declared_frames(p: Path, ds) -> int:
    """``NumberOfFrames``, refused when the file is too short to hold them (a 9 KB header can
    declare a billion) or when it is above ``MAX_FRAMES``: checked before anything is made per frame."""
    try:
        frames = int(ds.get("NumberOfFrames") or 1)
    except (TypeError, ValueError):
        raise BadImageError(p, f"NumberOfFrames {ds.get('NumberOfFrames')!r} is not a number") from None
    if not 1 <= frames <= MAX_FRAMES:
        raise BadImageError(p, f"declares {frames:,} frames; a DICOM file is read with 1 to {MAX_FRAMES:,}")
    if frames == 1 or "Rows" not in ds:
        return frames
    ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
    if ts is not None and getattr(ts, "is_encapsulated", False):
        least = 8  # a compressed frame is at least one item: a tag and a length
    else:
        bits = int(ds.get("BitsAllocated") or 8)
        least = int(ds.Rows) * int(ds.get("Columns") or 0) * int(ds.get("SamplesPerPixel") or 1) * bits // 8
    held = _pixel_bytes(p, ds)
    if frames * least > held:
        raise BadImageError(p, f"declares {frames:,} frames of at least {least:,} bytes each, but the file holds "
                               f"{held:,} bytes of pixel data at most")
    return frames


def _pixel_bytes(p: Path, ds) -> int:
    """The most bytes of pixel data the file can hold: all of it after the pixel data's start."""
    start = getattr(ds, "bonetumor_pixels_at", None)
    if start is None:
        elem = ds.get_item("PixelData") if "PixelData" in ds else None
        start = getattr(elem, "value_tell", None)  # a raw or deferred element: where its bytes begin
        if start is None:
            value = getattr(elem, "value", None)
            return len(value) if isinstance(value, (bytes, bytearray)) else 0
    return max(p.stat().st_size - int(start), 0)


def dicom_info(path: str | Path) -> DicomInfo:
    """Frame count (checked against the file's size), series UID, slice position and instance
    number, read without the pixels."""
    p = Path(path)
    ds = _read(p, pixels=False)
    position = None
    ipp, iop = ds.get("ImagePositionPatient"), ds.get("ImageOrientationPatient")
    if ipp is not None and iop is not None and len(ipp) == 3 and len(iop) == 6:
        normal = np.cross(np.array(iop[:3], float), np.array(iop[3:], float))
        position = float(np.dot(normal, np.array(ipp, float)))
    inst = ds.get("InstanceNumber")
    return DicomInfo(frames=_declared_frames(p, ds), series=str(ds.get("SeriesInstanceUID") or "") or None,
                     position=position, instance=int(inst) if inst not in (None, "") else None,
                     has_pixels=any(k in ds for k in ("Rows", "PixelData", "FloatPixelData", "DoubleFloatPixelData")))


def order_series(paths: list[Path], infos: list[DicomInfo]) -> list[Path]:
    """Slices of one series in anatomical order: by position along the slice normal, else by
    instance number, else by name."""
    def key(item):
        p, info = item
        return (info.position if info.position is not None else float("inf"),
                info.instance if info.instance is not None else 1 << 30, p.name)

    return [p for p, _ in sorted(zip(paths, infos), key=key)]


def _decode(p: Path, frame: int | None):
    from pydicom.pixels import pixel_array

    ds = _read(p, pixels=True)  # the header is parsed once, for the checks and the decoding
    if "Rows" not in ds:
        raise BadImageError(p, f"DICOM file holds no image ({_sop_name(ds)})")
    frames = _declared_frames(p, ds)
    if frame is not None and not 0 <= frame < frames:
        raise BadImageError(p, f"frame {frame} does not exist (the file has {frames})")
    index = (frame or 0) if frames > 1 else None  # a multi-frame file read as one image: frame 0
    try:
        # A multi-frame file is decoded from the file itself, one frame, so that its other frames
        # are never held in memory; a single frame from the dataset already parsed.
        arr = pixel_array(p if frames > 1 and getattr(ds, "preamble", None) is not None else ds, index=index)
    except AttributeError:
        raise BadImageError(p, f"DICOM file holds no image ({_sop_name(ds)})") from None
    except (NotImplementedError, RuntimeError) as e:
        ts = getattr(ds, "file_meta", {}).get("TransferSyntaxUID")
        name = f"{getattr(ts, 'name', ts)} ({ts})" if ts else "an unknown transfer syntax"
        reason = first_line(e).rstrip(":")
        raise BadImageError(p, f"pixel data compressed as {name} cannot be decoded ({reason}); {DECODERS_HINT}") from None
    except (ValueError, EOFError, OSError, KeyError, TypeError) as e:
        raise BadImageError(p, f"truncated or corrupt DICOM pixel data ({first_line(e)})") from None
    return ds, arr, index or 0


def read_dicom(path: str | Path, frame: int | None, options: ReadOptions) -> np.ndarray:
    """One DICOM frame as float32 (H, W, C) in [0, 1] (see the module docstring for the steps)."""
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    p = Path(path)
    ds, arr, index = _decode(p, frame)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds).astype(np.float32)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return np.clip(rgb / (2**bits - 1), 0, 1)
    if int(ds.get("SamplesPerPixel") or 1) == 3:  # colour (YBR already converted to RGB by pydicom)
        values = arr.astype(np.float32)
        user = apply_window(values, options.window)
        bits = int(ds.get("BitsStored") or 8)
        return user if user is not None else np.clip(values / (2**bits - 1), 0, 1)
    values = apply_modality_lut(arr, ds).astype(np.float32)
    out = apply_window(values, options.window)
    if out is None and ds.get("VOILUTSequence"):
        out = voi_lut(values, ds.VOILUTSequence[min(index, len(ds.VOILUTSequence) - 1)])
    elif out is None and ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        centre, width = (_first(ds.WindowCenter, index), _first(ds.WindowWidth, index))
        out = linear_window(values, centre, width)
    elif out is None:
        lo, hi = float(values.min()), float(values.max())
        out = (values - lo) / (hi - lo if hi > lo else 1.0)
    if str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1":
        out = 1.0 - out  # MONOCHROME1: the lowest value is displayed white
    return out.astype(np.float32)[..., None]


def voi_lut(values: np.ndarray, item) -> np.ndarray:
    """A VOI LUT Sequence item applied to modality-LUT values, in [0, 1] (PS3.3 C.11.2.1.1).

    Written here because pydicom 3.0's ``apply_voi_lut`` indexes with the LUT's output dtype,
    so an 8-bit LUT of more than 256 entries wraps (entry 272 reads as entry 16).
    """
    n, first, bits = (int(v) for v in item.LUTDescriptor)
    n = n or 65536
    raw = item.LUTData
    lut = np.frombuffer(raw, dtype="<u2")[:n] if isinstance(raw, (bytes, bytearray)) else np.asarray(raw, dtype=np.int64)
    index = np.clip(np.round(values).astype(np.int64) - first, 0, len(lut) - 1)
    return np.clip(lut[index].astype(np.float32) / (2**bits - 1), 0, 1)


def _first(value, index: int) -> float:
    """Window centre/width may hold one value per frame (or alternatives): take this frame's."""
    try:
        seq = list(value)
    except TypeError:
        return float(value)
    return float(seq[min(index, len(seq) - 1)]) if seq else float("nan")
