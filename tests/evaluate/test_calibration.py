import json

import numpy as np
import pytest
import torch
from conftest import tiny_config
from sklearn import metrics as skm

from bonetumor import fit, load_checkpoint
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.calibration import (
    choose_threshold,
    fit_temperature,
    parse_rule,
    probabilities,
)
from bonetumor.evaluate.metrics import expected_calibration_error
from bonetumor.evaluate.run import evaluate


def _scores(n=400, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, np.clip(y * 0.3 + rng.random(n) * 0.7, 0, 1)


def test_youden_threshold_is_the_best_by_brute_force():
    y, p = _scores()
    t = choose_threshold(y, p, "youden")
    j = lambda thr: skm.recall_score(y, p >= thr) + skm.recall_score(1 - y, p < thr) - 1  # noqa: E731
    assert j(t) == pytest.approx(max(j(c) for c in np.unique(p)))


@pytest.mark.parametrize("target", [0.8, 0.95])
def test_sensitivity_rule_keeps_sensitivity_with_the_best_specificity(target):
    y, p = _scores(seed=1)
    t = choose_threshold(y, p, f"sensitivity:{target}")
    assert skm.recall_score(y, p >= t) >= target
    ok = [c for c in np.unique(p) if skm.recall_score(y, p >= c) >= target]
    assert t == pytest.approx(max(ok))
    s = choose_threshold(y, p, "specificity:0.9")
    assert skm.recall_score(1 - y, p < s) >= 0.9
    assert choose_threshold(y, p, "fixed:0.3") == 0.3


@pytest.mark.parametrize("rule", ["best", "sensitivity:1.5", "fixed:x", "youden:1"])
def test_bad_rules_are_refused(rule):
    with pytest.raises(BonetumorError, match="--threshold-rule"):
        parse_rule(rule)


def test_temperature_recovers_a_known_overconfidence():
    rng = np.random.default_rng(2)
    true_logit = rng.normal(0, 2, 20000)
    y = (rng.random(20000) < 1 / (1 + np.exp(-true_logit))).astype(int)
    t = fit_temperature(true_logit * 3.0, y)  # a model three times too confident
    assert t == pytest.approx(3.0, rel=0.05)
    before = expected_calibration_error(y, probabilities(true_logit * 3.0))
    after = expected_calibration_error(y, probabilities(true_logit * 3.0, t))
    assert after < before / 3
    # multiclass: logits for 3 classes
    z = rng.normal(0, 1.5, (5000, 3))
    yk = np.array([rng.choice(3, p=np.exp(r) / np.exp(r).sum()) for r in z])
    assert fit_temperature(z * 0.5, yk) == pytest.approx(0.5, rel=0.1)


def test_training_stores_the_operating_point_and_calibration(tmp_path, tiny_data):
    r = fit(tiny_config(tiny_data, epochs=1, calibrate=True, threshold_rule="sensitivity:0.9"), tmp_path / "r", verbose=False)
    op = json.loads((r.run_dir / "operating_point.json").read_text())
    ck = load_checkpoint(r.run_dir / "best.pt")
    assert ck.threshold == op["threshold"] and ck.model.temperature == pytest.approx(op["temperature"])
    assert op["rule"] == "sensitivity:0.9" and op["at_threshold"]["sensitivity"] >= 0.9
    assert {"ece_before", "ece_after", "at_threshold_0.5"} <= set(op)
    # the stored temperature is applied on load: the logits are the raw ones divided by T
    x = torch.rand(2, 3, 32, 32)
    raw = load_checkpoint(r.run_dir / "best.pt")
    raw.model.temperature = 1.0
    with torch.no_grad():
        torch.testing.assert_close(ck.model(x), raw.model(x) / op["temperature"])
    m = evaluate(r.run_dir / "best.pt", str(tiny_data), tmp_path / "e", "test", n_boot=50)
    assert m["threshold"] == op["threshold"]
    if op["threshold"] != 0.5:
        assert "at_threshold_0.5" in m
