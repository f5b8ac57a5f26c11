"""Declared sizes are checked against the bytes present before anything is allocated for them."""

import resource

import numpy as np
import pytest

from bonetumor.data.dicom import MAX_FRAMES, dicom_info
from bonetumor.data.readers import read_image
from bonetumor.data.studies import expand_inputs
from bonetumor.data.writers import write_dicom
from bonetumor.errors import BadImageError

pytestmark = pytest.mark.bad_input  # the bad-input corpus: counted in the README


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _declaring(path, frames, tmp_path):
    import pydicom

    write_dicom(tmp_path / "two.dcm", np.full((2, 16, 16), 0.5))
    ds = pydicom.dcmread(tmp_path / "two.dcm")
    ds.NumberOfFrames = frames
    ds.save_as(path)
    return path


@pytest.mark.parametrize("frames, says", [(1_000_000_000, "declares 1,000,000,000 frames"),
                                          (3, "declares 3 frames of at least 512 bytes each, but the file holds"),
                                          (-5, "declares -5 frames")])
def test_a_dicom_declaring_more_frames_than_its_bytes_is_refused_at_once(tmp_path, frames, says):
    bomb = _declaring(tmp_path / "bomb.dcm", frames, tmp_path)
    assert bomb.stat().st_size < 2000
    before = _peak_mb()
    for read in (lambda: dicom_info(bomb), lambda: read_image(bomb, frame=1), lambda: read_image(bomb)):
        with pytest.raises(BadImageError, match=says) as e:
            read()
        assert str(bomb) in str(e.value)
    assert len(expand_inputs([bomb])) == 1  # one entry, which the bad-file check then names
    assert _peak_mb() - before < 50  # a reference per declared frame would be gigabytes


def test_frames_the_file_does_hold_are_read(tmp_path):
    ok = _declaring(tmp_path / "ok.dcm", 2, tmp_path)
    assert dicom_info(ok).frames == 2 and len(expand_inputs([ok])) == 2
    assert MAX_FRAMES >= 10_000


def test_the_command_line_prints_no_library_warning_for_an_odd_header(tmp_path, tiny_run):
    import subprocess
    import sys

    odd = _declaring(tmp_path / "zero.dcm", 0, tmp_path)  # pydicom warns: "assuming 1 frame"
    r = subprocess.run([sys.executable, "-m", "bonetumor", "predict", str(tiny_run / "best.pt"), str(odd)],
                       capture_output=True, text=True)
    said = r.stdout + r.stderr
    assert str(odd) in said and "Warning" not in said and "site-packages" not in said, said


def _nifti(path, vol):
    import nibabel as nib

    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(path))
    return path


@pytest.mark.parametrize("window", [None, "p1,p99", "40,400"])
def test_a_slice_read_does_not_pass_over_or_copy_the_volume(tmp_path, window):
    import tracemalloc

    from bonetumor.data.nifti import forget_volumes, load_volume
    from bonetumor.data.pixels import ReadOptions

    rng = np.random.default_rng(0)
    vol = rng.random((128, 128, 96), dtype=np.float32)  # 6 MB as float32
    path = _nifti(tmp_path / "v.nii.gz", vol)
    forget_volumes()
    opts = ReadOptions(window=window)
    read_image(path, frame=0, options=opts)  # decodes the volume (and its percentiles) once
    tracemalloc.start()
    for k in range(1, 9):
        read_image(path, frame=k, options=opts)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < vol.nbytes / 8, f"{peak:,} bytes for 8 slices of a {vol.nbytes:,}-byte volume"
    if window == "p1,p99":  # still the volume's own percentiles, not the slice's
        lo, hi = np.percentile(vol, [1, 99])
        sl = np.rot90(vol[:, :, 3])
        expected = np.clip((sl - lo) / (hi - lo), 0, 1)
        assert np.abs(read_image(path, frame=3, options=opts)[..., 0] - expected).max() < 1e-5
    assert load_volume(path).percentiles(1, 99) == pytest.approx(tuple(np.percentile(vol, [1, 99])))


def test_a_volume_without_an_image_is_a_bad_file_not_an_empty_result(tmp_path, tiny_run):
    from typer.testing import CliRunner

    from bonetumor.cli import app

    zero = _nifti(tmp_path / "zero.nii.gz", np.zeros((32, 32, 8), np.float32))
    with pytest.raises(BadImageError, match="zero.nii.gz: NIfTI volume of shape .* holds no image: every voxel is 0"):
        read_image(zero)
    r = CliRunner().invoke(app, ["predict", str(tiny_run / "best.pt"), str(zero)])
    assert r.exit_code == 2 and "zero.nii.gz" in r.output and "holds no image" in r.output, r.output


@pytest.mark.parametrize("slope", [None, 2.5])
def test_the_volume_is_nibabels_closest_canonical_one(tmp_path, slope):
    """Checked and reoriented in its stored type, the volume equals nibabel's own reading."""
    import nibabel as nib

    from bonetumor.data.nifti import forget_volumes, load_volume

    vol = np.random.default_rng(0).integers(0, 1000, (20, 30, 12)).astype(np.int16)
    img = nib.Nifti1Image(vol, np.array([[0, -1, 0, 0], [0, 0, 1, 0], [-1, 0, 0, 0], [0, 0, 0, 1]], float))
    if slope:
        img.header.set_slope_inter(slope, 3.0)
    nib.save(img, str(tmp_path / "o.nii.gz"))
    forget_volumes()
    ours = load_volume(tmp_path / "o.nii.gz").vol
    theirs = nib.as_closest_canonical(nib.load(str(tmp_path / "o.nii.gz"))).get_fdata(dtype=np.float32)
    assert ours.dtype == np.float32 and ours.shape == (30, 12, 20) and np.array_equal(ours, theirs)
