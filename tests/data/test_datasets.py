import csv
import os

import pytest
from conftest import make_class_tree, write_image

from bonetumor.data.datasets import (
    ImageDataset,
    check_files,
    discover,
    fingerprint,
    order_classes,
)
from bonetumor.data.transforms import create_transforms
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


def test_dataset_gives_3_channel_normalised_tensors(tmp_path):
    make_class_tree(tmp_path, n=2, size=40)
    idx = discover(tmp_path)
    ds = ImageDataset(idx.samples, idx.classes, create_transforms(False, 32))
    x, y, i = ds[0]
    assert x.shape == (3, 32, 32) and y in (0, 1) and i == 0
    assert x.dtype.is_floating_point


def test_image_cache_decodes_once_and_matches_the_uncached_path(tmp_path):
    import torch

    from bonetumor.data.datasets import ImageDataset, discover
    from bonetumor.data.transforms import create_resize, create_transforms

    data = make_class_tree(tmp_path / "d", n=3, size=40)
    index = discover(str(data))
    plain = ImageDataset(index.samples, index.classes, create_transforms(False, 32))
    cached = ImageDataset(index.samples, index.classes, create_transforms(False, 32, resize=False), resize=create_resize(32))
    first = [cached[i][0] for i in range(len(cached))]
    for s in index.samples:  # the cache no longer needs the files
        os.remove(s.path)
    for i in range(len(cached)):
        assert torch.allclose(cached[i][0], first[i]) and cached[i][1] == plain.class_to_idx[index.samples[i].label]
    assert all(c.shape[0] == 1 for c in cached._cache.values()) and len(cached._cache) == 6  # grey: one channel
    data2 = make_class_tree(tmp_path / "e", n=3, size=40)
    index2 = discover(str(data2))
    plain = ImageDataset(index2.samples, index2.classes, create_transforms(False, 32))
    cached = ImageDataset(index2.samples, index2.classes, create_transforms(False, 32, resize=False), resize=create_resize(32))
    for i in range(len(plain)):
        assert torch.equal(cached[i][0], plain[i][0])
    small = ImageDataset(index2.samples, index2.classes, None, resize=create_resize(32), cache_mb=3 * 32 * 32 * 4 / 2**20)
    assert all(small[i][0].shape == (3, 32, 32) for i in range(len(small))) and len(small._cache) == 3  # budget kept


def test_training_with_the_image_cache_is_seeded(tmp_path):
    from conftest import tiny_config

    from bonetumor import fit
    from bonetumor.data.synth import create_synthetic_dataset

    root = create_synthetic_dataset(tmp_path / "d", n_patients=8, size=32, seed=2).root
    a = fit(tiny_config(root, cache_images=True, epochs=2), tmp_path / "a", verbose=False)
    b = fit(tiny_config(root, cache_images=True, epochs=2), tmp_path / "b", verbose=False)
    c = fit(tiny_config(root, cache_images=False, epochs=2), tmp_path / "c", verbose=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) == strip(c.history)  # the cache changes the speed, not the numbers
