"""--split-by: copies of one image, a patient's images and a volume's slices share a split; the
audit of the splits made then finds no copy across them."""

import json
import shutil
from collections import defaultdict

import numpy as np
import pytest
from conftest import tiny_config
from PIL import Image
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.data.audit import run_audit, scan
from bonetumor.data.grouping import apply_split_by, copy_groups, cross_split_copies
from bonetumor.data.layouts import discover
from bonetumor.data.splits import assign_folds, assign_splits
from bonetumor.data.studies import Sample
from bonetumor.train import fit

H = "0123456789abcdef0123456789abcdef"


@pytest.fixture()
def leaky(tmp_path, tiny_data):
    """tiny_data in folders, with copies of training images planted in valid and test: two exact,
    one re-encoded as JPEG (near), and two exports of one source file (same source)."""
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "manifest.csv").unlink()
    train_cancer = sorted((data / "train" / "cancer").glob("*.png"))
    train_normal = sorted((data / "train" / "normal").glob("*.png"))
    shutil.copy(train_cancer[0], data / "valid" / "cancer" / "copy_a.png")
    shutil.copy(train_normal[0], data / "test" / "normal" / "copy_b.png")
    Image.open(train_cancer[1]).save(data / "test" / "cancer" / "reencoded.jpg", quality=95)
    shutil.copy(train_normal[1], data / "train" / "normal" / f"knee_png.rf.{H}.jpg")
    shutil.copy(train_normal[2], data / "valid" / "normal" / f"knee_png.rf.{H[::-1]}.jpg")
    return data


def test_copies_patients_and_volumes_are_linked_and_nothing_else(leaky):
    samples = discover(str(leaky)).samples
    groups = copy_groups(samples, scan(samples, verbose=False))
    name = {s.path.split("/")[-1]: g for s, g in zip(samples, groups)}
    train = {s.path.split("/")[-1]: g for s, g in zip(samples, groups) if s.split == "train"}
    firsts = sorted(n for n in train if n.startswith("P"))
    assert name["copy_a.png"] in train.values() and name["copy_b.png"] in train.values()
    assert name["reencoded.jpg"] in train.values()
    assert name[f"knee_png.rf.{H}.jpg"] == name[f"knee_png.rf.{H[::-1]}.jpg"]
    # 6 copy pairs among 53 images (the valid export is also an exact copy of a training image),
    # each joining two groups: 47 groups, every other image its own
    assert len(set(groups)) == len(samples) - 6 and len(firsts) > 0


def test_a_patients_images_and_a_volumes_slices_are_one_group(tmp_path):
    from dataclasses import dataclass

    @dataclass
    class Facts:  # distinct images: no copy links, only patient and volume ones
        sha256: str
        phash: int
        thumb: np.ndarray
        error: None = None

    samples = [Sample(path="v.nii", label="cancer", frame=k, study="v") for k in range(3)]
    samples += [Sample(path=f"p{k}.png", label="normal", patient_id="P1") for k in range(2)]
    samples += [Sample(path="q.png", label="normal", patient_id="P2")]
    rng = np.random.default_rng(0)
    facts = [Facts(str(k), int(rng.integers(2**62)), rng.random(1024).astype(np.float32)) for k in range(6)]
    g = copy_groups(samples, facts)
    assert g[0] == g[1] == g[2] and g[3] == g[4] and len({g[0], g[3], g[5]}) == 3


def test_a_source_of_both_classes_stays_in_one_split_and_a_one_class_source_does_not():
    from dataclasses import dataclass

    @dataclass
    class Facts:  # distinct images: no copy links
        sha256: str
        phash: int
        thumb: np.ndarray
        error: None = None

    rng = np.random.default_rng(1)
    samples = [Sample(path=f"site{site}_{k:03d}.png", label=("cancer", "normal")[k % 2])
               for site in "ABCDEF" for k in range(40)]  # six hospitals' exports, both classes in each
    samples += [Sample(path=f"IMG{k:07d}.jpg", label="normal") for k in range(60)]  # one class: the source is the class
    samples += [Sample(path=f"bone-cancer_{k}.jpg", label="cancer") for k in range(60)]
    samples += [Sample(path=f"scan{k}x.png", label=("cancer", "normal")[k % 2]) for k in range(4)]  # too rare to be a source
    facts = [Facts(str(k), int(rng.integers(2**62)), rng.random(1024).astype(np.float32)) for k in range(len(samples))]
    groups = copy_groups(samples, facts)
    by_name = defaultdict(set)
    for s, g in zip(samples, groups):
        by_name[s.path[:5]].add(g)
    assert all(len(by_name[f"site{site}"]) == 1 for site in "ABCDEF")
    assert len(set.union(*(by_name[f"site{site}"] for site in "ABCDEF"))) == 6
    assert len(by_name["IMG00"]) == 60 and len(by_name["bone-"]) == 60  # each image its own group
    assert len({g for s, g in zip(samples, groups) if s.path.startswith("scan")}) == 4
    split = assign_splits(apply_split_by(samples, "cluster", facts), 0.15, 0.15, 0)
    where = defaultdict(set)
    for s in split:
        where[s.path[:5]].add(s.split)
    assert all(len(where[f"site{site}"]) == 1 for site in "ABCDEF")
    counts = {(s.split, s.label) for s in split}
    assert counts == {(sp, c) for sp in ("train", "valid", "test") for c in ("cancer", "normal")}  # still stratified
    # a naming scheme of half the images or more is not a source: no such links in the tiny data
    uniform = [Sample(path=f"P{k:04d}_s0.png", label=("cancer", "normal")[k % 2]) for k in range(40)]
    assert len(set(copy_groups(uniform, facts[:40]))) == 40


