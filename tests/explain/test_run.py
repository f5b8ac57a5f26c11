import csv
import json
import re

import numpy as np
from PIL import Image
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.explain.run import explain


def test_explain_writes_panels_maps_index_and_scores(tiny_run, tiny_data, tmp_path, monkeypatch):
    import bonetumor.explain.run

    reads, real = [], bonetumor.explain.run.read_manifest
    monkeypatch.setattr(bonetumor.explain.run, "read_manifest", lambda p: reads.append(p) or real(p))
    r = explain(tiny_run / "best.pt", [tiny_data / "test"], tmp_path / "x", manifest=tiny_data / "manifest.csv",
                device="cpu", batch_size=3, faithfulness_samples=4)
    assert len(reads) == 1  # labels and masks from one reading of the manifest
    assert len(r.rows) == 8
    for row in r.rows:
        cam = np.load(tmp_path / "x" / row["map"])
        assert cam.shape == (32, 32) and cam.dtype == np.float32 and 0 <= cam.min() and cam.max() <= 1
        with Image.open(tmp_path / "x" / row["panel"]) as im:
            assert im.width > 3 * 32
    html = (tmp_path / "x" / "index.html").read_text()
    assert html.count("<figure") == 8 and "not a diagnostic device" in html
    loc = json.loads((tmp_path / "x" / "localization.json").read_text())
    assert loc["n_with_lesion"] == 4 and loc["layer"] == "backbone.layer4"
    for k in ("pointing", "energy", "iou_top15"):
        for part in ("cam", "baseline_centred_gaussian"):
            ci = loc[part][k]
            assert ci["ci_low"] <= ci["value"] <= ci["ci_high"] and ci["n"] == 4
    rows = list(csv.DictReader(open(tmp_path / "x" / "localization.csv")))
    assert len(rows) == 4 and all(r["path"].endswith(".png") for r in rows)
    assert r.faithfulness["deletion"]["n"] == 4


def test_boxes_and_mask_folder_give_the_same_scores_for_a_box_lesion(tiny_run, tiny_data, tmp_path):
    files = sorted((tiny_data / "test" / "cancer").glob("*.png"))[:2]
    (tmp_path / "m").mkdir()
    lines = ["path,x0,y0,x1,y1"]
    for f in files:
        m = np.zeros((32, 32), np.uint8)
        m[4:12, 10:20] = 255
        Image.fromarray(m).save(tmp_path / "m" / f.name)
        lines.append(f"{f.name},10,4,20,12")
    (tmp_path / "b.csv").write_text("\n".join(lines) + "\n")
    a = explain(tiny_run / "best.pt", files, tmp_path / "a", masks=tmp_path / "m", device="cpu", faithfulness_samples=0)
    b = explain(tiny_run / "best.pt", files, tmp_path / "b", boxes=tmp_path / "b.csv", device="cpu", faithfulness_samples=0)
    assert a.localization["cam"] == b.localization["cam"]


def test_cli_explain_and_its_errors(tiny_run, tiny_data, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["explain", str(tiny_run / "best.pt"), str(tiny_data / "test" / "cancer"), "--out",
                            str(tmp_path / "e"), "--method", "gradcam++", "--target", "normal", "--masks", str(tiny_data / "masks")])
    assert r.exit_code == 0, r.output
    assert "Pointing game" in r.output and "baseline" in r.output
    r = runner.invoke(app, ["explain", str(tiny_run / "best.pt"), str(tiny_data / "test"), "--out", str(tmp_path / "f"),
                            "--layer", "backbone.layer7"])
    assert r.exit_code == 2 and "backbone.layer4" in r.output and "Traceback" not in r.output


def test_index_sorts_errors_first_says_truth_and_prediction_and_filters(tiny_run, tiny_data, tmp_path):
    r = explain(tiny_run / "best.pt", [tiny_data / "test"], tmp_path / "x", device="cpu", faithfulness_samples=0)
    assert all(row["truth"] in ("cancer", "normal") for row in r.rows)  # from the class folders
    outcomes = [row["outcome"] for row in r.rows]
    assert set(outcomes) <= {"true positive", "true negative", "false positive", "false negative"}
    html = (tmp_path / "x" / "index.html").read_text()
    shown = re.findall(r'<figure data-o="([a-z ]+)"', html)
    order = ["false negative", "false positive", "true positive", "true negative"]
    assert sorted(shown) == sorted(outcomes) and shown == sorted(shown, key=order.index)
    assert html.count("truth <b>") == len(shown) and html.count("predicted <b>") == len(shown)
    assert 'alt="colour bar' in html and '<button data-f="all"' in html
    for o in set(outcomes):
        assert f'<button data-f="{o}">' in html


def test_a_coarse_heatmap_grid_is_flagged_with_the_way_out(tiny_run, tiny_data, tmp_path):
    r = explain(tiny_run / "best.pt", [tiny_data / "test"], tmp_path / "x", device="cpu", faithfulness_samples=0)
    assert r.grid == (1, 1) and "1x1 grid" in r.warning and "--image-size 224" in r.warning
    assert "--output-stride 16 with --image-size 112" in r.warning
    record = json.loads((tmp_path / "x" / "explain.json").read_text())
    assert record["grid"] == [1, 1] and record["grid_warning"] == r.warning
    assert "too coarse to localise" in (tmp_path / "x" / "index.html").read_text()
    res = CliRunner().invoke(app, ["explain", str(tiny_run / "best.pt"), str(tiny_data / "test" / "cancer"),
                                   "--out", str(tmp_path / "y"), "--device", "cpu"])
    assert res.exit_code == 0 and "too coarse to localise" in res.output
