"""What one 2-D image is (``Sample``), and how studies become them: NIfTI volumes, multi-frame
DICOM files and DICOM series folders, each turned into the 2-D slices the model reads, with the
study they belong to.

A sample is a file, or one slice of a volume or series file, with what is known about it: its
class (None for a file to predict), patient, split, lesion mask and study. A study is the unit a
clinician reads (one volume, one series); its slices stay together in splits and ``predict``
gives it one aggregated score.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterable, Sequence

from bonetumor.data.dicom import dicom_info, order_series
from bonetumor.data.nifti import nonempty_slices
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import image_kind
from bonetumor.errors import BadImageError, BonetumorError


@dataclass(frozen=True)
class Sample:
    """One 2-D image: where it is, its class, and what is known about it."""

    path: str
    label: str | None = None
    patient_id: str | None = None
    split: str | None = None
    mask_path: str | None = None
    frame: int | None = None  # the slice of a volume (NIfTI, multi-frame DICOM); None for 2-D files
    study: str | None = None  # the volume or series the slice belongs to
    group: str | None = None  # images that must share a split (--split-by cluster: copies of each other)

    @property
    def ref(self) -> str:
        """A unique name for tables: the path, with ``#slice`` for a slice of a volume."""
        return self.path if self.frame is None else f"{self.path}#{self.frame}"


def expand_file(path: str | Path, options: ReadOptions | None = None) -> list[Sample]:
    """The 2-D images in one file: a volume's non-empty slices, a multi-frame DICOM's frames,
    else the file itself. A file that cannot be read stays one entry, for the bad-file check."""
    options = options or ReadOptions()
    p, kind = str(path), image_kind(path)
    try:
        if kind == "nifti":
            return [Sample(p, frame=k, study=p) for k in nonempty_slices(path, options.slice_axis)]
        if kind == "dicom":
            return _dicom_refs(Path(p), dicom_info(path))
    except (BadImageError, OSError):
        pass
    return [Sample(p)]


def _dicom_refs(path: Path, info) -> list[Sample]:
    """A multi-frame file as its frames (the file is the study); a single-frame file as itself,
    its study being its folder and SeriesInstanceUID."""
    p = str(path)
    if info.frames > 1:
        return [Sample(p, frame=k, study=p) for k in range(info.frames)]
    return [Sample(p, study=f"{path.parent}#{info.series}" if info.series else None)]


def _dicom_series(files: Sequence[Path]) -> list[Sample]:
    """DICOM files as slices: single-frame files grouped into series (folder + SeriesInstanceUID),
    each series in slice order; multi-frame files as their frames."""
    series: dict[str, list[tuple[Path, object]]] = {}
    out: list[Sample] = []
    for f in files:
        try:
            info = dicom_info(f)
        except BadImageError:
            out.append(Sample(str(f)))  # kept, so the bad-file check names it
            continue
        refs = _dicom_refs(f, info)
        if info.frames > 1 or refs[0].study is None:  # frames, or a file outside any series
            out += refs
        else:
            series.setdefault(refs[0].study, []).append((f, info))
    for study, items in series.items():
        out += [Sample(str(p), study=study) for p in order_series([p for p, _ in items], [i for _, i in items])]
    return out


def expand_inputs(paths: Iterable[str | Path], options: ReadOptions | None = None) -> list[Sample]:
    """Files and folders as given by a user, as slices with their studies.

    A folder is searched recursively; the DICOM files in it form series (one study each), in
    slice order; each NIfTI volume or multi-frame DICOM is a study of its slices.

    Raises:
        BonetumorError: a path that does not exist, or a folder with no image files.
    """
    out: list[Sample] = []
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


def expand_volumes(samples: Sequence[Sample], options: ReadOptions | None = None) -> list[Sample]:
    """Each volume (NIfTI, multi-frame DICOM) as its non-empty slices; single DICOM files get
    their series as study. 2-D images, and samples already expanded (a manifest's series
    folders), pass unchanged."""
    out: list[Sample] = []
    for s in samples:
        if s.frame is not None or s.study is not None or image_kind(s.path) not in ("nifti", "dicom"):
            out.append(s)
            continue
        for x in expand_file(s.path, options):
            out.append(replace(s, frame=x.frame, study=s.study or x.study))
    return out
