"""The out-of-distribution check: its arithmetic against scikit-learn, where it lives in a
checkpoint, and what it says about images from another modality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.covariance import LedoitWolf

from bonetumor.data.studies import expand_inputs
from bonetumor.data.synth import create_synthetic_dataset
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.run import evaluate
from bonetumor.inference import model_input, read_batches
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import (
    load_checkpoint,
    read_checkpoint_file,
    write_checkpoint,
)
from bonetumor.model.ood import (
    DetailStats,
    InputStats,
    WithDistance,
    fit_distance,
    image_distances,
    stage_features,
)
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


def test_input_statistics_match_a_numpy_computation():
    from scipy import ndimage

    rng = np.random.default_rng(3)
    grey = rng.random((2, 36, 44))
    grey[0, :10] = 0.0  # a flat black band: gradients of exactly zero
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (torch.from_numpy(grey).float()[:, None].expand(-1, 3, -1, -1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    got = InputStats(mean, std)(x).double().numpy()
    assert got.shape == (2, 15 + 7 + 3 + 64)
    for g, row in zip(grey, got):
        hist = [np.mean(g <= e) for e in np.arange(1, 16) / 16]
        gx, gy = np.diff(g, axis=1)[1:], np.diff(g, axis=0)[:, 1:]
        ghist = [np.mean(np.hypot(gx, gy) <= e) for e in (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)]
        lap = np.abs(ndimage.laplace(g))[1:-1, 1:-1].mean()
        thumb = g[:32, :32].reshape(8, 4, 8, 4).mean(axis=(1, 3)).ravel()  # 4x4 blocks of the top-left 32x32
        want = np.r_[hist, ghist, lap, g.mean(), g.std(ddof=1), thumb]
        np.testing.assert_allclose(row, want, atol=2e-5)


def test_detail_statistics_match_a_numpy_computation():
    from scipy import ndimage

    rng = np.random.default_rng(4)
    smooth = np.add.outer(np.linspace(0, 1, 40), np.linspace(0, 0.5, 48)) / 1.5
    smooth[:, 20:] += 0.2  # an edge in a smooth image: detail in few pixels
    noisy = np.clip(0.5 + 0.1 * rng.normal(size=(40, 48)), 0, 1)  # detail everywhere
    grey = np.stack([smooth, noisy, np.zeros((40, 48))])  # and a flat image: no division by zero
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    x = (torch.from_numpy(grey).float()[:, None].expand(-1, 3, -1, -1) - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    got = DetailStats(mean, std)(x).double().numpy()
    assert got.shape == (3, 4) and np.isfinite(got).all()
    for g, row in zip(grey, got):
        half = g.reshape(20, 2, 24, 2).mean(axis=(1, 3))
        quarter = half.reshape(10, 2, 12, 2).mean(axis=(1, 3))
        laps = [np.abs(ndimage.laplace(a))[1:-1, 1:-1] for a in (g, half, quarter)]
        means = [lap.mean() + 1e-6 for lap in laps]
        want = [np.mean(laps[0] < means[0] / 2), np.mean(laps[1] < means[1] / 2),
                np.log(means[1] / means[0]), np.log(means[2] / means[1])]
        np.testing.assert_allclose(row, want, atol=2e-4)
    # noise: |Laplacian| near its mean in most pixels and halved by each halving; the smooth image the reverse
    assert got[1, 0] < 0.4 < 0.9 < got[0, 0]
    assert got[1, 2] < np.log(0.7) and got[0, 2] > 0


def test_stage_features_pool_as_the_backbone_does_and_with_distance_keeps_the_logits():
    model = create_model("resnet50", "none", "none", (), 1).eval()
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    inputs = InputStats((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    with torch.no_grad():
        pooled, feats = stage_features(model, x, inputs)
        torch.testing.assert_close(pooled, model.backbone(x))
        assert [f.shape[1] for f in feats] == [89, 256, 512, 1024, 2048]
        torch.testing.assert_close(feats[0], inputs(x))
        rng = np.random.default_rng(0)
        model.ood = fit_distance([rng.normal(size=(30, f.shape[1])) for f in feats], np.repeat([0, 1], 15),
                                 [rng.normal(size=(5, f.shape[1])) for f in feats], inputs=inputs)
        logits, scores = WithDistance(model)(x)
        torch.testing.assert_close(logits, model(x))
        torch.testing.assert_close(scores, model.ood(feats))
        torch.testing.assert_close(image_distances(model, x), scores)


def test_a_trained_run_stores_the_check_and_predict_reports_it(tiny_run, tiny_data):
    raw = read_checkpoint_file(tiny_run / "best.pt")
    record = json.loads((tiny_run / "ood.json").read_text())
    assert raw["ood"] == record and record["quantile"] == 0.99 and record["features"] == [89, 4, 256, 512, 1024, 2048]
    assert record["n_valid"] == 8 and record["threshold"] > 0
    ck = load_checkpoint(tiny_run / "best.pt")
    assert ck.ood["threshold"] == record["threshold"] and ck.model.ood.n_stages == 6
    assert ck.model.ood.inputs is not None and ck.model.ood.detail is not None
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


@pytest.mark.parametrize("dropped", [(0, 1), (1,)], ids=["before-the-input-stages", "before-the-detail-stage"])
def test_a_check_saved_before_a_stage_scores_with_the_stages_it_has(tiny_run, tiny_data, tmp_path, dropped):
    raw = read_checkpoint_file(tiny_run / "best.pt")
    prefixes = {0: "ood.inputs.", 1: "ood.detail."}
    weights = {k: v for k, v in raw["model"].items()
               if not k.startswith(("ood.means_", "ood.precision_", "ood.scales"))
               and not any(k.startswith(prefixes[d]) for d in dropped)}
    kept = [i for i in range(6) if i not in dropped]
    for new_i, i in enumerate(kept):  # the stages renumbered from 0 as that format wrote them
        weights[f"ood.means_{new_i}"] = raw["model"][f"ood.means_{i}"]
        weights[f"ood.precision_{new_i}"] = raw["model"][f"ood.precision_{i}"]
    weights["ood.scales"] = raw["model"]["ood.scales"][kept]
    write_checkpoint(tmp_path / "old.pt", {**raw, "model": weights})
    old = {r["path"]: r["ood_distance"] for r in predict(tmp_path / "old.pt", [tiny_data / "valid"], device="cpu")}
    ck = load_checkpoint(tiny_run / "best.pt")
    old_model = load_checkpoint(tmp_path / "old.pt").model
    assert (old_model.ood.inputs is None) == (0 in dropped) and old_model.ood.detail is None
    assert old_model.ood.n_stages == len(kept)
    samples = expand_inputs([tiny_data / "valid"], ck.read_options)
    _, raw_x, _ = next(iter(read_batches(samples, 64, ck.image_size, ck.read_options)))
    x = model_input(raw_x, torch.device("cpu"), ck.mean, ck.std)
    samples = [s.path for s in samples]
    with torch.no_grad():
        _, feats = stage_features(ck.model, x, ck.model.ood.pre_stages())
        per_stage = ck.model.ood.stage_distances(feats) / ck.model.ood.scales
    np.testing.assert_allclose([old[p] for p in samples], per_stage[:, kept].max(1).values.numpy(), atol=5e-4)  # rows keep 3 decimals


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
