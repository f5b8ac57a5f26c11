"""Prediction on images, DICOM series and NIfTI volumes; one score per study."""

import csv
import json

import numpy as np
import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.data.synth import create_synthetic_dataset
from bonetumor.errors import BonetumorError
from bonetumor.explain.run import explain
from bonetumor.predict import (
    aggregate_scores,
    parse_aggregate,
    predict,
    predict_studies,
)
from bonetumor.train import fit

runner = CliRunner()


@pytest.fixture(scope="module", params=["dicom", "nifti"])
def volume_run(request, tmp_path_factory):
    """A tiny model trained from a manifest of DICOM series or NIfTI volumes (path,label,patient_id,split)."""
    root = tmp_path_factory.mktemp(request.param)
    r = create_synthetic_dataset(root / "d", n_patients=12, size=32, slices_per_patient=4, seed=5, fmt=request.param)
    fit(tiny_config(None, manifest=str(r.manifest), epochs=1), root / "run", verbose=False)
    return request.param, root


def test_aggregates_match_numpy():
    s = np.array([0.1, 0.9, 0.4, 0.7, 0.2])
    assert aggregate_scores(s, "max") == pytest.approx(0.9)
    assert aggregate_scores(s, "mean") == pytest.approx(s.mean())
    assert aggregate_scores(s, "topk:2") == pytest.approx(0.8)
    assert aggregate_scores(s, "topk:9") == pytest.approx(s.mean())  # k above the slice count: all of them
    multi = np.array([[0.2, 0.8], [0.6, 0.4], [0.1, 0.9]])
    np.testing.assert_allclose(aggregate_scores(multi, "topk:2"), [0.15, 0.85])
    for bad in ("median", "topk:0", "topk:x"):
        with pytest.raises(BonetumorError, match="use max, mean or topk:K"):
            parse_aggregate(bad)


def test_training_from_volumes_records_slices_and_studies(volume_run):
    fmt, root = volume_run
    rows = list(csv.DictReader(open(root / "run" / "splits.csv")))
    assert len(rows) == 48  # 12 patients x 4 slices (the NIfTI volumes' empty end slices skipped)
    per_patient = {}
    for r in rows:
        per_patient.setdefault(r["patient_id"], set()).add(r["split"])
        assert r["study"]
    assert len(per_patient) == 12 and all(len(v) == 1 for v in per_patient.values())
    if fmt == "nifti":
        assert {r["slice"] for r in rows} == {"1", "2", "3", "4"}
    data = json.loads((root / "run" / "data.json").read_text())
    assert data["split_level"] == "patient" and data["layout"] == "manifest"


def test_predict_gives_slices_and_one_score_per_study(volume_run):
    fmt, root = volume_run
    test_dir = root / "d" / "test"
    rows, studies = predict_studies(root / "run" / "best.pt", [test_dir], "topk:2")
    assert len(rows) == 8 and len(studies) == 2  # two test patients, four slices each
    for st in studies:
        mine = sorted((r["probability"] for r in rows if r["study"] == st["study"]), reverse=True)
        assert st["n_slices"] == 4 and st["probability"] == pytest.approx(np.mean(mine[:2]), abs=1e-6)
        assert st["label"] in ("cancer", "normal")
    assert predict(root / "run" / "best.pt", [test_dir]) == rows


def test_predict_cli_writes_tables(volume_run, tmp_path):
    fmt, root = volume_run
    r = runner.invoke(app, ["predict", str(root / "run" / "best.pt"), str(root / "d" / "test"), "--aggregate", "max",
                            "--out", str(tmp_path / "p")])
    assert r.exit_code == 0, r.output
    assert "studies (score = max" in r.output
    studies = list(csv.DictReader(open(tmp_path / "p" / "studies.csv")))
    slices = list(csv.DictReader(open(tmp_path / "p" / "predictions.csv")))
    assert len(studies) == 2 and len(slices) == 8
    for st in studies:
        mine = [float(s["probability"]) for s in slices if s["study"] == st["study"]]
        assert float(st["probability"]) == pytest.approx(max(mine), abs=1e-6)


