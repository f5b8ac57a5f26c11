"""NIfTI volumes (nibabel does the format): one 2-D slice at a time, windowed over the volume.

A decoded volume is kept in a small per-process cache, since the slices of one volume are read
in a row; ``forget_volumes`` empties it (a server does so after each request). Its percentiles
are computed once per volume, not per slice: a slice read never passes over the whole volume.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from threading import Lock

import numpy as np

from bonetumor.data.pixels import (
    ReadOptions,
    linear_window,
    parse_window,
    scale_between,
)
from bonetumor.errors import BadImageError, BonetumorError, first_line

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2  # decoded volumes kept per process: slices of one volume are read in a row
MAX_VOXELS = 2**28  # 1 GB as float32: a 512 x 512 x 1024 CT fits
PERCENTILE_VOXELS = 2**24  # percentiles from at most this many voxels, evenly spaced through the volume
_LOCK = Lock()


class Volume:
    """A decoded volume (X, Y, Z) float32 and its percentiles, each computed once."""

    def __init__(self, vol: np.ndarray):
        self.vol = vol
        self._percentiles: dict[tuple[float, float], tuple[float, float]] = {}

    def percentiles(self, lo: float = 0.5, hi: float = 99.5) -> tuple[float, float]:
        """The volume's lo-th and hi-th percentiles. Above ``PERCENTILE_VOXELS`` voxels they come
        from an evenly spaced sample: the exact ones of a 1 GB volume cost seconds and a copy."""
        if (lo, hi) not in self._percentiles:
            flat = self.vol.ravel(order="K")  # a view of a contiguous volume, in either order
            step = max(1, -(-flat.size // PERCENTILE_VOXELS))
            a, b = np.percentile(flat[::step], [lo, hi])
            self._percentiles[lo, hi] = (float(a), float(b))
        return self._percentiles[lo, hi]


def _load_nifti(p: Path) -> Volume:
    """The volume (X, Y, Z) float32 in closest-canonical (RAS) orientation."""
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
        proxy = img.dataobj
        if getattr(proxy, "slope", 1.0) == 1.0 and getattr(proxy, "inter", 0.0) == 0.0:
            vol = np.asanyarray(proxy)  # the stored type: a uint8 volume is checked at a quarter of float32's size
        else:
            vol = img.get_fdata(dtype=np.float32)
    except (ImageFileError, HeaderDataError, ImageDataError, EOFError, OSError, ValueError, TypeError) as e:
        raise BadImageError(p, f"truncated or corrupt NIfTI file ({first_line(e)})") from None
    if vol.ndim == 4 and vol.shape[3] == 1:
        vol = vol[..., 0]
    if vol.ndim == 2:
        vol = vol[..., None]
    if vol.ndim != 3:
        raise BadImageError(p, f"NIfTI of shape {vol.shape}: expected a 2-D image or a 3-D volume")
    low, high = float(vol.min()), float(vol.max())  # one pass each, no copy; NaN spreads to both
    if not (np.isfinite(low) and np.isfinite(high)):
        raise BadImageError(p, f"NIfTI volume holds {int((~np.isfinite(vol)).sum())} NaN or infinite voxels")
    if low == high:
        raise BadImageError(p, f"NIfTI volume of shape {vol.shape} holds no image: every voxel is {low:g}")
    # Closest-canonical (RAS) orientation, as nibabel's as_closest_canonical: flips and transposes
    # (views), then the one float32 copy, made only for a volume that holds an image.
    vol = nib.orientations.apply_orientation(vol, nib.orientations.io_orientation(img.affine))
    return Volume(np.asarray(vol, dtype=np.float32))


def forget_volumes() -> None:
    """Empty the decoded-volume cache."""
    with _LOCK:
        _CACHE.clear()


def load_volume(path: str | Path) -> Volume:
    """``_load_nifti`` through a small per-process cache keyed by path, size and mtime. A bad
    volume's error is kept too: finding the data and reading it would otherwise decode it twice."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            value = _CACHE[key]
            if isinstance(value, BadImageError):
                raise value
            return value
    try:
        value = _load_nifti(p)
    except BadImageError as e:
        value = e
    with _LOCK:
        _CACHE[key] = value
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    if isinstance(value, BadImageError):
        raise value
    return value


def _take(vol: np.ndarray, axis: int, k: int) -> np.ndarray:
    # Rows run anterior->posterior or superior->inferior as radiologists view them.
    # Indexing gives a view; np.take would first copy the whole (Fortran-ordered) volume.
    return np.rot90(vol[(slice(None),) * axis + (k,)])


def read_nifti_slice(path: str | Path, frame: int | None, options: ReadOptions) -> np.ndarray:
    """One slice of a NIfTI volume as float32 (H, W, 1) in [0, 1]; windowed over the whole volume."""
    p = Path(path)
    volume = load_volume(p)
    vol = volume.vol
    axis = options.slice_axis
    if not 0 <= axis < 3:
        raise BonetumorError(f"--slice-axis must be 0, 1 or 2, not {axis}")
    n = vol.shape[axis]
    k = n // 2 if frame is None else frame
    if not 0 <= k < n:
        raise BadImageError(p, f"slice {k} does not exist along axis {axis} (the volume has {n})")
    sl = _take(vol, axis, k)
    w = parse_window(options.window)
    if w is not None and w[0] == "cw":
        out = linear_window(sl, w[1], w[2])
    else:  # percentiles of the volume: the user's, else 0.5..99.5 (MRI intensities have no fixed unit)
        out = scale_between(sl, *volume.percentiles(*(w[1:] if w is not None else ())))
    return out.astype(np.float32)[..., None]


def nonempty_slices(path: str | Path, axis: int) -> list[int]:
    """Slice indices along ``axis`` that are not constant (empty slices carry no image)."""
    vol = load_volume(path).vol
    others = tuple(i for i in range(3) if i != axis)  # reduced in place: no copy of the volume
    return [int(k) for k in np.flatnonzero(vol.max(axis=others) > vol.min(axis=others))]
