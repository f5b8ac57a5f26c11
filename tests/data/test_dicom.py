import shutil
import subprocess
import sys

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import image_kind, read_image
from bonetumor.data.studies import expand_inputs
from bonetumor.data.writers import write_dicom
from bonetumor.errors import BadImageError


def bundled(name):
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} not bundled")
    return path


def ramp(h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    return np.clip(np.linspace(0, 1, w)[None, :] * np.linspace(0.3, 1, h)[:, None] + rng.normal(0, 0.02, (h, w)), 0, 1)


def test_header_window_matches_pydicom():
    # MR_small: signed 16-bit with WindowCenter 600 / WindowWidth 1600 in its header. pydicom's
    # own VOI output spans the int16 range; ours spans [0, 1].
    path = bundled("MR_small.dcm")
    ds = pydicom.dcmread(path)
    ref = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    ours = read_image(path)[..., 0]
    assert ours.shape == (64, 64)
    np.testing.assert_allclose(ours, (ref + 32768) / 65535, atol=1e-6)


def test_rescale_and_user_window_in_hounsfield_units():
    # CT_small: intercept -1024, no window in the header. --window 40,400 is a soft-tissue window
    # in Hounsfield units, so the rescale must come first.
    path = bundled("CT_small.dcm")
    ds = pydicom.dcmread(path)
    hu = apply_modality_lut(ds.pixel_array, ds)
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ref = apply_voi_lut(hu, ds)
    assert (ref == ref.min()).any() and (ref == ref.max()).any()  # both ends of the window reached
    ours = read_image(path, options=ReadOptions(window="40,400"))[..., 0]
    np.testing.assert_allclose(ours, (ref - ref.min()) / (ref.max() - ref.min()), atol=1e-6)
    assert ours[hu < -160].max() == 0 and ours[hu > 240].min() == 1
    # Percentile window: the 1st..99th percentiles of the HU values span [0, 1].
    lo, hi = np.percentile(hu, [1, 99])
    pct = read_image(path, options=ReadOptions(window="p1,p99"))[..., 0]
    np.testing.assert_allclose(pct, np.clip((hu - lo) / (hi - lo), 0, 1), atol=1e-6)


@pytest.mark.parametrize("name", ["MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm", "MR_small_RLE.dcm"])
def test_compressed_transfer_syntaxes_decode_to_the_same_pixels(name):
    # The same MR image, losslessly compressed three ways (JPEG-LS needs pylibjpeg-libjpeg).
    np.testing.assert_array_equal(read_image(bundled(name)), read_image(bundled("MR_small.dcm")))


def test_missing_decoder_is_one_line_naming_syntax_and_package():
    # A machine without the decoders: block their imports in a fresh interpreter.
    code = (
        "import sys\n"
        "for m in ('pylibjpeg', 'libjpeg', 'openjpeg', 'gdcm', 'jpeg_ls', 'pyjpegls'):\n"
        "    sys.modules[m] = None\n"
        "from bonetumor.data.readers import read_image\n"
        "from bonetumor.errors import BadImageError\n"
        "try:\n"
        f"    read_image({bundled('MR_small_jpeg_ls_lossless.dcm')!r})\n"
        "except BadImageError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    line = out.stdout.strip()
    assert out.returncode == 0 and "\n" not in line, out.stderr
    assert "MR_small_jpeg_ls_lossless.dcm" in line and "JPEG-LS Lossless Image Compression" in line
    assert "1.2.840.10008.1.2.4.80" in line and "pip install 'bonetumor[dicom]'" in line and "pylibjpeg" in line


def test_written_file_round_trips_with_rescale_window_and_monochrome1(tmp_path):
    img = ramp()
    # 12-bit stored values, rescaled by -1024, windowed over the whole range: the image comes back.
    write_dicom(tmp_path / "a.dcm", img, intercept=-1024, window=(1023.5, 4096))
    np.testing.assert_allclose(read_image(tmp_path / "a.dcm")[..., 0], img, atol=1 / 4095 + 1e-6)
    # MONOCHROME1 stores inverted values (0 = white); the reader inverts them back.
    write_dicom(tmp_path / "m1.dcm", img, monochrome1=True, window=(2047.5, 4096))
    back = read_image(tmp_path / "m1.dcm")[..., 0]
    assert pydicom.dcmread(tmp_path / "m1.dcm").PhotometricInterpretation == "MONOCHROME1"
    np.testing.assert_allclose(back, img, atol=1 / 4095 + 1e-6)
    # 16-bit images stay 16-bit: neighbouring stored values remain distinct after reading.
    assert len(np.unique(read_image(tmp_path / "a.dcm"))) > 256


def test_multiframe_file_is_a_volume_of_its_frames(tmp_path):
    frames = np.stack([ramp(seed=k) * (0.4 + 0.2 * k) for k in range(3)])
    write_dicom(tmp_path / "mf.dcm", frames, window=(2047.5, 4096))
    refs = expand_inputs([tmp_path / "mf.dcm"])
    assert [(r.frame, r.study) for r in refs] == [(k, str(tmp_path / "mf.dcm")) for k in range(3)]
    for k in range(3):
        np.testing.assert_allclose(read_image(tmp_path / "mf.dcm", k)[..., 0], frames[k], atol=1 / 4095 + 1e-6)
    with pytest.raises(BadImageError, match="frame 3 does not exist"):
        read_image(tmp_path / "mf.dcm", 3)


def test_series_folder_is_one_study_in_slice_order(tmp_path):
    # File names run against the slice positions; the reader must order by position.
    uid = pydicom.uid.generate_uid()
    for k in range(4):
        write_dicom(tmp_path / "series" / f"IM{9 - k}.dcm", ramp(seed=k), series_uid=uid, instance=k + 1, position=-5.0 * k)
    write_dicom(tmp_path / "series" / "other.dcm", ramp(seed=9), position=0)  # another series in the same folder
    refs = expand_inputs([tmp_path / "series"])
    studies = {r.study for r in refs}
    assert len(studies) == 2
    ordered = [r.path.rsplit("/", 1)[-1] for r in refs if r.study.endswith(uid)]
    assert ordered == ["IM6.dcm", "IM7.dcm", "IM8.dcm", "IM9.dcm"]  # positions -15, -10, -5, 0


def test_extensionless_dicom_is_recognised(tmp_path):
    shutil.copy(bundled("MR_small.dcm"), tmp_path / "IM000123")
    (tmp_path / "README").write_text("not an image")
    assert image_kind(tmp_path / "IM000123") == "dicom" and image_kind(tmp_path / "README") is None
    assert read_image(tmp_path / "IM000123").shape == (64, 64, 1)


@pytest.mark.parametrize("name, problem", [
    ("test-SR.dcm", r"holds no image \(Comprehensive SR Storage\)"),
    ("rtplan.dcm", r"holds no image \(RT Plan Storage\)"),
    ("MR_truncated.dcm", "truncated or corrupt DICOM pixel data"),
])
def test_non_image_and_truncated_dicom(name, problem):
    with pytest.raises(BadImageError, match=problem) as e:
        read_image(bundled(name))
    assert name in str(e.value) and "\n" not in str(e.value)


def test_text_and_truncated_header_named_dcm(tmp_path):
    (tmp_path / "notes.dcm").write_text("patient notes, not an image\n" * 20)
    with pytest.raises(BadImageError, match="notes.dcm: not a DICOM file"):
        read_image(tmp_path / "notes.dcm")
    data = open(bundled("CT_small.dcm"), "rb").read()
    (tmp_path / "cut.dcm").write_bytes(data[:300])  # cut inside the header
    with pytest.raises(BadImageError, match="cut.dcm: (truncated or corrupt|DICOM file holds no image)"):
        read_image(tmp_path / "cut.dcm")


def test_voi_lut_sequence_is_applied(tmp_path):
    # A non-linear VOI LUT (square root, 8-bit output) in the header, as some radiographs carry.
    img = ramp()
    write_dicom(tmp_path / "lut.dcm", img, window=(100, 200))
    ds = pydicom.dcmread(tmp_path / "lut.dcm")
    item = pydicom.Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    lut = np.round(np.sqrt(np.arange(4096) / 4095) * 255).astype(np.uint16)
    item.add_new(0x00283006, "US", lut.tolist())  # LUT Data, explicitly as unsigned shorts
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "lut.dcm")
    stored = pydicom.dcmread(tmp_path / "lut.dcm").pixel_array
    ours = read_image(tmp_path / "lut.dcm")[..., 0]
    assert stored.max() > 256  # entries past 256: where pydicom 3.0's own lookup wraps
    np.testing.assert_allclose(ours, lut[stored] / 255, atol=1e-6)  # the LUT wins over the window
