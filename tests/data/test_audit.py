import csv
import json
import shutil

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import KNeighborsClassifier

from bonetumor.data.audit import (
    audit,
    leakage_summary,
    memorisation_baseline,
    run_audit,
    scan_file,
)
from bonetumor.data.layouts import discover
from bonetumor.data.synth import create_synthetic_dataset


def _rows(manifest):
    return list(csv.DictReader(open(manifest)))


def _write_manifest(manifest, rows):
    with open(manifest, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture()
def clean(tmp_path):
    return create_synthetic_dataset(tmp_path / "d", n_patients=12, size=48, seed=3)


def test_clean_synthetic_data_has_no_leakage(clean):
    r = run_audit(manifest=str(clean.manifest))
    assert r["leakage"] is False and leakage_summary(r) == ""
    assert r["split_level"] == "patient" and r["n_images"] == 48
    assert all(row.get("near_copies_of_train", 0) == 0 for row in r["duplicates"].values())
    assert r["shortcuts_flagged"] == []
    assert set(r["memorisation_baseline"]) == {"valid", "test"}


def test_planted_leaks_are_counted_exactly(clean):
    root = clean.root
    rows = _rows(clean.manifest)
    train = [r for r in rows if r["split"] == "train"]
    # 1) an exact copy of a training image, renamed, in test (same label, new patient id)
    src = train[0]
    shutil.copy(root / src["path"], root / "test" / src["label"] / "copy.png")
    rows.append({**src, "path": f"test/{src['label']}/copy.png", "patient_id": "X1", "split": "test"})
    # 2) a near copy (re-encoded as JPEG, a little noise) in valid
    src2 = train[1]
    a = np.asarray(Image.open(root / src2["path"]), dtype=float)
    a = np.clip(a + np.random.default_rng(0).normal(0, 2, a.shape), 0, 255).astype(np.uint8)
    Image.fromarray(a).save(root / "valid" / src2["label"] / "near.jpg", quality=90)
    rows.append({**src2, "path": f"valid/{src2['label']}/near.jpg", "patient_id": "X2", "split": "valid"})
    # 3) a training patient's slice also listed in test
    other = [r for r in rows if r["split"] == "test" and r["patient_id"] != "X1"][0]
    other["patient_id"] = train[5]["patient_id"]
    other["label"] = train[5]["label"]
    # 4) the same file under the other label
    flip = "normal" if src["label"] == "cancer" else "cancer"
    rows.append({**src, "label": flip, "path": f"test/{src['label']}/copy.png", "patient_id": "X3", "split": "test"})
    _write_manifest(clean.manifest, rows)
    r = run_audit(manifest=str(clean.manifest), out=clean.root / "audit")
    pairs = _rows(clean.root / "audit" / "duplicates.csv")
    exact = [p for p in pairs if p["kind"] == "exact"]
    assert len(exact) == 2 and all(p["file_a"].endswith(src["path"]) and p["split_a"] == "train" and
                                   p["file_b"].endswith("copy.png") and p["split_b"] == "test" and p["distance"] == "0"
                                   for p in exact)
    near = [p for p in pairs if p["kind"] == "near"]
    assert any(p["file_a"].endswith(src2["path"]) and p["file_b"].endswith("near.jpg") and int(p["distance"]) <= 6
               for p in near)
    assert pairs.index(exact[0]) < len([p for p in pairs if p["split_a"] != p["split_b"]])  # cross-split pairs first
    clusters = {c["file"]: c for c in _rows(clean.root / "audit" / "clusters.csv")}
    assert len(clusters) == 50 and clusters[str(root / src["path"])]["cluster"] == clusters[str(root / "test" / src["label"] / "copy.png")]["cluster"]
    assert clusters[str(root / src["path"])]["cluster_size"] == "3"  # the file, its copy listed under two labels and clusters[str(root / src["path"])]["splits_in_cluster"] == "test+train"
    assert r["copies"]["exact"] == 2 and r["copies"]["cross_split_pairs"] >= 3
    d = r["duplicates"]
    assert d["test"]["exact_copies_of_train"] == 2  # the copy, listed twice (once per label)
    assert d["test"]["near_copies_of_train"] == 2
    assert d["valid"]["exact_copies_of_train"] == 0 and d["valid"]["near_copies_of_train"] == 1
    assert d["test"]["exact_duplicates_within"] == 1
    assert r["patients_in_two_splits"]["n"] == 1
    assert r["label_conflicts"]["exact_images_with_two_labels"] == 1
    assert r["leakage"] is True
    s = leakage_summary(r)
    assert "2 of 10 test images copy or nearly copy a training image (2 exact)" in s and "1 patient(s) in two splits" in s


def test_shortcuts_are_flagged_with_their_size(tmp_path):
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        for k in range(6):
            d = tmp_path / split / "cancer"
            d.mkdir(parents=True, exist_ok=True)
            # Each image its own brightness, so that mean intensity says nothing about the class.
            Image.fromarray((rng.random((40, 48, 3)) * rng.uniform(60, 250)).astype(np.uint8)).save(d / f"c{k}.png")
            d = tmp_path / split / "normal"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray((rng.random((32, 32)) * rng.uniform(60, 250)).astype(np.uint8)).save(d / f"n{k}.jpg")
    r = audit(discover(str(tmp_path)), baseline=False)
    sc = r["shortcuts"]
    assert sc["width"]["auc"] == 1.0 and sc["width"]["flag"]
    assert sc["aspect"]["flag"] and sc["colour"]["tvd"] == 1.0 and sc["format"]["tvd"] == 1.0
    assert sc["mean_intensity"]["flag"] is False
    assert {"width", "height", "aspect", "colour", "format", "mode"} <= set(r["shortcuts_flagged"])


def test_memorisation_baseline_matches_scikit_learn():
    rng = np.random.default_rng(1)
    tr = rng.normal(size=(40, 16))
    y_tr = np.where(rng.random(40) < 0.5, "cancer", "normal")
    te = rng.normal(size=(25, 16))
    y_te = np.where(rng.random(25) < 0.5, "cancer", "normal")
    b = memorisation_baseline(tr, y_tr, te, y_te, ["normal", "cancer"])
    ref = KNeighborsClassifier(n_neighbors=1).fit(tr, y_tr).predict(te)
    assert b["accuracy"] == pytest.approx(float((ref == y_te).mean()))
    # Look-up of exact copies is perfect.
    c = memorisation_baseline(tr, y_tr, tr[:20], y_tr[:20], ["normal", "cancer"])
    assert c["accuracy"] == 1.0 and c["roc_auc"] == 1.0


def test_the_look_up_baseline_scores_a_seeded_sample_of_a_large_split():
    """Beyond ``max_held`` held-out images, a seeded random sample of that many is scored (the
    cost then grows with the training split alone), and the figure says so."""
    from types import SimpleNamespace

    from bonetumor.data.audit import split_baseline
    from bonetumor.data.studies import Sample

    rng = np.random.default_rng(2)
    def part(n):
        facts = [SimpleNamespace(thumb=rng.integers(0, 256, 64).astype(np.uint8), error=None) for _ in range(n)]
        return [Sample(path=f"{k}.png", label=str(rng.choice(["cancer", "normal"]))) for k in range(n)], facts
    train, held = part(60), part(50)
    whole = split_baseline(*train, *held, ["normal", "cancer"], max_held=50)
    assert whole["n"] == 50 and "n_held" not in whole
    some = split_baseline(*train, *held, ["normal", "cancer"], max_held=20, seed=3)
    assert some["n"] == 20 and some["n_held"] == 50
    keep = np.sort(np.random.default_rng(3).choice(50, 20, replace=False))
    ref = split_baseline(*train, [held[0][k] for k in keep], [held[1][k] for k in keep], ["normal", "cancer"])
    assert (some["accuracy"], some["roc_auc"]) == (ref["accuracy"], ref["roc_auc"])
    assert split_baseline(*train, *held, ["normal", "cancer"], max_held=20, seed=3) == some  # seeded


def test_unreadable_files_are_listed_not_fatal(clean):
    bad = clean.root / "train" / "cancer" / "P0000_s0.png"
    bad.write_bytes(b"not an image")
    f = scan_file(bad)
    assert f.error and "not an image" in f.error
    r = run_audit(manifest=str(clean.manifest))
    assert [u["path"].endswith("P0000_s0.png") for u in r["unreadable"]] == [True]


def test_audit_json_written_atomically(clean, tmp_path):
    run_audit(manifest=str(clean.manifest), out=tmp_path / "a")
    j = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert j["leakage"] is False and j["near_threshold_bits"] == 6
    assert _rows(tmp_path / "a" / "duplicates.csv") == [] and j["copies"]["pairs"] == 0
    clusters = _rows(tmp_path / "a" / "clusters.csv")
    assert len(clusters) == 48 and {c["cluster_size"] for c in clusters} == {"1"}
    assert sorted(int(c["cluster"]) for c in clusters) == list(range(1, 49))


def test_export_source_names_shared_with_train_are_leakage(tmp_path):
    from conftest import write_image

    from bonetumor.data.audit import source_name

    h = "0123456789abcdef0123456789abcdef"
    assert source_name(f"x/IMG0041_jpg.rf.{h}.jpg") == "IMG0041" and source_name("x/IMG0041.jpg") is None
    for split, seed in (("train", 1), ("valid", 2)):
        for c in ("cancer", "normal"):
            for k in range(3):  # different pixels, same source names in both splits
                write_image(tmp_path / split / c / f"{c}{k}_png.rf.{h[:-1]}{seed}.jpg", 32, seed=seed * 10 + k + len(c))
    r = audit(discover(str(tmp_path)), baseline=False)
    assert r["duplicates"]["valid"]["same_source_name_as_train"] == 6 and r["duplicates"]["valid"]["exact_copies_of_train"] == 0
    assert r["leakage"] is True and "6 valid images share their export source name" in leakage_summary(r)
