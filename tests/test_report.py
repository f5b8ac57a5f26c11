"""The report is one self-contained HTML file; headless Chromium loads it, every image loads and
no text overflows its box, at desktop and at phone width."""

import json
import re
import subprocess
from pathlib import Path

import pytest
from conftest import chromium_executable

from bonetumor import evaluate
from bonetumor.errors import BonetumorError
from bonetumor.explain.run import explain
from bonetumor.report import build_report

CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).length;
  const over = [...document.querySelectorAll('main *')].filter(e => {
    const s = getComputedStyle(e);
    return s.display !== 'inline' && s.overflowX === 'visible' && e.scrollWidth > e.clientWidth + 1;
  }).map(e => e.tagName + ':' + (e.textContent || '').slice(0, 40));
  const page = document.documentElement.scrollWidth > window.innerWidth + 1;
  const pre = document.createElement('pre'); pre.id = 'result';
  pre.textContent = JSON.stringify({images: imgs.length, broken, overflow: over, page_overflow: page});
  document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def report(tiny_run, tiny_data, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    evaluate(tiny_run / "best.pt", str(tiny_data), tmp / "eval", "test", n_boot=100)
    explain(tiny_run / "best.pt", [tiny_data / "test"], tmp / "explain", manifest=tiny_data / "manifest.csv",
            device="cpu", faithfulness_samples=0)
    evaluate(tiny_run / "best.pt", str(tiny_data / "valid"), tmp / "ext", "all", external=True, n_boot=50)
    return build_report(tiny_run, tmp / "eval", tmp / "explain", tmp / "report.html", [tmp / "ext"])


def test_report_is_self_contained_and_complete(report):
    text = report.read_text()
    assert not re.findall(r'src="(?!data:)', text), "an image is not embedded"
    for heading in ("1. Data", "2. Methods", "3. Results", "Calibration", "4. Failure gallery",
                    "5. Heatmap localization", "6. Intended use and limitations"):
        assert heading in text
    assert "value [95% CI] at the operating threshold" in text and "centred Gaussian baseline" in text
    assert "Other evaluations" in text and "external: " in text
    assert text.count("data:image/png;base64,") >= 6  # curves, ROC, PR, confusion, scores, reliability


def test_report_speaks_plainly(report):
    text = report.read_text()
    assert re.search(r"<h1>resnet50, 32 px, on data, trained \d{4}-\d{2}-\d{2}</h1>", text)
    assert '<abbr title="The chance that a random cancer image scores above a random normal one' in text
    for name in ("ROC-AUC", "Sensitivity", "Specificity", "PPV (precision)", "Calibration error (ECE)"):
        assert f">{name}</abbr>" in text
    for raw in ("roc_auc", "ppv<", "iou_top15", "balanced_accuracy"):
        assert raw not in text
    assert not re.findall(r"\b0\.0*[1-9]\d{3}", text), "four significant digits on the page"
    assert "Warning:</b> the heatmaps are a 1x1 grid" in text


def test_failure_gallery_with_both_kinds_of_error(report, tiny_run, tmp_path):
    """A model that misses a cancer and also calls a normal image cancer gets both galleries."""
    import csv
    import shutil

    ev = tmp_path / "eval"
    shutil.copytree(report.parent / "eval", ev)
    rows = list(csv.DictReader(open(ev / "predictions.csv")))
    pos = json.loads((ev / "metrics.json").read_text())["positive_class"]
    neg = next(r["label"] for r in rows if r["label"] != pos)
    rows[0].update(label=pos, prediction=neg, probability="0.10")
    rows[1].update(label=neg, prediction=pos, probability="0.90")
    with open(ev / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import bonetumor.explain.run
    import bonetumor.model.checkpoint

    loads = []
    real = bonetumor.model.checkpoint.load_checkpoint

    def counted(*a, **k):
        loads.append(a[0])
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(bonetumor.model.checkpoint, "load_checkpoint", counted)
        mp.setattr(bonetumor.explain.run, "load_checkpoint", counted)
        text = build_report(tiny_run, ev, None, tmp_path / "r.html").read_text()
    assert "False negatives" in text and "False positives" in text
    assert len(loads) == 1  # one model for the grid check and both galleries


def _render(html_text: str, tmp_path, width: int) -> dict:
    """Load the page in headless Chromium at ``width`` px and return what the check script saw."""
    exe = chromium_executable()
    page = tmp_path / f"page{width}.html"
    page.write_text(html_text.replace("</body>", CHECK + "</body>"))
    cmd = [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-sync",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           f"--window-size={width},2000", "--virtual-time-budget=10000", "--dump-dom", page.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    m = re.search(r'<pre id="result">(.*?)</pre>', dom, re.S)
    assert m, "the check script did not run"
    return json.loads(m.group(1).replace("&quot;", '"').replace("&amp;", "&"))


@pytest.mark.parametrize("width", [1200, 420])
def test_report_renders_in_headless_chromium(report, tmp_path, width):
    r = _render(report.read_text(), tmp_path, width)
    assert r["images"] >= 6 and r["broken"] == 0
    assert r["overflow"] == [] and r["page_overflow"] is False


def test_the_browser_check_catches_a_broken_image_and_overflowing_text(tmp_path):
    bad = ("<html><body><main><img src='data:image/png;base64,AAAA'>"
           "<p style='white-space:nowrap;width:200px'>" + "x" * 400 + "</p></main></body></html>")
    r = _render(bad, tmp_path, 800)
    assert r["broken"] == 1 and r["overflow"] and r["page_overflow"] is True


def test_report_needs_a_run_folder(tmp_path):
    with pytest.raises(BonetumorError, match="not a run folder"):
        build_report(tmp_path)


def test_failure_gallery_finds_relative_paths_from_another_folder_and_names_a_missing_image(report, tiny_run,
                                                                                             tmp_path, monkeypatch):
    """predictions.csv keeps the paths evaluate was given; a report run elsewhere still finds them,
    and an image gone since gives a line in the gallery, not a failed report."""
    import csv
    import os
    import shutil

    ev = tmp_path / "eval"
    shutil.copytree(report.parent / "eval", ev)
    rows = list(csv.DictReader(open(ev / "predictions.csv")))
    m = json.loads((ev / "metrics.json").read_text())
    pos = m["positive_class"]
    neg = next(r["label"] for r in rows if r["label"] != pos)
    rows[0].update(label=pos, prediction=neg, probability="0.10")
    base = Path(rows[0]["path"]).parent.parent
    for r in rows:
        r["path"] = os.path.relpath(r["path"], base)
    with open(ev / "predictions.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (ev / "metrics.json").write_text(json.dumps({**m, "paths_relative_to": str(base)}))
    monkeypatch.chdir(tmp_path)  # not where the paths start
    text = build_report(tiny_run, ev, None, tmp_path / "r.html").read_text()
    gallery = text[text.index("4. Failure gallery"):text.index("5. Heatmap localization")]
    assert "False negatives" in gallery and gallery.count("<figure") >= 1
    (ev / "metrics.json").write_text(json.dumps(m | {"paths_relative_to": str(tmp_path / "elsewhere")}))
    text = build_report(tiny_run, ev, None, tmp_path / "r2.html").read_text()
    assert "is not found from here" in text and rows[0]["path"] in text
