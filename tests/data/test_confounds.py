"""File names that give the label away: found, measured, and said in the audit, the training log
and the report; names that do not are not flagged."""

import json
import shutil

import numpy as np
import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.data.confounds import confound_summary, file_name_confound, name_pattern
from bonetumor.data.studies import Sample
from bonetumor.errors import ConfoundWarning
from bonetumor.train import fit


def _samples(names_and_labels, patients=False):
    return [Sample(path=f"/data/{name}", label=label, patient_id=f"P{k // 2}" if patients else None)
            for k, (name, label) in enumerate(names_and_labels)]


def test_name_patterns_collapse_digits_hashes_and_export_renaming():
    assert name_pattern("a/IMG0000123.jpg") == "IMG#"
    assert name_pattern("image-no12-normal-3.png") == "image-no#-normal-#"
    assert name_pattern("bone-cancer_train_12_jpg.rf.0123456789abcdef0123456789abcdef.jpg") == "bone-cancer_train_#"
    assert name_pattern("scan_9f86d081884c7d659a2feaa0c55ad015.dcm") == "scan_#"
    assert name_pattern("P0002_s1.png") == "P#_s#"


def test_a_planted_name_confound_is_found_with_its_patterns():
    rng = np.random.default_rng(0)
    rows = [(f"IMG{rng.integers(10**6):07d}.jpg", "normal") for _ in range(60)]
    rows += [(f"image-no{k}-normal-.png", "normal") for k in range(20)]
    rows += [(f"bone-cancer_train_{k}_{k % 3}.jpg", "cancer") for k in range(70)]
    r = file_name_confound(_samples(rows), ["normal", "cancer"])
    assert r["flag"] and r["cv_auc"] > 0.99 and r["share_in_pure_patterns"] == 1.0
    assert [(p["pattern"], p["n"], p["by_class"], p["purity"]) for p in r["patterns"]] == [
        ("bone-cancer_train_#_#", 70, {"cancer": 70}, 1.0), ("IMG#", 60, {"normal": 60}, 1.0),
        ("image-no#-normal-", 20, {"normal": 20}, 1.0)]
    line = confound_summary({"confounds": {"file_names": r}})
    assert line.startswith("class is confounded with source: file names alone predict the class (cross-validated ROC-AUC 1.00")
    assert "bone-cancer_train_#_#: 70 images, 100% cancer" in line and line.endswith("external testing is required")


def test_names_that_carry_no_label_are_not_flagged():
    rng = np.random.default_rng(1)
    rows = [(f"P{k:04d}_s{k % 4}.png", rng.choice(["normal", "cancer"])) for k in range(160)]
    r = file_name_confound(_samples(rows, patients=True), ["normal", "cancer"])
    assert not r["flag"] and 0.35 < r["cv_auc"] < 0.65 and confound_summary({"confounds": {"file_names": r}}) == ""
    assert r["patterns"][0]["pattern"] == "P#_s#" and r["patterns"][0]["purity"] < 0.6


def test_a_partial_confound_is_measured_not_just_flagged():
    # In each class 3 of 4 images carry their source's name, the fourth a neutral one. A name-only
    # classifier scores named normals low, named cancers high, neutral names in between; only
    # (neutral cancer, neutral normal) pairs are left to chance: AUC = 1 - (1 - f)^2 / 2, f = 0.75.
    rows = []
    for k in range(400):
        label = ("normal", "cancer")[k % 2]
        name = f"scan_{k}.png" if k % 8 >= 6 else (f"IMG{k}.jpg" if label == "normal" else f"bc_{k}.jpg")
        rows.append((name, label))
    f = sum(not n.startswith("scan") for n, _ in rows) / len(rows)
    r = file_name_confound(_samples(rows), ["normal", "cancer"])
    assert f == 0.75 and r["cv_auc"] == pytest.approx(1 - (1 - f) ** 2 / 2, abs=0.01) and r["flag"]


def _rename_by_source(data):
    """Each class written by its own 'export': normals IMG#######.png, cancers bone-cancer_<split>_#.png."""
    for k, f in enumerate(sorted(data.rglob("*.png"))):
        split, label = f.parent.parent.name, f.parent.name
        f.rename(f.with_name(f"IMG{k:07d}.png" if label == "normal" else f"bone-cancer_{split}_{k}.png"))
    (data / "manifest.csv").unlink()


def test_training_and_audit_and_report_say_it(tmp_path, tiny_data, tiny_run):
    from bonetumor.report import _data_section

    assert json.loads((tiny_run / "audit.json").read_text())["confounds"]["file_names"]["flag"] is False
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    _rename_by_source(data)
    with pytest.warns(ConfoundWarning, match="file names alone predict the class"):
        fit(tiny_config(data, epochs=1), tmp_path / "r", verbose=False)
    html = _data_section(tmp_path / "r", {})
    assert "Class is confounded with source" in html and "File names alone" in html
    out = CliRunner().invoke(app, ["audit", str(data)]).output
    assert "confound: class is confounded with source" in " ".join(out.split())
    assert "IMG#" in out and "bone-cancer_train_#" in out
    clean = CliRunner().invoke(app, ["audit", str(tiny_data)]).output
    assert "no confound found: neither file names nor image style" in clean
