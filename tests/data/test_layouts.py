import csv

import pytest
from conftest import make_class_tree, write_image

from bonetumor.data.layouts import check_files, discover, fingerprint, order_classes
from bonetumor.errors import BadImageError, BonetumorError


def _labels(index, split=None):
    return sorted(s.label for s in index.samples if split is None or s.split == split)


@pytest.mark.parametrize("val_name", ["valid", "val", "validation"])
def test_split_folders(tmp_path, val_name):
    for split in ("train", val_name, "test"):
        make_class_tree(tmp_path / split, n=2)
    idx = discover(tmp_path)
    assert idx.layout == "splits"
    assert {s.split for s in idx.samples} == {"train", "valid", "test"}
    assert _labels(idx, "valid") == ["cancer", "cancer", "normal", "normal"]
    assert idx.classes == ["normal", "cancer"]  # positive class last


def test_explicit_dirs_with_the_original_folder_names(tmp_path):
    make_class_tree(tmp_path / "cancer train dataset", n=3)
    make_class_tree(tmp_path / "cancer valid dataset", n=2)
    idx = discover(train_dir=tmp_path / "cancer train dataset", val_dir=tmp_path / "cancer valid dataset")
    assert idx.layout == "dirs"
    assert len(idx.split("train")) == 6 and len(idx.split("valid")) == 4 and not idx.split("test")


def test_class_folders_without_splits(tmp_path):
    make_class_tree(tmp_path, n=5)
    (tmp_path / "cancer" / "notes.txt").write_text("not an image")
    idx = discover(tmp_path)
    assert idx.layout == "classes" and all(s.split is None for s in idx.samples)
    assert len(idx.samples) == 10 and len(idx.ignored_files) == 1


def test_manifest_with_patients_and_masks(tmp_path):
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.png")
    with open(tmp_path / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "split", "mask_path"])
        w.writerows([["img/0.png", "cancer", "A", "train", "img/0.png"], ["img/1.png", "normal", "B", "train", ""],
                     ["img/2.png", "cancer", "C", "val", ""], ["img/3.png", "normal", "D", "test", ""]])
    idx = discover(manifest=tmp_path / "m.csv")
    assert idx.layout == "manifest" and idx.patient_level
    assert [s.split for s in idx.samples] == ["train", "train", "valid", "test"]
    assert idx.samples[0].mask_path.endswith("0.png") and idx.samples[1].mask_path is None


def test_manifest_found_inside_data_folder(tiny_data):
    idx = discover(tiny_data)
    assert idx.layout == "manifest" and idx.patient_level and len(idx.samples) == 48


def test_roboflow_export(tmp_path):
    for split in ("train", "valid"):
        rows = []
        for i in range(3):
            for c in ("cancer", "normal"):
                name = f"{c}_{i}_jpg.rf.abc.jpg"
                write_image(tmp_path / split / name, mode="RGB")
                rows.append([name, "1" if c == "cancer" else "0", "0" if c == "cancer" else "1"])
        with open(tmp_path / split / "_classes.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["filename", " cancer", " normal"])
            w.writerows(rows)
    idx = discover(tmp_path)
    assert idx.layout == "roboflow" and len(idx.samples) == 12
    assert all(s.label in s.path for s in idx.samples)


def test_positive_class_when_not_named_cancer(tmp_path):
    make_class_tree(tmp_path, classes=("malignant", "benign"), n=2)
    with pytest.raises(BonetumorError, match="--positive-class"):
        discover(tmp_path)
    assert discover(tmp_path, positive_class="malignant").classes == ["benign", "malignant"]
    with pytest.raises(BonetumorError, match="not one of"):
        discover(tmp_path, positive_class="tumour")


def test_three_classes_are_kept_sorted():
    assert order_classes(["b", "a", "c", "a"], None) == ["a", "b", "c"]


@pytest.mark.parametrize("setup,msg", [
    ("empty_class", "holds no images"), ("single_class", "at least two classes"),
    ("missing_cols", "lacks column"), ("outside", "outside the manifest"), ("no_folder", "not found"),
])
def test_layout_errors(tmp_path, setup, msg):
    arg = {"data": tmp_path / "d"}
    if setup == "empty_class":
        make_class_tree(tmp_path / "d", classes=("normal",), n=2)
        (tmp_path / "d" / "cancer").mkdir()
    elif setup == "single_class":
        make_class_tree(tmp_path / "d", classes=("cancer",), n=2)
    elif setup in ("missing_cols", "outside"):
        (tmp_path / "d").mkdir()
        text = "file,class\na.png,cancer\n" if setup == "missing_cols" else "path,label\n../a.png,cancer\n"
        (tmp_path / "d" / "m.csv").write_text(text)
        arg = {"manifest": tmp_path / "d" / "m.csv"}
    with pytest.raises(BonetumorError, match=msg):
        discover(**arg)


def test_check_files_stops_or_skips(tmp_path):
    make_class_tree(tmp_path, n=3)
    (tmp_path / "cancer" / "broken.png").write_bytes(b"not a png")
    idx = discover(tmp_path)
    with pytest.raises(BadImageError, match="broken.png.*--skip-bad-files"):
        check_files(idx.samples, skip_bad=False)
    good, bad = check_files(idx.samples, skip_bad=True)
    assert len(good) == 6 and len(bad) == 1 and bad[0][0].endswith("broken.png")


def test_fingerprint_changes_with_content(tmp_path):
    make_class_tree(tmp_path, n=2)
    idx = discover(tmp_path)
    f1 = fingerprint(idx.samples, idx.root)
    assert f1 == fingerprint(idx.samples, idx.root)
    write_image(tmp_path / "cancer" / "img_0.png", value=7)
    assert fingerprint(idx.samples, idx.root) != f1
