"""The out-of-distribution check: its arithmetic against scikit-learn, where it lives in a
checkpoint, and what it says about images from another modality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from bonetumor.data.synth import create_synthetic_dataset
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.run import evaluate
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import (
    load_checkpoint,
    read_checkpoint_file,
    write_checkpoint,
)
from bonetumor.model.ood import Distance, WithDistance, fit_distance, stage_features
from bonetumor.predict import predict
from bonetumor.train import fit
from tests.conftest import tiny_config


def _reference_scores(train, labels, valid, query, quantile):
    """The score written out in float64 with scikit-learn's own Mahalanobis distance."""
    per_stage = []
    for x, v, q in zip(train, valid, query):
        means = [x[labels == c].mean(axis=0) for c in np.unique(labels)]
        lw = LedoitWolf(assume_centered=True).fit(x - np.stack(means)[labels])
        dist = lambda z: np.min([lw.mahalanobis(z - m) for m in means], axis=0)  # noqa: E731
        per_stage.append(dist(q) / np.quantile(dist(v), quantile))
    return np.max(per_stage, axis=0)


def test_scores_match_scikit_learns_mahalanobis_distance():
    rng = np.random.default_rng(0)
    dims = (6, 40)  # a stage with fewer, and one with more dimensions than training images
    labels = np.repeat([0, 1], 15)
    train = [rng.normal(size=(30, d)) + labels[:, None] * 2 for d in dims]
    valid = [rng.normal(size=(12, d)) for d in dims]
    query = [rng.normal(size=(9, d)) * 3 for d in dims]
    detector = fit_distance(train, labels, valid, quantile=0.9)
    got = detector([torch.from_numpy(q).float() for q in query]).numpy()
    np.testing.assert_allclose(got, _reference_scores(train, labels, valid, query, 0.9), rtol=1e-4)
    # each stage's validation 0.9 quantile is 1 by construction
    d = detector.stage_distances([torch.from_numpy(v).float() for v in valid]) / detector.scales
    np.testing.assert_allclose(np.quantile(d.numpy(), 0.9, axis=0), 1.0, rtol=1e-5)


def test_stage_features_pool_as_the_backbone_does_and_with_distance_keeps_the_logits():
    model = create_model("resnet50", "none", "none", (), 1).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        pooled, feats = stage_features(model, x)
        torch.testing.assert_close(pooled, model.backbone(x))
        assert [f.shape[1] for f in feats] == [256, 512, 1024, 2048]
        model.ood = Distance.empty([(2, f.shape[1]) for f in feats])
        logits, scores = WithDistance(model)(x)
        torch.testing.assert_close(logits, model(x))
        assert scores.shape == (3,)


def test_a_trained_run_stores_the_check_and_predict_reports_it(tiny_run, tiny_data):
    raw = read_checkpoint_file(tiny_run / "best.pt")
    record = json.loads((tiny_run / "ood.json").read_text())
    assert raw["ood"] == record and record["quantile"] == 0.99 and record["features"] == [256, 512, 1024, 2048]
    assert record["n_valid"] == 8 and record["threshold"] > 0
    ck = load_checkpoint(tiny_run / "best.pt")
    assert ck.ood["threshold"] == record["threshold"] and ck.model.ood.n_stages == 4
    rows = predict(tiny_run / "best.pt", [tiny_data / "valid"], device="cpu")
    scores = np.array([r["ood_distance"] for r in rows])
    assert all(r["unlike_training"] == (r["ood_distance"] > record["threshold"]) for r in rows)
    # the threshold is the 0.99 quantile of these very validation images' scores
    assert np.quantile(scores, 0.99) == pytest.approx(record["threshold"], rel=1e-3)


def test_a_checkpoint_without_the_check_still_predicts_without_its_fields(tiny_run, tiny_data, tmp_path):
    raw = read_checkpoint_file(tiny_run / "best.pt")
    raw["model"] = {k: v for k, v in raw["model"].items() if not k.startswith("ood.")}
    del raw["ood"]
    write_checkpoint(tmp_path / "old.pt", raw)
    rows = predict(tmp_path / "old.pt", [tiny_data / "valid"], device="cpu")
    assert len(rows) == 8 and not any("unlike_training" in r for r in rows)


def test_a_bad_threshold_is_refused_naming_the_file(tiny_run, tmp_path):
    raw = read_checkpoint_file(tiny_run / "best.pt")
    raw["ood"] = {**raw["ood"], "threshold": float("nan")}
    write_checkpoint(tmp_path / "bad.pt", raw)
    with pytest.raises(BonetumorError, match="bad.pt.*threshold"):
        load_checkpoint(tmp_path / "bad.pt")


def test_quantile_zero_trains_without_the_check(tiny_data, tmp_path):
    fit(tiny_config(tiny_data, epochs=1, ood_quantile=0.0), tmp_path / "run", verbose=False)
    assert "ood" not in read_checkpoint_file(tmp_path / "run" / "best.pt")
    assert not (tmp_path / "run" / "ood.json").exists()


@pytest.fixture(scope="module")
def modalities(tmp_path_factory):
    """Synthetic MRI and synthetic radiographs, 64 px, and a short run on each."""
    root = tmp_path_factory.mktemp("modalities")
    out = {}
    for modality in ("stir", "xray"):
        data = create_synthetic_dataset(root / modality, n_patients=100, size=64, seed=5, modality=modality,
                                        slices_per_patient=2).root
        fit(tiny_config(data, image_size=64, epochs=3, batch_size=16), root / f"run_{modality}", verbose=False)
        out[modality] = (data, root / f"run_{modality}" / "best.pt")
    return out


def _flagged(checkpoint, folder) -> float:
    rows = predict(checkpoint, [folder], device="cpu")
    return float(np.mean([r["unlike_training"] for r in rows]))


@pytest.mark.slow
def test_each_modalitys_model_flags_the_other_and_few_of_its_own(modalities, tmp_path):
    (mri, mri_ck), (xray, xray_ck) = modalities["stir"], modalities["xray"]
    assert _flagged(mri_ck, xray) >= 0.95
    assert _flagged(xray_ck, mri) >= 0.95
    assert _flagged(mri_ck, mri / "test") <= 0.10
    assert _flagged(xray_ck, xray / "test") <= 0.10
    # evaluate counts them and says so
    m = evaluate(mri_ck, str(xray), tmp_path / "ev", "test", device="cpu", baseline=False)
    assert m["ood"]["rate"] >= 0.95 and m["ood"]["of"] == m["n"]
    assert any("unlike the training data" in note for note in m["notes"])
    header = (tmp_path / "ev" / "predictions.csv").read_text().splitlines()[0]
    assert header.endswith("ood_distance,unlike_training")
