import csv
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from bonetumor import evaluate, predict
from bonetumor.evaluate.metrics import compute_metrics
from bonetumor.model.checkpoint import write_checkpoint


def test_metrics_match_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    m = compute_metrics(y, p, ["normal", "cancer"], threshold=0.45, n_boot=200)
    v = {k: m[k]["value"] for k in ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity",
                                    "ppv", "npv", "f1", "brier", "ece")}
    pred = (p >= 0.45).astype(int)
    tp, fn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 1)).sum())
    tn, fp = int(((pred == 0) & (y == 0)).sum()), int(((pred == 1) & (y == 0)).sum())
    assert m["confusion_matrix"]["matrix"] == [[tn, fp], [fn, tp]]
    assert v["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert v["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert v["sensitivity"] == pytest.approx(skm.recall_score(y, pred))
    assert v["specificity"] == pytest.approx(tn / (tn + fp))
    assert v["ppv"] == pytest.approx(skm.precision_score(y, pred))
    assert v["npv"] == pytest.approx(tn / (tn + fn))
    assert v["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert v["pr_auc"] == pytest.approx(skm.average_precision_score(y, p))
    assert v["brier"] == pytest.approx(skm.brier_score_loss(y, p))
    fpr, tpr, _ = skm.roc_curve(y, p)
    assert v["roc_auc"] == pytest.approx(np.trapezoid(tpr, fpr))
    # Rank-based AUC (Mann-Whitney U), independent of scikit-learn.
    pos, neg = p[y == 1], p[y == 0]
    u = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert v["roc_auc"] == pytest.approx(u / (len(pos) * len(neg)))
    assert all(m[k]["ci_low"] <= m[k]["value"] <= m[k]["ci_high"] for k in v)


@pytest.mark.slow
def test_bootstrap_interval_agrees_with_scipy():
    from scipy import stats

    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(y * 0.35 + rng.random(400) * 0.65, 0, 1)
    m = compute_metrics(y, p, ["normal", "cancer"], n_boot=2000)
    ref = stats.bootstrap((y, p), lambda a, b: skm.roc_auc_score(a, b), paired=True, vectorized=False,
                          n_resamples=2000, method="percentile", random_state=0).confidence_interval
    assert m["roc_auc"]["ci_low"] == pytest.approx(ref.low, abs=0.01)
    assert m["roc_auc"]["ci_high"] == pytest.approx(ref.high, abs=0.01)
    assert m["interval"] == {"level": 0.95, "resamples": 2000, "unit": "image", "method": "percentile bootstrap"}


@pytest.mark.slow
def test_patients_are_resampled_whole_and_scored_per_patient():
    rng = np.random.default_rng(2)
    yp = rng.integers(0, 2, 60)
    pp = np.clip(yp * 0.3 + rng.random(60) * 0.7, 0, 1)
    # Four near-identical slices per patient: resampling images would pretend to 240 independent cases.
    y, p = np.repeat(yp, 4), np.clip(np.repeat(pp, 4) + rng.normal(0, 0.01, 240), 0, 1)
    groups = np.repeat([f"P{i}" for i in range(60)], 4)
    by_image = compute_metrics(y, p, ["normal", "cancer"], n_boot=500)
    by_patient = compute_metrics(y, p, ["normal", "cancer"], groups=groups, n_boot=500)
    w = lambda m: m["roc_auc"]["ci_high"] - m["roc_auc"]["ci_low"]  # noqa: E731
    assert by_patient["roc_auc"]["value"] == by_image["roc_auc"]["value"]
    assert w(by_patient) > 1.5 * w(by_image)
    assert by_patient["n_patients"] == 60 and by_patient["interval"]["unit"] == "patient"
    per = by_patient["per_patient"]["max"]
    assert per["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(yp, [p[groups == f"P{i}"].max() for i in range(60)]))


def test_expected_calibration_error_by_hand():
    from bonetumor.evaluate.metrics import expected_calibration_error

    # bin 0.1: confidence 0.1, observed 0.5 (weight 1/2); bin 0.9: confidence 0.9, observed 1.0 (weight 1/2)
    assert expected_calibration_error(np.array([0, 1, 1, 1]), np.array([0.1, 0.1, 0.9, 0.9])) == pytest.approx(0.25)
    assert expected_calibration_error(np.array([0, 1]), np.array([0.0, 1.0])) == 0.0


def test_auc_is_undefined_with_one_class():
    m = compute_metrics(np.ones(5, int), np.linspace(0, 1, 5), ["normal", "cancer"], n_boot=50)
    assert np.isnan(m["roc_auc"]["value"]) and m["sensitivity"]["value"] == 0.6


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    m = compute_metrics(y, p, ["a", "b", "c"], n_boot=50)
    assert m["accuracy"]["value"] == pytest.approx(5 / 6)
    assert m["f1"]["value"] == pytest.approx(skm.f1_score(y, p.argmax(1), average="macro"))
    assert m["confusion_matrix"]["matrix"][2] == [0, 1, 1]


def test_evaluate_writes_files_and_uses_every_test_image(tiny_run, tiny_data, tmp_path):
    m = evaluate(tiny_run / "best.pt", str(tiny_data), tmp_path / "e", "test")
    for name in ("metrics.json", "classification_report.txt", "predictions.csv", "roc.png", "confusion_matrix.png",
                 "pr.png", "reliability.png", "scores.png"):
        assert (tmp_path / "e" / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    test_files = sorted(str(p) for p in (tiny_data / "test").rglob("*.png"))
    assert sorted(r["path"] for r in rows) == test_files and m["n"] == len(test_files) == 8
    # metrics.json agrees with scikit-learn recomputed from predictions.csv
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    y = np.array([r["label"] == "cancer" for r in rows], int)
    p = np.array([float(r["probability"]) for r in rows])
    assert saved["roc_auc"]["value"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-5)
    assert saved["accuracy"]["value"] == pytest.approx(skm.accuracy_score(y, p >= saved["threshold"]))
    assert saved["f1"]["value"] == pytest.approx(skm.f1_score(y, p >= saved["threshold"]))
    assert saved["interval"]["unit"] == "patient" and saved["interval"]["resamples"] == 1000
    assert set(saved["per_patient"]) == {"max", "mean"} and saved["n_patients"] == 2
    thr = saved["threshold"]  # chosen on validation at training time, applied unchanged here
    assert all(r["prediction"] == ("cancer" if float(r["probability"]) >= thr else "normal") for r in rows)
    # predict gives the same probabilities as evaluate
    pr = {r["path"]: r["probability"] for r in predict(tiny_run / "best.pt", [tiny_data / "test"], device="cpu")}
    assert all(abs(pr[r["path"]] - float(r["probability"])) < 1e-5 for r in rows)
    # the 1-NN look-up baseline sits beside the model's figures, on the same images
    b = saved["memorisation_baseline"]
    assert b["n"] == 8 and 0 <= b["accuracy"] <= 1 and 0 <= b["roc_auc"] <= 1


@pytest.mark.slow
def test_evaluate_other_split(tiny_run, tiny_data, tmp_path):
    m = evaluate(tiny_run / "best.pt", str(tiny_data), tmp_path / "v", "val")
    assert m["split"] == "valid" and m["n"] == 8


def test_a_checkpoint_saved_before_training_chose_its_threshold_says_so(tiny_run, tiny_data, tmp_path):
    """A best.pt from a run that was stopped holds the default threshold: evaluate records it,
    the command warns, the report says it; a finished run's is chosen on validation."""
    import shutil

    import torch
    from typer.testing import CliRunner

    from bonetumor.cli import app
    from bonetumor.report import build_report

    done = evaluate(tiny_run / "best.pt", str(tiny_data), tmp_path / "done", "val")
    assert done["threshold_source"] == "validation"
    run = tmp_path / "stopped"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("report.html", "eval*", "explain*"))
    raw = torch.load(run / "best.pt", weights_only=True)
    raw.pop("operating_point")
    write_checkpoint(run / "best.pt", {**raw, "threshold": 0.5})
    r = CliRunner().invoke(app, ["evaluate", str(run / "best.pt"), str(tiny_data), "--out", str(tmp_path / "e"),
                                 "--split", "val"])
    assert r.exit_code == 0, r.output
    assert "before training chose its operating point" in r.output
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["threshold_source"] == "default" and m["threshold"] == 0.5
    page = build_report(run, tmp_path / "e", None, tmp_path / "r.html").read_text()
    assert "before training chose its operating point" in page and "chosen on validation (rule" not in page


def test_predict_names_a_bad_file(tiny_run, tmp_path):
    from bonetumor.errors import BadImageError

    (tmp_path / "scan.png").write_text("not an image")
    with pytest.raises(BadImageError, match="scan.png: not an image"):
        predict(tiny_run / "best.pt", [tmp_path / "scan.png"], device="cpu")


def test_evaluate_missing_split_is_a_clear_error(tiny_run, tmp_path):
    from conftest import make_class_tree

    from bonetumor.errors import BonetumorError

    make_class_tree(tmp_path / "d" / "train", n=3)
    make_class_tree(tmp_path / "d" / "valid", n=2)
    with pytest.raises(BonetumorError, match="no images in the test split"):
        evaluate(tiny_run / "best.pt", str(tmp_path / "d"), tmp_path / "e", "test")


def test_external_data_with_other_class_names(tiny_run, tmp_path):
    from conftest import write_image

    from bonetumor.errors import BonetumorError
    from bonetumor.evaluate.run import parse_class_map

    for name, n in (("malignant", 4), ("healthy", 5), ("benign", 3)):
        for k in range(n):
            write_image(tmp_path / "ext" / name / f"{name}{k}.png", 32, seed=k + 10 * n)
    cmap = parse_class_map("malignant=cancer, healthy=normal")
    m = evaluate(tiny_run / "best.pt", str(tmp_path / "ext"), tmp_path / "e", "all", class_map=cmap, external=True, n_boot=50)
    assert m["n"] == 9 and m["n_positive"] == 4 and m["dropped_classes"] == {"benign": 3} and m["external"] is True
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    assert {r["label"] for r in rows} == {"cancer", "normal"} and len(rows) == 9
    with pytest.raises(BonetumorError, match="not among the model's classes"):
        evaluate(tiny_run / "best.pt", str(tmp_path / "ext"), tmp_path / "e2", "all")
    with pytest.raises(BonetumorError, match="--class-map"):
        parse_class_map("malignant")


def test_class_map_on_two_folders_neither_named_cancer(tiny_run, tmp_path):
    """The map is applied before the positive class is chosen: two folders, neither called cancer."""
    from conftest import write_image

    for name, n in (("malignant", 3), ("normal", 4)):
        for k in range(n):
            write_image(tmp_path / "ext" / name / f"{name}{k}.png", 32, seed=k + 10 * n)
    m = evaluate(tiny_run / "best.pt", str(tmp_path / "ext"), tmp_path / "e", "all",
                 class_map={"malignant": "cancer", "normal": "normal"}, external=True, n_boot=20)
    assert m["n"] == 7 and m["n_positive"] == 3 and m["positive_class"] == "cancer"


def test_metrics_without_copies_of_train(tiny_run, tiny_data, tmp_path):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    import csv as _csv

    rows = list(_csv.DictReader(open(data / "manifest.csv")))
    src = next(r for r in rows if r["split"] == "train" and r["label"] == "cancer")
    shutil.copy(data / src["path"], data / "test" / "cancer" / "copy.png")
    rows.append({**src, "path": "test/cancer/copy.png", "patient_id": "PX", "split": "test"})
    with open(data / "manifest.csv", "w", newline="") as f:
        w = _csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    m = evaluate(tiny_run / "best.pt", str(data), tmp_path / "e", "test", exclude_near_duplicates_of="train", n_boot=50)
    ex = m["excluding_copies"]
    assert m["n"] == 9 and ex["n"] == 8 and ex["removed"] == {"exact": 1, "near": 0, "source_name_only": 0, "total": 1}
    assert ex["of"] == "train" and "roc_auc" in ex and ex["interval"]["resamples"] == 50
