"""Acquisition style: the features measure what they say, a planted style confound is found and
said, and clean synthetic data raise no alarm."""

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from bonetumor.data.audit import run_audit
from bonetumor.data.confounds import confound_summary
from bonetumor.data.style import STYLE_FEATURES, jpeg_quality, style_vector


@pytest.mark.parametrize("quality", [20, 50, 75, 95])
def test_jpeg_quality_is_read_back_from_the_file_tables(quality):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buf, "JPEG", quality=quality)
    with Image.open(buf) as im:
        assert jpeg_quality(im.quantization) == pytest.approx(quality, abs=2)
    assert jpeg_quality(None) == 100.0


def test_style_features_measure_framing_noise_and_markers():
    rng = np.random.default_rng(0)
    plain = np.full((200, 300), 0.5) + rng.normal(0, 0.01, (200, 300))
    f = dict(zip(STYLE_FEATURES, style_vector(plain, False)))
    assert f["aspect"] == pytest.approx(1.5) and np.exp(f["log_width"]) == pytest.approx(300)
    assert f["dark_band"] == 0 and f["band_p50"] == pytest.approx(0.5, abs=0.01) and f["bright_corners"] == 0
    # neighbour differences of N(0, s) noise: |N(0, 2 s^2)|, median 0.6745 * sqrt(2) * s
    assert f["band_noise"] == pytest.approx(0.6745 * np.sqrt(2) * 0.01, rel=0.1)
    padded = np.zeros((260, 360))
    padded[30:230, 30:330] = plain
    padded[2:12, 2:40] = 1.0  # a burned-in marker in the top-left corner
    g = dict(zip(STYLE_FEATURES, style_vector(padded, False)))
    assert g["dark_band"] > 0.7 and g["bright_corners"] == pytest.approx(380 / (4 * 39 * 54), rel=0.01)


def _restyle_cancers(data):
    """Cancers from 'another site': framed in black and saved as strong JPEG; normals untouched."""
    for f in sorted(data.rglob("cancer/*.png")):
        im = np.asarray(Image.open(f).convert("L"))
        framed = np.pad(im, 8)
        Image.fromarray(framed).save(f.with_suffix(".jpg"), quality=40)
        f.unlink()
    (data / "manifest.csv").unlink()


def test_a_planted_style_confound_is_found_and_clean_data_are_not_flagged(tmp_path, tiny_data, tiny_run):
    clean = json.loads((tiny_run / "audit.json").read_text())["confounds"]["style"]
    assert clean["cv_auc"] < 0.8 and not clean["flag"]
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    _restyle_cancers(data)
    r = run_audit(str(data))
    style, names = r["confounds"]["style"], r["confounds"]["file_names"]
    assert style["flag"] and style["cv_auc"] > 0.95 and not names["flag"]
    assert style["share_in_pure_clusters"] > 0.8
    jpeg = [c for c in style["clusters"] if c["looks"]["jpeg_quality"] < 50]
    assert jpeg and all(set(c["by_class"]) == {"cancer"} for c in jpeg)
    assert "image style alone predicts the class (cross-validated ROC-AUC 1.00)" in confound_summary(r)