def test_cluster_splits_leave_no_copy_across_splits(leaky):
    given = run_audit(str(leaky), baseline=False)
    assert given["leakage"] and given["copies"]["cross_split_pairs"] == 5
    r = run_audit(str(leaky), baseline=False, split_by="cluster")
    assert r["copies"]["pairs"] == 6 and r["copies"]["cross_split_pairs"] == 0 and not r["leakage"]
    assert r["split_level"] == "cluster"
    assert all(row.get("near_copies_of_train", 0) == 0 and row.get("same_source_name_as_train", 0) == 0
               for row in r["duplicates"].values())
    counts = defaultdict(set)
    samples = discover(str(leaky)).samples
    split = assign_splits(apply_split_by(samples, "cluster", scan(samples, verbose=False)), 0.15, 0.15, 42)
    for s in split:
        counts[s.split].add(s.label)
    assert all(counts[sp] == {"cancer", "normal"} for sp in ("train", "valid", "test"))  # still stratified
    assert cross_split_copies(split, [s.group for s in split]) == 0


def test_patient_splits_ignore_the_given_folders():
    samples = [Sample(path=f"{k}.png", label=("normal", "cancer")[k % 2], patient_id=f"P{k // 4}", split="train")
               for k in range(80)]
    out = assign_splits(apply_split_by(samples, "patient"), 0.2, 0.2, 0)
    by_patient = defaultdict(set)
    for s in out:
        by_patient[s.patient_id].add(s.split)
    assert {s.split for s in out} == {"train", "valid", "test"} and all(len(v) == 1 for v in by_patient.values())
    assert [s.split for s in apply_split_by(samples, "given")] == ["train"] * 80


def test_cross_validation_folds_keep_each_cluster_whole(leaky):
    samples = discover(str(leaky)).samples
    pool = apply_split_by(samples, "cluster", scan(samples, verbose=False))
    fold = assign_folds(pool, 3, 0)
    by_group = defaultdict(set)
    for s, f in zip(pool, fold):
        by_group[s.group].add(int(f))
    assert all(len(v) == 1 for v in by_group.values()) and sorted(set(fold.tolist())) == [0, 1, 2]


def test_training_with_split_by_cluster_records_it_and_its_audit_is_clean(tmp_path, leaky):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        fit(tiny_config(leaky, epochs=1, split_by="cluster"), tmp_path / "r", verbose=False)
    assert not [w for w in seen if "leakage" in str(w.message)]
    with pytest.warns(Warning, match="leakage in the data"):  # the same data under its given splits
        fit(tiny_config(leaky, epochs=1), tmp_path / "given", verbose=False)
    audit = json.loads((tmp_path / "r" / "audit.json").read_text())
    data = json.loads((tmp_path / "r" / "data.json").read_text())
    assert audit["copies"]["cross_split_pairs"] == 0 and not audit["leakage"] and data["split_level"] == "cluster"
    # evaluate takes the same splits: from the run's splits.csv (matched by paths relative to the
    # data folder, so a moved folder still matches), or, without the record, grouped again
    import csv

    from bonetumor.evaluate.run import evaluate

    recorded = [row for row in csv.DictReader(open(tmp_path / "r" / "splits.csv")) if row["split"] == "test"]
    m = evaluate(tmp_path / "r" / "best.pt", str(leaky), tmp_path / "e", device="cpu", baseline=False, n_boot=10)
    assert m["n"] == len(recorded)
    shutil.copytree(leaky, tmp_path / "moved")
    shutil.rmtree(leaky)
    moved = evaluate(tmp_path / "r" / "best.pt", str(tmp_path / "moved"), tmp_path / "e2", device="cpu", baseline=False,
                     n_boot=10)
    assert moved["n"] == len(recorded) and moved["roc_auc"]["value"] == m["roc_auc"]["value"]
    (tmp_path / "r" / "splits.csv").unlink()
    again = evaluate(tmp_path / "r" / "best.pt", str(tmp_path / "moved"), tmp_path / "e3", device="cpu", baseline=False,
                     n_boot=10)
    assert again["n"] == len(recorded) and again["roc_auc"]["value"] == m["roc_auc"]["value"]
    r = CliRunner().invoke(app, ["train", str(tmp_path / "moved"), "--out", str(tmp_path / "bad"), "--split-by", "nearest"])
    assert r.exit_code == 2 and "split" in r.output and "Traceback" not in r.output
    assert np.isfinite(json.loads((tmp_path / "r" / "operating_point.json").read_text()).get("threshold", 0.5))


def test_audit_takes_other_class_names_with_a_positive_class(tmp_path, tiny_data):
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "manifest.csv").unlink()
    for split in ("train", "valid", "test"):
        (data / split / "cancer").rename(data / split / "malignant")
        (data / split / "normal").rename(data / split / "healthy")
    refused = CliRunner().invoke(app, ["audit", str(data)])
    assert refused.exit_code == 2 and "pass --positive-class NAME" in refused.output
    r = CliRunner().invoke(app, ["audit", str(data), "--positive-class", "malignant", "--split-by", "cluster"])
    assert r.exit_code == 0 and "no leakage found" in r.output and "Traceback" not in r.output
