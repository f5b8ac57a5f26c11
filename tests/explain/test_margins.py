"""Heatmap mass in the image's margins and on burned-in markers, against their area; the warning
when a model lives there."""

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.explain.margins import (
    band_mask,
    margin_scores,
    margin_summary,
    marker_mask,
    mass_share,
)
from bonetumor.explain.run import explain


def test_the_band_and_the_shares_are_what_they_say():
    band = band_mask((100, 200))
    assert band.mean() == pytest.approx(1 - 0.8 * 0.8) and band[9, 100] and not band[10, 100] and band[50, 19]
    uniform, centre = np.ones((100, 200)), np.zeros((100, 200))
    centre[40:60, 80:120] = 1
    assert mass_share(uniform, band) == pytest.approx(band.mean()) and mass_share(centre, band) == 0.0
    assert mass_share(np.zeros((4, 4)), band_mask((4, 4))) == 0.0
    ramp = np.add.outer(np.arange(100.0), np.arange(200.0))  # an independent sum over the four strips
    strips = ramp[:10].sum() + ramp[90:].sum() + ramp[10:90, :20].sum() + ramp[10:90, 180:].sum()
    assert mass_share(ramp, band) == pytest.approx(strips / ramp.sum())


def test_burned_in_markers_are_found_grown_and_only_when_they_are_marks():
    grey = np.full((200, 200), 0.4)
    grey[10:30, 12:16] = grey[26:30, 12:24] = 1.0  # an "L" in the top-left corner
    marks = marker_mask(grey)
    assert marks[20, 14] and marks[28, 20] and marks[8, 10] and not marks[100, 100]  # grown by 4 px
    assert marks.sum() < 0.05 * grey.size
    assert marker_mask(np.full((50, 50), 0.5)) is None
    bright = np.full((50, 50), 0.5)
    bright[:, :10] = 1.0  # 20% of the image: saturated background, not a mark
    assert marker_mask(bright) is None
    cam = np.zeros((200, 200))
    cam[15:25, 10:20] = 1.0  # the map on the letter
    s = margin_scores(cam, grey)
    assert s["marker_share"] == 1.0 and s["margin_share"] == 1.0 and s["margin_area"] == pytest.approx(0.36)


def test_the_summary_warns_only_when_the_maps_live_in_the_margins_or_on_markers():
    calm = [{"margin_share": 0.3, "margin_area": 0.36}] * 10
    assert margin_summary(calm)["warning"] == "" and margin_summary([]) is None
    edgy = [{"margin_share": 0.8, "margin_area": 0.36}] * 10
    m = margin_summary(edgy)
    assert m["margin_share"] == 0.8 and "80% of their mass in the outer 10% band" in m["warning"]
    read = [{"margin_share": 0.4, "margin_area": 0.36, "marker_share": 0.5, "marker_area": 0.02}] * 4 + calm
    m = margin_summary(read)
    assert m["n_with_markers"] == 4 and "the model reads the labels" in m["warning"] and "margins" not in m["warning"]


def test_explain_scores_every_map_and_the_report_says_it(tiny_run, tiny_data, tmp_path):
    from bonetumor.report import _localization_section

    r = explain(tiny_run / "best.pt", [tiny_data / "test"], tmp_path / "x", device="cpu", faithfulness_samples=0)
    maps = [np.load(tmp_path / "x" / row["map"]) for row in r.rows]
    shares = [mass_share(m, band_mask(m.shape)) for m in maps]
    assert [row["margin_share"] for row in r.rows] == pytest.approx(shares, abs=1e-4)
    saved = json.loads((tmp_path / "x" / "explain.json").read_text())["margins"]
    assert saved["n"] == len(r.rows) and saved["margin_share"] == pytest.approx(np.mean(shares), abs=1e-4)
    assert saved["margin_area"] == pytest.approx(1 - (26 / 32) ** 2, abs=1e-4)  # 32 px: a 3 px band
    assert "Heatmap mass in the outer 10% band" in _localization_section(tmp_path / "x")
    out = CliRunner().invoke(app, ["explain", str(tiny_run / "best.pt"), str(tiny_data / "test"), "--out",
                                   str(tmp_path / "y"), "--device", "cpu"]).output
    assert "heatmap mass in the outer 10% band" in out
