"""Writing synthetic images as PNG, DICOM files and NIfTI volumes (Pillow, pydicom and nibabel do the format).

Used by ``synth --format dicom|nifti`` and the tests, so every reader path runs on files whose
true pixels are known. Values are stored the way scanners store them: 12-bit integers with a
rescale slope/intercept and a window in the header (DICOM), float volumes (NIfTI).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from bonetumor.files import atomic_path

MR_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def write_dicom(path: str | Path, img: np.ndarray, *, series_uid: str | None = None, instance: int = 1,
                position: float = 0.0, patient_id: str = "ANON", slope: float = 1.0, intercept: float = 0.0,
                window: tuple[float, float] | None = None, monochrome1: bool = False, bits: int = 12,
                modality: str = "MR", transfer_syntax: str | None = None, uid_seed: str | None = None) -> Path:
    """Write a float image in [0, 1] (H, W), or frames (N, H, W), as a 16-bit DICOM file.

    Stored value = round(img * (2**bits - 1)) (inverted for MONOCHROME1); the header's rescale
    maps it to ``value * slope + intercept`` and ``window`` (centre, width) is in those units.
    ``uid_seed`` makes the UIDs (and so the bytes) reproducible.
    """
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    a = np.clip(np.asarray(img, dtype=np.float64), 0, 1)
    if monochrome1:
        a = 1.0 - a
    stored = np.round(a * (2**bits - 1)).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_STORAGE if modality == "CT" else MR_STORAGE
    uid = (lambda tag: generate_uid(entropy_srcs=[uid_seed, tag])) if uid_seed else (lambda tag: generate_uid())
    meta.MediaStorageSOPInstanceUID = uid("sop")
    meta.TransferSyntaxUID = transfer_syntax or ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.PatientName = modality, patient_id, patient_id
    ds.StudyInstanceUID = uid("study")
    ds.SeriesInstanceUID = series_uid or uid("series")
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [0.0, 0.0, float(position)]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    ds.RescaleSlope, ds.RescaleIntercept = f"{slope:g}", f"{intercept:g}"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = f"{window[0]:g}", f"{window[1]:g}"
    ds.PixelData = stored.tobytes()
    p = Path(path)
    with atomic_path(p, fsync=False) as tmp:
        ds.save_as(tmp, enforce_file_format=True)
    return p


def write_nifti(path: str | Path, slices: Sequence[np.ndarray], empty_ends: int = 0, scale: float = 1000.0) -> Path:
    """Write 2-D float images (H, W) as one NIfTI volume, slice k along axis 2 (RAS, 1 mm voxels).

    Slices are stored rotated so that the reader's radiological view gives back the image;
    ``empty_ends`` all-zero slices are added at each end (scanners' padding), to be skipped.
    """
    import nibabel as nib

    h, w = slices[0].shape
    pad = [np.zeros((h, w))] * empty_ends
    vol = np.stack([np.rot90(np.asarray(s, dtype=np.float32) * scale, -1) for s in [*pad, *slices, *pad]], axis=2)
    p = Path(path)
    suffix = ".nii.gz" if p.name.endswith(".nii.gz") else ".nii"
    with atomic_path(p, fsync=False) as tmp:
        target = tmp.with_name(tmp.name + suffix)  # nibabel picks compression from the name
        nib.save(nib.Nifti1Image(vol.astype(np.float32), np.eye(4)), str(target))
        target.replace(tmp)
    return p


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
