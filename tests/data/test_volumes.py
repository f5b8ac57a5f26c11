import gzip

import nibabel as nib
import numpy as np
import pytest

from bonetumor.data.layouts import discover
from bonetumor.data.nifti import nonempty_slices
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import read_image
from bonetumor.data.splits import assign_splits
from bonetumor.data.studies import expand_inputs
from bonetumor.data.synth import create_synthetic_dataset
from bonetumor.data.writers import write_nifti
from bonetumor.errors import BadImageError


def images(n=3, h=36, w=44):
    rng = np.random.default_rng(1)
    return [np.clip(rng.random((h, w)) * (0.5 + 0.2 * k), 0, 1) for k in range(n)]


def test_slices_come_back_and_empty_ones_are_skipped(tmp_path):
    imgs = images()
    write_nifti(tmp_path / "v.nii.gz", imgs, empty_ends=2, scale=1000)
    assert nonempty_slices(tmp_path / "v.nii.gz", 2) == [2, 3, 4]
    # Window 500.5,1001 maps the stored 0..1000 exactly onto 0..1 (DICOM's linear formula).
    for k, img in zip((2, 3, 4), imgs):
        got = read_image(tmp_path / "v.nii.gz", k, ReadOptions(window="500.5,1001"))[..., 0]
        assert got.shape == img.shape
        np.testing.assert_allclose(got, img, atol=1e-5)


def test_default_window_is_the_volume_percentiles(tmp_path):
    imgs = images()
    write_nifti(tmp_path / "v.nii", imgs, empty_ends=1, scale=700)
    vol = nib.load(tmp_path / "v.nii").get_fdata()
    lo, hi = np.percentile(vol, [0.5, 99.5])  # over the whole volume, padding included
    got = read_image(tmp_path / "v.nii", 2)[..., 0]
    np.testing.assert_allclose(got, np.clip((np.rot90(vol[:, :, 2]) - lo) / (hi - lo), 0, 1), atol=1e-5)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slice_axis_takes_slices_across_that_axis(tmp_path, axis):
    rng = np.random.default_rng(axis)
    vol = rng.random((5, 6, 7)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "r.nii.gz")
    refs = expand_inputs([tmp_path / "r.nii.gz"], ReadOptions(slice_axis=axis))
    assert [r.frame for r in refs] == list(range(vol.shape[axis]))
    opts = ReadOptions(window="p0,p100", slice_axis=axis)
    got = read_image(tmp_path / "r.nii.gz", 1, opts)[..., 0]
    want = np.rot90(np.take(vol, 1, axis=axis))
    np.testing.assert_allclose(got, (want - vol.min()) / (vol.max() - vol.min()), atol=1e-5)


def test_nan_inf_truncated_and_4d_volumes_are_named(tmp_path):
    vol = np.ones((8, 8, 3), np.float32)
    vol[2, 3, 1] = np.nan
    vol[4, 4, 2] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "nan.nii.gz")
    with pytest.raises(BadImageError, match=r"nan.nii.gz: NIfTI volume holds 2 NaN or infinite voxels"):
        read_image(tmp_path / "nan.nii.gz", 0)
    write_nifti(tmp_path / "ok.nii.gz", images())
    data = gzip.decompress((tmp_path / "ok.nii.gz").read_bytes())
    (tmp_path / "cut.nii.gz").write_bytes(gzip.compress(data[: len(data) // 2]))
    with pytest.raises(BadImageError, match="cut.nii.gz: truncated or corrupt NIfTI"):
        read_image(tmp_path / "cut.nii.gz", 0)
    nib.save(nib.Nifti1Image(np.ones((4, 4, 4, 2), np.float32), np.eye(4)), tmp_path / "t.nii")
    with pytest.raises(BadImageError, match=r"t.nii: NIfTI of shape \(4, 4, 4, 2\)"):
        read_image(tmp_path / "t.nii", 0)


def test_volume_data_set_splits_by_patient_and_keeps_slices_together(tmp_path):
    r = create_synthetic_dataset(tmp_path / "d", n_patients=12, size=32, slices_per_patient=3, fmt="nifti")
    index = discover(manifest=str(r.manifest))
    assert len(index.samples) == 36 and index.patient_level  # 12 volumes x 3 non-empty slices (ends skipped)
    assert {s.frame for s in index.samples} == {1, 2, 3}
    # Without patient ids, the tool's own split still keeps each volume's slices in one split.
    index = discover(str(tmp_path / "d" / "train"))
    split = assign_splits([s for s in index.samples], 0.3, 0.0, seed=0)
    by_volume = {}
    for s in split:
        by_volume.setdefault(s.path, set()).add(s.split)
    assert len(by_volume) == 8 and all(len(v) == 1 for v in by_volume.values())
    assert {next(iter(v)) for v in by_volume.values()} == {"train", "valid"}


def test_manifest_of_volumes_without_splits_is_split_by_patient(tmp_path):
    import csv

    from conftest import tiny_config

    from bonetumor.train.setup import prepare_data

    r = create_synthetic_dataset(tmp_path / "d", n_patients=20, size=32, slices_per_patient=3, fmt="nifti")
    rows = list(csv.DictReader(open(r.manifest)))
    with open(tmp_path / "d" / "volumes.csv", "w", newline="") as f:  # path,label,patient_id only
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        w.writerows([row["path"], row["label"], row["patient_id"]] for row in rows)
    index = prepare_data(tiny_config(None, manifest=str(tmp_path / "d" / "volumes.csv")))
    assert len(index.samples) == 60 and index.patient_level
    splits = {}
    for s in index.samples:
        splits.setdefault(s.patient_id, set()).add(s.split)
    assert len(splits) == 20 and all(len(v) == 1 for v in splits.values())
    assert {next(iter(v)) for v in splits.values()} == {"train", "valid", "test"}


def test_a_volume_above_the_voxel_limit_is_refused_from_its_header(tmp_path, monkeypatch):
    from bonetumor.data import nifti as volumes

    path = write_nifti(tmp_path / "v.nii.gz", images(4, 20, 30))
    monkeypatch.setattr(volumes, "MAX_VOXELS", 1000)
    monkeypatch.setattr(volumes.np, "asarray", lambda *a, **k: pytest.fail("voxels were read"))
    with pytest.raises(BadImageError, match=r"v.nii.gz: NIfTI volume of shape \(\d+, \d+, 4\) holds 2,400 voxels .* "
                                            r"above the limit of 1,000"):
        volumes.load_volume(path)
