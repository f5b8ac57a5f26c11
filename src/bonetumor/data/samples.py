"""The one record of a 2-D image (``Sample``) and of a data set found on disk (``DatasetIndex``).

A sample is a file, or one slice of a volume or series file, with what is known about it: its
class (None for a file to predict), patient, split, lesion mask and study.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Sequence

from bonetumor.data.pixels import ReadOptions


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

    @property
    def ref(self) -> str:
        """A unique name for tables: the path, with ``#slice`` for a slice of a volume."""
        return self.path if self.frame is None else f"{self.path}#{self.frame}"


@dataclass
class DatasetIndex:
    """All samples found, the class list (binary: [negative, positive]), how they were found and
    how their pixels are read."""

    samples: list[Sample]
    classes: list[str]
    layout: str
    root: str | None = None
    patient_level: bool = False
    ignored_files: list[str] = field(default_factory=list)
    options: ReadOptions = field(default_factory=ReadOptions)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split ('train', 'valid' or 'test')."""
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}} for the record and the report."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            out.setdefault(str(s.split), {c: 0 for c in self.classes})[s.label] += 1
        return out

    @property
    def split_level(self) -> str:
        """'patient' when every sample has a patient id (splits keep patients apart), else 'image'."""
        return "patient" if self.patient_level else "image"


def with_splits(samples: Sequence[Sample], splits: Sequence[str]) -> list[Sample]:
    """Copy of samples with their split set."""
    return [replace(s, split=sp) for s, sp in zip(samples, splits)]
