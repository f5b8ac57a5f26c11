"""NIfTI volumes (nibabel does the format): one 2-D slice at a time, windowed over the volume.

A decoded volume is kept in a small per-process cache, since the slices of one volume are read
in a row; ``forget_volumes`` empties it (a server does so after each request).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from threading import Lock

import numpy as np

from bonetumor.data.pixels import ReadOptions, apply_window
from bonetumor.errors import BadImageError, BonetumorError, first_line

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2  # decoded volumes kept per process: slices of one volume are read in a row
MAX_VOXELS = 2**28  # 1 GB as float32: a 512 x 512 x 1024 CT fits
_LOCK = Lock()


def _load_nifti(p: Path) -> tuple[np.ndarray, tuple[float, float]]:
    """Volume (X, Y, Z) float32 in closest-canonical (RAS) orientation and its 0.5/99.5 percentiles."""
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError, ImageDataError

    try:
        img = nib.load(str(p))
        # The header gives the size before any voxel is read: a small .nii.gz can unpack to many GB.
        n = int(np.prod(img.shape, dtype=np.int64))
        if n > MAX_VOXELS:
            raise BadImageError(p, f"NIfTI volume of shape {tuple(img.shape)} holds {n:,} voxels "
                                   f"({n * 4 / 2**30:.1f} GB as float32), above the limit of {MAX_VOXELS:,}")
        img = nib.as_closest_canonical(img)
        vol = np.asarray(img.get_fdata(dtype=np.float32))
    except (ImageFileError, HeaderDataError, ImageDataError, EOFError, OSError, ValueError, TypeError) as e:
        raise BadImageError(p, f"truncated or corrupt NIfTI file ({first_line(e)})") from None
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim == 2:
        vol = vol[..., None]
    if vol.ndim != 3:
        raise BadImageError(p, f"NIfTI of shape {vol.shape}: expected a 2-D image or a 3-D volume")
    bad = int((~np.isfinite(vol)).sum())
    if bad:
        raise BadImageError(p, f"NIfTI volume holds {bad} NaN or infinite voxels")
    return vol, tuple(float(v) for v in np.percentile(vol, [0.5, 99.5]))


def forget_volumes() -> None:
    """Empty the decoded-volume cache."""
    with _LOCK:
        _CACHE.clear()


def load_volume(path: str | Path) -> tuple[np.ndarray, tuple[float, float]]:
    """``_load_nifti`` through a small per-process cache keyed by path, size and mtime."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    value = _load_nifti(p)
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    return value


def _take(vol: np.ndarray, axis: int, k: int) -> np.ndarray:
    # Rows run anterior->posterior or superior->inferior as radiologists view them.
    return np.rot90(np.take(vol, k, axis=axis))


def read_nifti_slice(path: str | Path, frame: int | None, options: ReadOptions) -> np.ndarray:
    """One slice of a NIfTI volume as float32 (H, W, 1) in [0, 1]; windowed over the whole volume."""
    p = Path(path)
    vol, (lo, hi) = load_volume(p)
    axis = options.slice_axis
    if not 0 <= axis < 3:
        raise BonetumorError(f"--slice-axis must be 0, 1 or 2, not {axis}")
    n = vol.shape[axis]
    k = n // 2 if frame is None else frame
    if not 0 <= k < n:
        raise BadImageError(p, f"slice {k} does not exist along axis {axis} (the volume has {n})")
    sl = _take(vol, axis, k)
    out = apply_window(sl, options.window, ref=vol)
    if out is None:  # MRI intensities have no fixed unit: the volume's 0.5..99.5 percentiles
        out = np.clip((sl - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    return out.astype(np.float32)[..., None]


def nonempty_slices(path: str | Path, axis: int) -> list[int]:
    """Slice indices along ``axis`` that are not constant (empty slices carry no image)."""
    vol, _ = load_volume(path)
    moved = np.moveaxis(vol, axis, 0).reshape(vol.shape[axis], -1)
    return [int(k) for k in np.flatnonzero(moved.max(axis=1) > moved.min(axis=1))]
