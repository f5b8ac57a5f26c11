"""Acquisition style: cheap features that describe how an image was made and exported rather
than what it shows, and how well they alone predict the label.

Size, framing (dark padding, borders), grey-level spread, noise, JPEG compression and bright
burned-in markers differ between scanners, sites and export tools. When the classes of a data
set come from different sources, these features separate the classes without any anatomy, and
a CNN can learn them too. ``style_confound`` clusters the images by style (each cluster's class
purity says which source holds which class) and reports the cross-validated ROC-AUC of a
classifier that sees style alone.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

import numpy as np

from bonetumor.data.confounds import CONFOUND_AUC, cv_auc, cv_folds

STYLE_FEATURES = ("log_width", "log_height", "aspect", "band_p05", "band_p50", "band_p95", "dark_band", "band_noise",
                  "jpeg_quality", "bright_corners", "colour")
STYLE_TREE_SAMPLES = 20000
BAND = 0.1  # the outer band whose darkness and contrast describe framing and padding
# The IJG (libjpeg) luminance table at quality 50: encoders scale it by quality; the scale a file's
# table shows gives its quality back. Pillow reads the tables but does not estimate the quality.
_IJG_LUMA = np.array([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                      49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=float)


def jpeg_quality(quantization: dict | None) -> float:
    """The IJG quality (1-100) whose luminance table is closest to the file's; 100 when not a JPEG."""
    if not quantization or 0 not in quantization:
        return 100.0
    scale = 100.0 * float(np.mean(np.asarray(quantization[0], dtype=float))) / float(_IJG_LUMA.mean())
    return float(np.clip((200.0 - scale) / 2.0 if scale <= 100 else 5000.0 / scale, 1, 100))


def style_vector(grey: np.ndarray, colour: bool, quantization: dict | None = None) -> np.ndarray:
    """The ``STYLE_FEATURES`` of one image (``grey``: H x W in [0, 1] at its stored size).

    Grey levels and noise are taken from the outer band only: the centre holds the anatomy and
    any lesion, whose brightness would make "style" a measure of the disease itself."""
    h, w = grey.shape
    step = max(1, max(h, w) // 512)  # statistics on at most ~512 px a side: cheap, and enough
    g = grey[::step, ::step].astype(np.float32)
    bh, bw = max(2, int(BAND * g.shape[0])), max(2, int(BAND * g.shape[1]))
    bands = [g[:bh], g[-bh:], g[:, :bw].T, g[:, -bw:].T]  # each band laid out along its edge
    values = np.concatenate([b.ravel() for b in bands])
    # Noise: the median absolute difference between neighbours along each band, robust to edges.
    noise = np.median(np.concatenate([np.abs(np.diff(b, axis=1)).ravel() for b in bands if b.shape[1] > 1]))
    ch, cw = max(1, int(0.15 * g.shape[0])), max(1, int(0.15 * g.shape[1]))
    corners = np.concatenate([g[:ch, :cw].ravel(), g[:ch, -cw:].ravel(), g[-ch:, :cw].ravel(), g[-ch:, -cw:].ravel()])
    p05, p50, p95 = np.percentile(values, [5, 50, 95])
    return np.array([np.log(w), np.log(h), w / h, p05, p50, p95, float((values < 0.02).mean()), float(noise),
                     jpeg_quality(quantization), float((corners > 0.97).mean()), float(colour)], dtype=np.float64)


def _clusters(x: np.ndarray, labels: np.ndarray, seed: int, k: int) -> tuple[np.ndarray, list[dict]]:
    from sklearn.cluster import KMeans

    assign = KMeans(n_clusters=k, n_init=4, random_state=seed).fit_predict(x)
    rows = []
    for c in range(k):
        members = assign == c
        counts = Counter(labels[members])
        n = int(members.sum())
        rows.append({"cluster": c, "n": n, "by_class": {str(a): b for a, b in counts.most_common()},
                     "purity": round(counts.most_common(1)[0][1] / n, 4) if n else 0.0})
    return assign, sorted(rows, key=lambda r: -r["n"])


def style_confound(vectors: Sequence[np.ndarray], labels: Sequence[str], classes: list[str],
                   groups: Sequence[str] | None = None, seed: int = 42) -> dict:
    """Style clusters with their class purity, and the cross-validated ROC-AUC of a random
    forest on the style features alone (0.5: style says nothing of the class)."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.preprocessing import StandardScaler

    y = np.asarray(labels)
    if not cv_folds(y) or len(y) < 20:
        return {"n_images": len(y), "cv_auc": None, "flag": False, "clusters": [], "features": list(STYLE_FEATURES)}
    x = StandardScaler().fit_transform(np.stack(vectors))
    assign, rows = _clusters(x, y, seed, k=int(min(8, max(2, len(y) // 25))))
    # A forest: no scaling assumptions, non-linear (one class from two sites at both ends of a feature),
    # and, unlike histogram boosting with its 20-image leaves, it learns from a few dozen images too.
    # Beyond STYLE_TREE_SAMPLES images each tree sees a bootstrap sample of a fixed size (a share of
    # its training fold), so fitting the forest stops growing with the data; below, every image.
    model = RandomForestClassifier(n_estimators=200, min_samples_leaf=2, random_state=seed,
                                   max_samples=STYLE_TREE_SAMPLES / len(y) if len(y) > STYLE_TREE_SAMPLES else None)
    auc = cv_auc(model, x, y, groups, classes, seed)
    for row in rows:  # what each cluster looks like, in the features' own units
        members = np.stack(vectors)[assign == row["cluster"]]
        med = np.median(members, axis=0)
        row["looks"] = {"width": int(round(np.exp(med[0]))), "height": int(round(np.exp(med[1]))),
                        "dark_band": round(float(med[6]), 3), "jpeg_quality": round(float(med[8]), 1),
                        "band_median_grey": round(float(med[4]), 3)}
    pure = sum(r["n"] for r in rows if r["purity"] >= 0.95)
    return {"n_images": len(y), "features": list(STYLE_FEATURES), "cv_auc": round(auc, 4),
            "flag": abs(auc - 0.5) >= CONFOUND_AUC - 0.5, "clusters": rows, "share_in_pure_clusters": round(pure / len(y), 4)}
