"""Where a model looked that no lesion is: the image's margins and its burned-in markers.

A model that learnt the source of its images rather than the disease finds its evidence where
sources differ: padding and borders, collimation edges, the letters and rulers a scanner burns
into a corner. For each heatmap this measures the share of its mass in the outer band of the
image and on bright burned-in marks, beside the share of the image's area they cover (a map that
ignored them would put about that share there). Over an evaluation, a warning when the maps
live in the margins or on the markers.
"""

from __future__ import annotations

import numpy as np

BAND = 0.10  # the outer 10% of each side
MARKER_GREY = 0.98  # burned-in text and markers are drawn at (near) full white
MARKER_MAX_AREA = 0.05  # more bright pixels than this is saturated anatomy or background, not marks
MARKER_DILATE = 0.02  # of the image side: the map is coarse, a thin letter gets a margin around it
WARN_RATIO = 1.5  # the maps hold this many times their region's area share ...
WARN_MARGIN = 0.5  # ... and at least this share of their mass in the margins
WARN_MARKER = 0.2  # ... or this share on markers


def band_mask(shape: tuple[int, int], band: float = BAND) -> np.ndarray:
    """True on the outer ``band`` of each side."""
    h, w = shape
    bh, bw = max(1, int(round(band * h))), max(1, int(round(band * w)))
    m = np.ones((h, w), dtype=bool)
    m[bh:h - bh, bw:w - bw] = False
    return m


def marker_mask(grey: np.ndarray) -> np.ndarray | None:
    """Burned-in marks: near-white pixels, grown a little; None when there are none (or so many
    bright pixels that they are not marks)."""
    from scipy.ndimage import binary_dilation

    bright = grey >= MARKER_GREY
    if not bright.any() or bright.mean() > MARKER_MAX_AREA:
        return None
    r = max(1, int(round(MARKER_DILATE * max(grey.shape))))
    return binary_dilation(bright, structure=np.ones((2 * r + 1, 2 * r + 1), dtype=bool))


def mass_share(cam: np.ndarray, region: np.ndarray) -> float:
    """Share of the map's mass inside ``region`` (0 for an all-zero map)."""
    total = float(cam.sum())
    return float(cam[region].sum()) / total if total > 0 else 0.0


def margin_scores(cam: np.ndarray, grey: np.ndarray) -> dict:
    """For one map and its image (same H x W, grey in [0, 1]): the map's mass share and the area
    share of the outer band and, when found, of the burned-in markers."""
    band = band_mask(cam.shape)
    out = {"margin_share": round(mass_share(cam, band), 4), "margin_area": round(float(band.mean()), 4)}
    marks = marker_mask(grey)
    if marks is not None:
        out.update(marker_share=round(mass_share(cam, marks), 4), marker_area=round(float(marks.mean()), 4))
    return out


def margin_summary(rows: list[dict]) -> dict | None:
    """Over the explained images: mean shares with their areas, and a warning when the maps live
    in the margins or on the markers (None when no image was scored)."""
    scored = [r for r in rows if "margin_share" in r]
    if not scored:
        return None
    share = float(np.mean([r["margin_share"] for r in scored]))
    area = float(np.mean([r["margin_area"] for r in scored]))
    out = {"n": len(scored), "margin_share": round(share, 4), "margin_area": round(area, 4), "band": BAND}
    marked = [r for r in scored if "marker_share" in r]
    warnings = []
    if share >= WARN_MARGIN and share >= WARN_RATIO * area:
        warnings.append(f"the heatmaps put {share:.0%} of their mass in the outer {BAND:.0%} band of the image, which "
                        f"covers {area:.0%} of it: the model lives in the margins (borders, padding, collimation), "
                        "where sources differ, not in the anatomy")
    if marked:
        m_share = float(np.mean([r["marker_share"] for r in marked]))
        m_area = float(np.mean([r["marker_area"] for r in marked]))
        out.update(n_with_markers=len(marked), marker_share=round(m_share, 4), marker_area=round(m_area, 4))
        if m_share >= WARN_MARKER and m_share >= WARN_RATIO * m_area:
            warnings.append(f"on the {len(marked)} images with burned-in markers the heatmaps put {m_share:.0%} of their "
                            f"mass on the markers, which cover {m_area:.0%} of the image: the model reads the labels")
    out["warning"] = "; ".join(warnings)
    return out
