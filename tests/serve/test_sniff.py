"""Uploads are recognised by their bytes."""

import gzip
import io

import numpy as np
import pytest
from PIL import Image

from bonetumor.data.writers import write_dicom, write_nifti
from bonetumor.serve.sniff import sniff


def _pil_bytes(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt,kind", [("PNG", "png"), ("JPEG", "jpeg"), ("TIFF", "tiff")])
def test_pillow_formats(fmt, kind):
    assert sniff(_pil_bytes(fmt)[:4096]) == kind


def test_dicom_and_nifti_plain_and_gzipped(tmp_path):
    img = np.random.default_rng(0).random((16, 16))
    d = write_dicom(tmp_path / "a.dcm", img)
    n = write_nifti(tmp_path / "v.nii", [img, img])
    z = write_nifti(tmp_path / "v.nii.gz", [img, img])
    assert sniff(d.read_bytes()[:4096]) == "dicom"
    assert sniff(n.read_bytes()[:4096]) == "nifti"
    assert sniff(z.read_bytes()[:4096]) == "nifti-gz"


@pytest.mark.parametrize("data", [b"", b"hello world", b"%PDF-1.7\n" + b"x" * 500, gzip.compress(b"not nifti" * 100),
                                  b"\x1f\x8b" + b"\x00" * 100, b"<html><body>png</body></html>"])
def test_anything_else_is_unknown(data):
    assert sniff(data) is None
