import csv
import json

import numpy as np
import pytest
from sklearn import metrics as skm

from bonetumor import evaluate, predict
from bonetumor.evaluate import compute_metrics


def test_metrics_match_scikit_learn_on_random_predictions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    m = compute_metrics(y, p, ["normal", "cancer"], threshold=0.45)
    pred = (p >= 0.45).astype(int)
    tp, fn = int(((pred == 1) & (y == 1)).sum()), int(((pred == 0) & (y == 1)).sum())
    tn, fp = int(((pred == 0) & (y == 0)).sum()), int(((pred == 1) & (y == 0)).sum())
    assert m["confusion_matrix"]["matrix"] == [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx((tp + tn) / 500)
    assert m["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert m["specificity"] == pytest.approx(tn / (tn + fp))
    assert m["precision"] == pytest.approx(tp / (tp + fp))
    assert m["f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    fpr, tpr, _ = skm.roc_curve(y, p)
    assert m["roc_auc"] == pytest.approx(np.trapezoid(tpr, fpr))
    # Rank-based AUC (Mann-Whitney U), independent of scikit-learn.
    pos, neg = p[y == 1], p[y == 0]
    u = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    assert m["roc_auc"] == pytest.approx(u / (len(pos) * len(neg)))


def test_auc_is_undefined_with_one_class():
    m = compute_metrics(np.ones(5, int), np.linspace(0, 1, 5), ["normal", "cancer"])
    assert np.isnan(m["roc_auc"]) and m["sensitivity"] == 0.6


def test_multiclass_metrics():
    y = np.array([0, 1, 2, 2, 1, 0])
    p = np.eye(3)[[0, 1, 2, 1, 1, 0]] * 0.8 + 0.2 / 3
    m = compute_metrics(y, p, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(5 / 6)
    assert m["confusion_matrix"]["matrix"][2] == [0, 1, 1]


def test_evaluate_writes_files_and_uses_every_test_image(tiny_run, tiny_data, tmp_path):
    m = evaluate(tiny_run / "best.pt", str(tiny_data), tmp_path / "e", "test")
    for name in ("metrics.json", "classification_report.txt", "predictions.csv", "roc.png", "confusion_matrix.png"):
        assert (tmp_path / "e" / name).is_file(), name
    rows = list(csv.DictReader(open(tmp_path / "e" / "predictions.csv")))
    test_files = sorted(str(p) for p in (tiny_data / "test").rglob("*.png"))
    assert sorted(r["path"] for r in rows) == test_files and m["n"] == len(test_files) == 8
    # metrics.json agrees with scikit-learn recomputed from predictions.csv
    saved = json.loads((tmp_path / "e" / "metrics.json").read_text())
    y = np.array([r["label"] == "cancer" for r in rows], int)
    p = np.array([float(r["probability"]) for r in rows])
    assert saved["roc_auc"] == pytest.approx(skm.roc_auc_score(y, p), abs=1e-5)
    assert saved["accuracy"] == pytest.approx(skm.accuracy_score(y, p >= saved["threshold"]))
    assert saved["f1"] == pytest.approx(skm.f1_score(y, p >= saved["threshold"]))
    assert all(r["prediction"] == ("cancer" if float(r["probability"]) >= 0.5 else "normal") for r in rows)
    # predict gives the same probabilities as evaluate
    pr = {r["path"]: r["probability"] for r in predict(tiny_run / "best.pt", [tiny_data / "test"], device="cpu")}
    assert all(abs(pr[r["path"]] - float(r["probability"])) < 1e-5 for r in rows)
    # the 1-NN look-up baseline sits beside the model's figures, on the same images
    b = saved["memorisation_baseline"]
    assert b["n"] == 8 and 0 <= b["accuracy"] <= 1 and 0 <= b["roc_auc"] <= 1


def test_evaluate_other_split(tiny_run, tiny_data, tmp_path):
    m = evaluate(tiny_run / "best.pt", str(tiny_data), tmp_path / "v", "val")
    assert m["split"] == "valid" and m["n"] == 8


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
