"""What an upload is, from its bytes alone (its name is never trusted, nor used as a path)."""

from __future__ import annotations

import gzip
import struct
import zlib

# Suffix the upload is saved under (a fixed name in a private temporary folder), by content.
SUFFIXES = {"png": ".png", "jpeg": ".jpg", "tiff": ".tif", "dicom": ".dcm", "nifti": ".nii", "nifti-gz": ".nii.gz"}
ACCEPTED = "PNG, JPEG, TIFF, DICOM (Part 10) or NIfTI-1/2 (.nii, .nii.gz)"


def _nifti_header(head: bytes) -> bool:
    """NIfTI-1 (sizeof_hdr 348, magic n+1/ni1 at 344) or NIfTI-2 (540, magic at 4), either byte order."""
    for order in "<>":
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1"):
            return True
        if len(head) >= 12 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] in (b"n+2", b"ni2"):
            return True
    return False


def sniff(head: bytes) -> str | None:
    """The format of a file whose first bytes are ``head`` (at least 1 KB when there are that
    many): a key of ``SUFFIXES``, or None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[128:132] == b"DICM":
        return "dicom"
    if _nifti_header(head):
        return "nifti"
    if head.startswith(b"\x1f\x8b"):
        try:  # only the start: a gzip bomb is not unpacked here
            inner = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 1024)
        except (zlib.error, gzip.BadGzipFile):
            return None
        return "nifti-gz" if _nifti_header(inner) else None
    return None
