"""How well a heatmap matches the lesion, and how faithful it is to the model.

Localization (map vs ground-truth mask): pointing game, energy inside the lesion, IoU of the
map's top-15% region. Each is compared with a centred Gaussian baseline map, so that a number
means something (lesions near the centre make any centred blob look good).
Faithfulness (map vs model): deletion and insertion AUC.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from bonetumor.runtime.batchnorm import inference_folded
from bonetumor.task import Task


def map_peak(cam: np.ndarray, rtol: float = 1e-6) -> tuple[int, int]:
    """Position of the map's maximum.

    A coarse map upsampled bilinearly has flat plateaus (a whole corner block at the image
    edge holds the same value); ``np.argmax`` would then always answer the plateau's first
    pixel in raster order, at the border. Here the answer is the plateau pixel nearest to
    the plateau's centroid.
    """
    top = cam >= cam.max() - rtol * max(abs(float(cam.max())), 1e-12)
    ys, xs = np.nonzero(top)
    i = int(np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2))
    return int(ys[i]), int(xs[i])


def pointing_hit(cam: np.ndarray, mask: np.ndarray) -> bool:
    """True when the map's maximum lies inside the lesion."""
    return bool(mask[map_peak(cam)])


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float:
    """Fraction of the map's mass inside the lesion (0 for an all-zero map)."""
    total = float(cam.sum())
    return float(cam[mask].sum()) / total if total > 0 else 0.0


def top_region_iou(cam: np.ndarray, mask: np.ndarray, fraction: float = 0.15) -> float:
    """IoU between the lesion and the ``fraction`` of pixels where the map is highest."""
    k = max(1, int(round(fraction * cam.size)))
    top = np.zeros(cam.size, dtype=bool)
    top[np.argsort(cam.reshape(-1), kind="stable")[-k:]] = True
    top = top.reshape(cam.shape)
    union = np.logical_or(top, mask).sum()
    return float(np.logical_and(top, mask).sum() / union) if union else 0.0


def localization_scores(cam: np.ndarray, mask: np.ndarray) -> dict[str, float]:
    """All three scores for one map and its boolean lesion mask (same shape)."""
    return {"pointing": float(pointing_hit(cam, mask)), "energy": energy_inside(cam, mask),
            "iou_top15": top_region_iou(cam, mask)}


def gaussian_baseline(shape: tuple[int, int], sigma: float = 0.25) -> np.ndarray:
    """A centred Gaussian map (sigma as a fraction of each side): the 'looks at the middle' baseline."""
    h, w = shape
    yy = (np.arange(h) + 0.5) / h - 0.5
    xx = (np.arange(w) + 0.5) / w - 0.5
    g = np.exp(-(yy[:, None] ** 2 + xx[None, :] ** 2) / (2 * sigma**2))
    return (g / g.max()).astype(np.float32)


def bootstrap_ci(values, n_resamples: int = 1000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Mean and percentile bootstrap CI.

    Written here because scipy.stats.bootstrap returns NaN for a constant sample (for example
    every pointing-game trial a hit), where the right answer is the degenerate interval.
    """
    v = np.asarray(values, dtype=float)
    if len(v) == 0:
        return {"value": float("nan"), "ci_low": float("nan"), "ci_high": float("nan"), "n": 0}
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_resamples, len(v)))].mean(1)
    a = (1 - level) / 2
    return {"value": float(v.mean()), "ci_low": float(np.quantile(means, a)),
            "ci_high": float(np.quantile(means, 1 - a)), "n": int(len(v))}


@torch.inference_mode()
def deletion_insertion(model: torch.nn.Module, x: torch.Tensor, maps: torch.Tensor, target_index: torch.Tensor,
                       steps: int = 10, task: Task = Task(("normal", "cancer"))) -> tuple[np.ndarray, np.ndarray]:
    """Deletion and insertion AUC per image (Petsiuk et al., 2018).

    Pixels are removed (deletion: replaced by a blurred copy) or revealed (insertion: starting
    from the blurred copy) in order of the map, ``steps`` equal chunks; the score is the
    probability of the explained class (``target_index``; ``task``: what the model's outputs
    mean). Lower deletion and higher insertion mean a more faithful map.
    """
    n, _, h, w = x.shape
    blurred = F.avg_pool2d(x, 11, stride=1, padding=5, count_include_pad=False)
    order = maps.reshape(n, -1).argsort(dim=1, descending=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=x.device).expand(n, -1))
    rank = rank.reshape(n, 1, h, w)
    dele, ins = [], []
    with inference_folded(model):  # 2 x (steps + 1) forward passes: BatchNorms folded once for all
        for k in range(steps + 1):
            top = rank < round(k / steps * h * w)
            for out, start, fill in ((dele, x, blurred), (ins, blurred, x)):
                logits = model(torch.where(top, fill, start)).float()
                out.append(task.class_probability(logits, target_index).cpu().numpy())
    t = np.linspace(0, 1, steps + 1)
    return np.trapezoid(np.stack(dele, 1), t, axis=1), np.trapezoid(np.stack(ins, 1), t, axis=1)