def test_explain_maps_the_top_slices_of_each_study(volume_run, tmp_path):
    fmt, root = volume_run
    res = explain(root / "run" / "best.pt", [root / "d" / "test"], tmp_path / "x", top_slices=2, faithfulness_samples=0)
    rows, _ = predict_studies(root / "run" / "best.pt", [root / "d" / "test"], "max")
    assert len(res.rows) == 4  # 2 studies x 2 slices
    for study in {r["study"] for r in rows}:
        best = sorted((r for r in rows if r["study"] == study), key=lambda r: -r["probability"])[:2]
        want = {(r["path"], r["slice"]) for r in best}
        assert {(r["path"], r["slice"]) for r in res.rows if r["study"] == study} == want
    assert all((tmp_path / "x" / r["map"]).is_file() and (tmp_path / "x" / r["panel"]).is_file() for r in res.rows)


@pytest.mark.slow
def test_evaluate_and_audit_read_volumes_unchanged(volume_run, tmp_path):
    fmt, root = volume_run
    manifest = root / "d" / "manifest.csv"
    r = runner.invoke(app, ["evaluate", str(root / "run" / "best.pt"), "--manifest", str(manifest), "--out", str(tmp_path / "e")])
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["n"] == 8 and m["interval"]["unit"] == "patient"
    preds = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    assert len({p["path"] for p in preds}) == 8  # slices of one volume are told apart (path#slice)
    r = runner.invoke(app, ["audit", "--manifest", str(manifest), "--out", str(tmp_path / "a")])
    assert r.exit_code == 0, r.output
    a = json.loads((tmp_path / "a" / "audit.json").read_text())
    assert a["n_images"] == 48 and not a["unreadable"] and a["patients_in_two_splits"]["n"] == 0


def test_decoding_in_worker_processes_keeps_order_and_errors(volume_run, tmp_path):
    """``workers`` processes decoding batches ahead (the GPU default) give the rows of the serial
    path in the same order; a bad file still stops the run, or gets its row with --skip-bad."""
    _, root = volume_run
    ck, test_dir = root / "run" / "best.pt", root / "d" / "test"
    serial = predict(ck, [test_dir], batch_size=1, workers=0)
    for workers in (1, 2):
        assert predict(ck, [test_dir], batch_size=1, workers=workers) == serial
    # more workers than batches (two): two processes
    assert predict(ck, [test_dir], batch_size=4, workers=5) == predict(ck, [test_dir], batch_size=4, workers=0)
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(BonetumorError, match="broken.png"):
        predict(ck, [test_dir, bad], batch_size=2, workers=2)
    rows = predict(ck, [test_dir, bad], batch_size=2, workers=2, skip_bad=True)
    # batches of 2 against batches of 1: the same to rounding (oneDNN's kernels differ with the batch size)
    assert [r["probability"] for r in rows[:-1]] == pytest.approx([r["probability"] for r in serial], abs=2e-6)
    assert rows[-1]["path"].endswith("broken.png") and rows[-1]["error"]
    with pytest.raises(BonetumorError, match="--workers"):
        predict(ck, [test_dir], workers=-1)


def test_grey_and_colour_images_in_one_batch_match_the_training_transforms(tiny_run, tmp_path):
    """predict resizes grey images as one channel and normalises on the device; the model must
    see what create_transforms (training's path) gives, colour and grey mixed in one batch."""
    import torch
    from PIL import Image

    from bonetumor.data.readers import load_tensor
    from bonetumor.data.transforms import create_transforms
    from bonetumor.model.checkpoint import load_checkpoint

    rng = np.random.default_rng(0)
    files = []
    for i, mode in enumerate(["L", "RGB", "L", "RGB", "L"]):
        shape = (40 + 3 * i, 37) if mode == "L" else (41, 50 - i, 3)
        files.append(tmp_path / f"{i}.png")
        Image.fromarray((rng.random(shape) * 255).astype(np.uint8), mode).save(files[-1])
    ck = load_checkpoint(tiny_run / "best.pt")
    tf = create_transforms(False, ck.image_size, mean=ck.mean, std=ck.std)
    with torch.inference_mode():
        x = torch.stack([tf(load_tensor(f)) for f in files]).contiguous(memory_format=torch.channels_last)
        ref = torch.sigmoid(ck.model(x)[:, 0]).numpy()
    for batch_size, workers in ((5, 0), (2, 0), (2, 2)):
        got = [r["probability"] for r in predict(tiny_run / "best.pt", files, batch_size=batch_size, workers=workers)]
        np.testing.assert_allclose(got, ref, atol=2e-6)
