"""Volumes and studies: NIfTI volumes, multi-frame DICOM files and DICOM series folders, each
turned into the 2-D slices the model reads, with the study they belong to.

A study is the unit a clinician reads (one volume, one series); its slices stay together in
splits and ``predict`` gives it one aggregated score.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from threading import Lock
from typing import Iterable, Sequence

import numpy as np

from bonetumor.data.io import ReadOptions, apply_window, image_kind
from bonetumor.errors import BadImageError, BonetumorError, first_line

_CACHE: OrderedDict = OrderedDict()
_CACHE_SIZE = 2  # decoded volumes kept per process: slices of one volume are read in a row
MAX_VOXELS = 2**28  # 1 GB as float32: a 512 x 512 x 1024 CT fits
_LOCK = Lock()


@dataclass(frozen=True)
class SliceRef:
    """One 2-D image to read: a file, the slice in it (None for a 2-D file) and its study."""

    path: str
    frame: int | None = None
    study: str | None = None

    @property
    def ref(self) -> str:
        """A unique name for tables: the path, with ``#slice`` for a slice of a volume."""
        return self.path if self.frame is None else f"{self.path}#{self.frame}"


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
        msg = first_line(e)
        raise BadImageError(p, f"truncated or corrupt NIfTI file ({msg})") from None
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
    """Empty the decoded-volume cache (a server does so after each request)."""
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


def expand_file(path: str | Path, options: ReadOptions | None = None) -> list[SliceRef]:
    """The 2-D images in one file: a volume's non-empty slices, a multi-frame DICOM's frames,
    else the file itself. A file that cannot be read stays one entry, for the bad-file check."""
    options = options or ReadOptions()
    p, kind = str(path), image_kind(path)
    try:
        if kind == "nifti":
            return [SliceRef(p, k, p) for k in nonempty_slices(path, options.slice_axis)]
        if kind == "dicom":
            from bonetumor.data.dicom import dicom_info

            return _dicom_refs(Path(p), dicom_info(path))
    except (BadImageError, OSError):
        pass
    return [SliceRef(p)]


def _dicom_refs(path: Path, info) -> list[SliceRef]:
    """A multi-frame file as its frames (the file is the study); a single-frame file as itself,
    its study being its folder and SeriesInstanceUID."""
    p = str(path)
    if info.frames > 1:
        return [SliceRef(p, k, p) for k in range(info.frames)]
    return [SliceRef(p, None, f"{path.parent}#{info.series}" if info.series else None)]


def _dicom_series(files: Sequence[Path]) -> list[SliceRef]:
    """DICOM files as slices: single-frame files grouped into series (folder + SeriesInstanceUID),
    each series in slice order; multi-frame files as their frames."""
    from bonetumor.data.dicom import dicom_info, order_series

    series: dict[str, list[tuple[Path, object]]] = {}
    out: list[SliceRef] = []
    for f in files:
        try:
            info = dicom_info(f)
        except BadImageError:
            out.append(SliceRef(str(f)))  # kept, so the bad-file check names it
            continue
        refs = _dicom_refs(f, info)
        if info.frames > 1 or refs[0].study is None:  # frames, or a file outside any series
            out += refs
        else:
            series.setdefault(refs[0].study, []).append((f, info))
    for study, items in series.items():
        out += [SliceRef(str(p), None, study) for p in order_series([p for p, _ in items], [i for _, i in items])]
    return out


def expand_inputs(paths: Iterable[str | Path], options: ReadOptions | None = None) -> list[SliceRef]:
    """Files and folders as given by a user, as slices with their studies.

    A folder is searched recursively; the DICOM files in it form series (one study each), in
    slice order; each NIfTI volume or multi-frame DICOM is a study of its slices.

    Raises:
        BonetumorError: a path that does not exist, or a folder with no image files.
    """
    out: list[SliceRef] = []
    for p in map(Path, paths):
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if not f.is_dir() and image_kind(f) is not None)
            if not files:
                raise BonetumorError(f"{p}: folder holds no image files")
        elif p.exists() or p.is_symlink():
            files = [p]
        else:
            raise BonetumorError(f"{p}: file not found")
        dicoms = [f for f in files if image_kind(f) == "dicom"]
        out += _dicom_series(dicoms)
        for f in files:
            if image_kind(f) != "dicom":
                out += expand_file(f, options)
    return out
