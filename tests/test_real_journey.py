"""A user's first day on real radiographs: train with the README's recipe, evaluate, explain,
report (rendered in Chromium), and evaluate on another data set whose classes have other names.

Runs on a fixed 400-image subset of the shared ``bone-cancer-xray-v1`` export (linked, never
copied into the repository); skipped with a message where that folder is absent.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bonetumor.cli import app

SHARED = Path(os.environ.get("BONETUMOR_REAL_DATA",
                             Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "bone-cancer-xray-v1"))
PER_CLASS = {"train": 100, "valid": 50, "test": 50}  # 400 images
# The README's real-data recipe ("Your own folder, in four commands").
RECIPE = ["--weights", "none", "--image-size", "112", "--output-stride", "16", "--epochs", "10"]

pytestmark = pytest.mark.slow


def _subset(root: Path) -> Path:
    """The first files (sorted by name) of each split and class, linked into ``root``."""
    for split, n in PER_CLASS.items():
        for c in ("cancer", "normal"):
            files = sorted(p for p in (SHARED / split / c).iterdir() if p.is_file())[:n]
            (root / split / c).mkdir(parents=True)
            for f in files:
                (root / split / c / f.name).symlink_to(f.resolve())
    return root


def _ok(args: list[str]):
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert r.exit_code == 0, (args[:2], r.output[-2000:])
    return r


@pytest.mark.timeout(3600)
def test_first_day_on_real_radiographs(tmp_path):
    if not (SHARED / "train" / "cancer").is_dir():
        pytest.skip(f"real data not found at {SHARED} (set BONETUMOR_REAL_DATA to the bone-cancer-xray-v1 folder)")
    data = _subset(tmp_path / "data")
    run, ev, ex = tmp_path / "run", tmp_path / "eval", tmp_path / "explain"
    _ok(["train", data, "--out", run, *RECIPE, "--seed", "0", "--device", "cpu"])
    cfg = (run / "config.yaml").read_text()
    assert "freeze: none" in cfg and "output_stride: 16" in cfg  # --freeze auto trained the random backbone
    assert (run / "duplicates.csv").is_file() and (run / "clusters.csv").is_file()

    _ok(["evaluate", run / "best.pt", data, "--out", ev, "--device", "cpu"])
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == 100 and m["n_positive"] == 50 and 0.5 < m["roc_auc"]["value"] <= 1.0

    r = _ok(["explain", run / "best.pt", data / "test", "--out", ex, "--device", "cpu"])
    record = json.loads((ex / "explain.json").read_text())
    assert record["grid"] == [7, 7] and record["grid_warning"] is None and "too coarse" not in r.output
    assert len(record["images"]) == 100 and {i["truth"] for i in record["images"]} == {"cancer", "normal"}

    # another hospital's folders: other class names, mapped onto the model's
    ext = tmp_path / "external"
    for theirs, ours in (("malignant", "cancer"), ("healthy", "normal")):
        (ext / theirs).mkdir(parents=True)
        for f in sorted((data / "test" / ours).iterdir())[:20]:
            (ext / theirs / f.name).symlink_to(f.resolve())
    _ok(["evaluate", run / "best.pt", ext, "--out", tmp_path / "ext", "--external", "--class-map",
         "malignant=cancer,healthy=normal", "--device", "cpu"])
    e = json.loads((tmp_path / "ext" / "metrics.json").read_text())
    assert e["external"] is True and e["n"] == 40 and e["n_positive"] == 20 and e["positive_class"] == "cancer"

    _ok(["report", run, "--eval", ev, "--eval", tmp_path / "ext", "--explain", ex])
    html = (run / "report.html").read_text()
    assert re.search(r"<h1>resnet50, 112 px, on data, trained", html) and "external: " in html
    assert "too coarse" not in html
    assert "False negatives" in html or "False positives" in html or "No misclassified images" in html
    from test_report import _render

    page = _render(html, tmp_path, 1200)
    assert page["images"] >= 6 and page["broken"] == 0 and page["overflow"] == []
