"""A corpus of bad inputs: each gets a one-line error naming the file, or a counted skip; never a traceback."""

import csv
import json
import os
import shutil

import nibabel as nib
import numpy as np
import pytest
from conftest import make_class_tree, write_image
from PIL import Image
from pydicom.data import get_testdata_file
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.config import TrainConfig
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import save_checkpoint

pytestmark = pytest.mark.bad_input  # the bad-input corpus: counted in the README

runner = CliRunner()
TRAIN = ["--epochs", "1", "--image-size", "32", "--batch-size", "8", "--weights", "none", "--freeze", "none",
         "--device", "cpu", "--val-fraction", "0.25", "--test-fraction", "0.0", "--no-audit"]


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}"
    return r.exit_code, r.output, " ".join(r.output.split())  # the last: soft wraps undone


def make_corpus(d):
    """Every kind of bad file, named for what is wrong with it; returns {name: expected problem}."""
    d.mkdir(parents=True, exist_ok=True)
    write_image(d / "good.png", 24)
    png = (d / "good.png").read_bytes()
    Image.fromarray(np.full((24, 24), 128, np.uint8)).save(d / "good.jpg", quality=90)
    jpg = (d / "good.jpg").read_bytes()
    ct = open(get_testdata_file("CT_small.dcm"), "rb").read()
    (d / "zero_bytes.png").write_bytes(b"")
    (d / "truncated.png").write_bytes(png[: len(png) // 2])
    (d / "truncated.jpg").write_bytes(jpg[: len(jpg) // 2])
    (d / "truncated.dcm").write_bytes(ct[: len(ct) - 4000])
    (d / "text_saved_as.png").write_text("this is a text file\n" * 10)
    (d / "jpeg_named_as.dcm").write_bytes(jpg)
    shutil.copy(get_testdata_file("test-SR.dcm"), d / "structured_report.dcm")
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(d / "one_pixel.png")
    vol = np.ones((8, 8, 2), np.float32)
    vol[1, 1, 0] = np.nan
    nib.save(nib.Nifti1Image(vol, np.eye(4)), d / "nan_voxel.nii.gz")
    vol[1, 1, 0] = np.inf
    nib.save(nib.Nifti1Image(vol, np.eye(4)), d / "inf_voxel.nii")
    nib.save(nib.Nifti1Image(np.ones((8, 8, 2), np.float32), np.eye(4)), d / "bad_header.nii")
    raw = bytearray((d / "bad_header.nii").read_bytes())
    raw[70:72] = (0).to_bytes(2, "little")  # datatype code 0: nibabel refuses the header
    (d / "bad_header.nii").write_bytes(bytes(raw))
    os.symlink("symlink_loop.png", d / "symlink_loop.png")
    (d / "good.png").unlink()
    (d / "good.jpg").unlink()
    return {
        "zero_bytes.png": "empty file (0 bytes)",
        "truncated.png": "cannot decode image",
        "truncated.jpg": "cannot decode image",
        "truncated.dcm": "truncated or corrupt DICOM pixel data",
        "text_saved_as.png": "not an image file (unrecognised format)",
        "jpeg_named_as.dcm": "not a DICOM file",
        "structured_report.dcm": "DICOM file holds no image (Comprehensive SR Storage)",
        "one_pixel.png": "image is too small (1x1 pixels)",
        "nan_voxel.nii.gz": "NIfTI volume holds 1 NaN or infinite voxels",
        "inf_voxel.nii": "NIfTI volume holds 1 NaN or infinite voxels",
        "bad_header.nii": "truncated or corrupt NIfTI file (data code 0 not supported)",
        "symlink_loop.png": "symbolic link loop",
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    expected = make_corpus(root / "bad")
    save_checkpoint(root / "model.pt", create_model("resnet50", "none"), TrainConfig(data="x", weights="none", image_size=32),
                    ["normal", "cancer"])
    return root, expected


CASES = ["zero_bytes.png", "truncated.png", "truncated.jpg", "truncated.dcm", "text_saved_as.png", "jpeg_named_as.dcm",
         "structured_report.dcm", "one_pixel.png", "nan_voxel.nii.gz", "inf_voxel.nii", "bad_header.nii",
         "symlink_loop.png"]


@pytest.mark.parametrize("name", CASES)
def test_each_bad_file_is_one_line_naming_it(corpus, name):
    root, expected = corpus
    code, out, flat = run("predict", root / "model.pt", root / "bad" / name)
    assert code == 2 and "Traceback" not in out
    assert flat.startswith("error:") and name in flat and expected[name] in flat, out


def test_a_folder_of_bad_files_is_listed_with_skip(corpus):
    root, expected = corpus
    code, out, flat = run("predict", root / "model.pt", root / "bad", "--skip-bad-files", "--json")
    rows = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    assert code == 0 and len(rows) == len(CASES)
    for r in rows:
        name = os.path.basename(r["path"])
        assert expected[name] in r["error"]


def test_training_skips_and_counts_every_bad_file(tmp_path, corpus):
    root, expected = corpus
    data = make_class_tree(tmp_path / "d", n=8, size=24)
    for name in CASES:
        src = root / "bad" / name
        dst = data / "normal" / name
        if name == "symlink_loop.png":
            os.symlink("symlink_loop.png", dst)
        else:
            shutil.copy(src, dst)
    (data / "normal" / "notes.txt").write_text("a note left in the folder")
    code, out, flat = run("train", data, "--out", tmp_path / "r1", *TRAIN)
    assert code == 2 and "Traceback" not in out and "--skip-bad-files" in flat
    assert any(name in flat for name in CASES)
    code, out, flat = run("train", data, "--out", tmp_path / "r2", *TRAIN, "--skip-bad-files")
    assert code == 0, out
    assert f"skipped {len(CASES)} unreadable file(s)" in flat
    rows = {os.path.basename(r["path"]): r["problem"] for r in csv.DictReader(open(tmp_path / "r2" / "skipped_files.csv"))}
    assert set(rows) == set(CASES) and all(expected[n] in rows[n] for n in CASES)
    record = json.loads((tmp_path / "r2" / "data.json").read_text())
    assert record["skipped_files"] == len(CASES) and record["ignored_non_image_files"] == 1  # notes.txt


def test_unicode_and_spaces_in_paths_work(tmp_path, corpus):
    root, _ = corpus
    data = make_class_tree(tmp_path / "données osseuses ☢", n=6, size=24)
    for p in list((data / "cancer").iterdir()):
        p.rename(p.with_name(f"ïmage {p.stem} — ✓.png"))
    code, out, _ = run("train", data, "--out", tmp_path / "rün 1", *TRAIN)
    assert code == 0, out
    code, out, _ = run("predict", tmp_path / "rün 1" / "best.pt", data / "cancer", "--json")
    rows = [json.loads(x) for x in out.splitlines()]
    assert code == 0 and len(rows) == 6 and all("ïmage" in r["path"] and "probability" in r for r in rows)


def _manifest(path, header, rows):
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


@pytest.mark.parametrize("case, needle", [
    ("empty_class_folder", "empty: class folder holds no images"),
    ("single_class", "need at least two classes"),
    ("valid_split_without_positives", "the valid split holds only ['normal'] images"),
    ("manifest_missing_column", "manifest lacks column(s) label"),
    ("manifest_path_outside", "lies outside the manifest's folder"),
    ("manifest_missing_file", "missing.png: file not found"),
    ("manifest_is_a_folder", "is a folder; --manifest names a CSV file"),
    ("manifest_not_utf8", "manifest is not UTF-8 text (byte"),
    ("manifest_symlink_loop", "line 2: loop cannot be resolved"),
    ("manifest_mask_outside", "line 2, mask_path: ../../etc/passwd lies outside the manifest's folder"),
])
def test_data_set_problems(tmp_path, case, needle):
    d = make_class_tree(tmp_path / "d", n=4, size=24)
    args = [d]
    if case == "empty_class_folder":
        (d / "empty").mkdir()
    elif case == "single_class":
        shutil.rmtree(d / "cancer")
    elif case == "valid_split_without_positives":
        rows = [f"cancer/img_{i}.png,cancer,train" for i in range(4)] + \
               [f"normal/img_{i}.png,normal,{'valid' if i < 2 else 'train'}" for i in range(4)]
        args = ["--manifest", _manifest(d / "m.csv", "path,label,split", rows)]
    elif case == "manifest_missing_column":
        args = ["--manifest", _manifest(d / "m.csv", "path,patient_id", ["cancer/img_0.png,P1"])]
    elif case == "manifest_path_outside":
        args = ["--manifest", _manifest(d / "m.csv", "path,label", ["../../etc/passwd,cancer", "normal/img_0.png,normal"])]
    elif case == "manifest_missing_file":
        rows = [f"cancer/img_{i}.png,cancer" for i in range(4)] + [f"normal/img_{i}.png,normal" for i in range(4)]
        args = ["--manifest", _manifest(d / "m.csv", "path,label", [*rows, "cancer/missing.png,cancer"])]
    elif case == "manifest_is_a_folder":
        args = ["--manifest", d / "cancer"]
    elif case == "manifest_not_utf8":
        (d / "m.csv").write_bytes("path,label\ncancer/img_0.png,c\u00e1ncer\n".encode("latin-1"))
        args = ["--manifest", d / "m.csv"]
    elif case == "manifest_symlink_loop":
        os.symlink("loop", d / "loop")
        args = ["--manifest", _manifest(d / "m.csv", "path,label", ["loop,cancer", "normal/img_0.png,normal"])]
    elif case == "manifest_mask_outside":
        args = ["--manifest", _manifest(d / "m.csv", "path,label,mask_path",
                                        ["cancer/img_0.png,cancer,../../etc/passwd", "normal/img_0.png,normal,"])]
    code, out, flat = run("train", *args, "--out", tmp_path / "r", *TRAIN)
    assert code == 2 and "Traceback" not in out and needle in flat, out
    assert not (tmp_path / "r").exists()  # nothing half-made


def test_test_split_without_positives_is_evaluated_with_a_note(tmp_path, corpus):
    root, _ = corpus
    d = make_class_tree(tmp_path / "d", classes=("normal",), n=5, size=24)
    code, out, flat = run("evaluate", root / "model.pt", d, "--split", "all", "--out", tmp_path / "e")
    assert code == 0 and "Traceback" not in out
    assert "note: the all split holds no cancer images: ROC-AUC" in flat
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n_positive"] == 0 and m["specificity"]["value"] >= 0 and m["notes"]


def test_a_manifest_listing_an_image_twice_or_under_two_labels(tmp_path):
    d = make_class_tree(tmp_path / "d", n=4, size=24)
    rows = [f"cancer/img_{i}.png,cancer" for i in range(4)] + [f"normal/img_{i}.png,normal" for i in range(4)]
    twice = _manifest(d / "twice.csv", "path,label", [*rows, "cancer/img_1.png,cancer"])
    clash = _manifest(d / "clash.csv", "path,label", [*rows, "cancer/img_2.png,normal"])
    code, out, flat = run("train", "--manifest", twice, "--out", tmp_path / "r1", *TRAIN)
    assert code == 2 and "img_1.png: listed 2 times (pass --skip-bad-files" in flat, out
    code, out, flat = run("train", "--manifest", clash, "--out", tmp_path / "r2", *TRAIN)
    assert code == 2 and "img_2.png: listed under 2 labels (cancer, normal)" in flat, out
    code, out, flat = run("train", "--manifest", clash, "--out", tmp_path / "r3", *TRAIN, "--skip-bad-files")
    assert code == 0, out
    with open(tmp_path / "r3" / "skipped_files.csv") as f:
        skipped = list(csv.DictReader(f))
    assert len(skipped) == 2 and {r["problem"] for r in skipped} == {"listed under 2 labels (cancer, normal)"}
    code, out, flat = run("audit", "--manifest", twice)
    assert "1 listings repeat an image" in flat and "img_1.png: listed 2 times" in flat, out


@pytest.mark.slow
def test_a_file_name_that_is_not_utf8_goes_through_every_command(tmp_path):
    d = make_class_tree(tmp_path / "d", n=4, size=24)
    odd = os.path.join(os.fsencode(str(d / "cancer")), b"img_\xff.png")  # Latin-1 'ÿ': not UTF-8
    os.rename(d / "cancer" / "img_0.png", odd)
    code, out, _ = run("train", d, "--out", tmp_path / "r", *TRAIN)
    assert code == 0, out
    assert b"img_\xff.png" in (tmp_path / "r" / "splits.csv").read_bytes()  # the name as it is on disk
    for args in (["evaluate", tmp_path / "r" / "best.pt", d, "--split", "all", "--out", tmp_path / "e"],
                 ["predict", tmp_path / "r" / "best.pt", d, "--out", tmp_path / "p"],
                 ["explain", tmp_path / "r" / "best.pt", d / "cancer", "--out", tmp_path / "x"],
                 ["report", tmp_path / "r", "--eval", tmp_path / "e", "--explain", tmp_path / "x"]):
        code, out, _ = run(*args)
        assert code == 0, (args, out)
    assert b"img_\xff.png" in (tmp_path / "p" / "predictions.csv").read_bytes()
