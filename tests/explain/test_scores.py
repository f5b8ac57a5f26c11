import numpy as np
import pytest
import torch
from torch import nn

from bonetumor.explain.scores import (
    bootstrap_ci,
    deletion_insertion,
    energy_inside,
    gaussian_baseline,
    localization_scores,
    pointing_hit,
    top_region_iou,
)


def test_scores_on_hand_made_maps():
    mask = np.zeros((10, 10), bool)
    mask[2:4, 2:4] = True  # 4 pixels
    cam = np.zeros((10, 10))
    cam[3, 3] = 1.0
    cam[8, 8] = 0.5
    assert pointing_hit(cam, mask) and energy_inside(cam, mask) == pytest.approx(1 / 1.5)
    cam2 = cam.copy()
    cam2[8, 8] = 2.0
    assert not pointing_hit(cam2, mask)
    # top 15% = 15 pixels; a map equal to the mask ranks the 4 lesion pixels first: IoU = 4/15
    assert top_region_iou(mask.astype(float), mask) == pytest.approx(4 / 15)
    assert energy_inside(np.zeros((10, 10)), mask) == 0.0
    s = localization_scores(mask.astype(float), mask)
    assert s == {"pointing": 1.0, "energy": 1.0, "iou_top15": pytest.approx(4 / 15)}


def test_gaussian_baseline_is_centred_and_scaled():
    g = gaussian_baseline((21, 31))
    assert g.shape == (21, 31) and g.max() == pytest.approx(1.0) and np.unravel_index(g.argmax(), g.shape) == (10, 15)


def test_bootstrap_ci():
    ci = bootstrap_ci([1.0] * 20)
    assert ci == {"value": 1.0, "ci_low": 1.0, "ci_high": 1.0, "n": 20}
    rng = np.random.default_rng(0)
    v = rng.random(400) < 0.3
    ci = bootstrap_ci(v)
    se = np.sqrt(0.3 * 0.7 / 400)
    assert ci["ci_low"] < ci["value"] < ci["ci_high"]
    assert ci["ci_high"] - ci["ci_low"] == pytest.approx(2 * 1.96 * se, rel=0.15)  # normal approximation
    assert np.isnan(bootstrap_ci([])["value"])


class Spot(nn.Module):
    """Logit = 10 * (mean of the top-left 8x8 patch - 0.5): all evidence in one place."""

    def forward(self, x):
        return (10 * (x[:, :1, :8, :8].mean((1, 2, 3)) - 0.5))[:, None]


def test_deletion_insertion_rank_a_faithful_map_above_a_wrong_one():
    x = torch.zeros(2, 3, 32, 32)
    x[:, :, :8, :8] = 1.0
    good = torch.zeros(2, 32, 32)
    good[:, :8, :8] = 1.0
    bad = good.flip(1).flip(2)
    idx = torch.ones(2, dtype=torch.long)
    d_good, i_good = deletion_insertion(Spot(), x, good, idx)
    d_bad, i_bad = deletion_insertion(Spot(), x, bad, idx)
    assert (d_good < d_bad).all() and (i_good > i_bad).all()


def test_peak_of_a_plateau_is_its_centre_not_its_first_pixel():
    from bonetumor.explain.scores import map_peak

    cam = np.zeros((8, 8))
    cam[4:8, 4:8] = 1.0  # a flat corner block, as an upsampled 2x2 map gives
    assert map_peak(cam) in {(5, 5), (5, 6), (6, 5), (6, 6)}
    mask = np.zeros((8, 8), bool)
    mask[5:7, 5:7] = True
    assert pointing_hit(cam, mask)
    assert map_peak(np.eye(8)[::-1] * np.arange(8)) == (0, 7)
