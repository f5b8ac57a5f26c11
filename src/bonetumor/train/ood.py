"""Fitting the out-of-distribution check (model/ood.py) once training has its best weights.

The check is fitted on the per-stage backbone features of (at most ``MAX_TRAIN_IMAGES``)
training images and thresholded at a quantile of the validation images' scores: validation
images were not fitted, so their scores are what new images like the training data will show.
One plain, unaugmented pass of the best weights' backbone over both makes the features (the
frozen backbone's feature cache holds pooled features only).
"""

from __future__ import annotations

import time

import numpy as np
import torch

from bonetumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, create_transforms
from bonetumor.model.ood import (
    MAX_TRAIN_IMAGES,
    DetailStats,
    InputStats,
    distance_state,
    distance_threshold,
    fit_distance,
    stage_features,
)
from bonetumor.runtime.batchnorm import inference_folded
from bonetumor.runtime.precision import autocast
from bonetumor.train.batches import ImageDataset
from bonetumor.train.setup import TrainingRun


def fit_ood(r: TrainingRun) -> tuple[dict, dict]:
    """(the check's checkpoint weight entries, its record) for the run's model as it is now
    (the best epoch's weights)."""
    t0 = time.perf_counter()
    rng = np.random.default_rng(r.cfg.seed)
    train = r.index.split("train")
    keep = np.sort(rng.choice(len(train), min(len(train), MAX_TRAIN_IMAGES), replace=False))
    labels = np.array([r.index.classes.index(train[i].label) for i in keep])
    # both normalise back as create_transforms normalises
    pre = [InputStats(IMAGENET_MEAN, IMAGENET_STD).to(r.device), DetailStats(IMAGENET_MEAN, IMAGENET_STD).to(r.device)]
    train_feats = _features(r, [train[i] for i in keep], pre)
    valid_feats = _features(r, r.index.split("valid"), pre)
    detector = fit_distance(train_feats, labels, valid_feats, r.cfg.ood_quantile, pre[0].cpu(), pre[1].cpu())
    with torch.no_grad():
        valid = detector([torch.from_numpy(f) for f in valid_feats]).numpy()
        fitted = detector([torch.from_numpy(f) for f in train_feats]).numpy()
    threshold = distance_threshold(valid, r.cfg.ood_quantile)
    record = {"method": "Mahalanobis distance on the image's own statistics, on how its fine detail is spread and "
                        "per backbone stage (shared Ledoit-Wolf covariance, nearest class mean), the largest over "
                        "its validation quantile",
              "features": [int(f.shape[1]) for f in train_feats], "n_train": int(len(keep)), "n_valid": int(len(valid)),
              "quantile": float(r.cfg.ood_quantile), "threshold": threshold,
              "valid_flagged": float(np.mean(valid > threshold)) if len(valid) else float("nan"),
              "median_score": {"train": float(np.median(fitted)), "valid": float(np.median(valid))},
              "seconds": round(time.perf_counter() - t0, 2)}
    return distance_state(detector), record


@torch.inference_mode()
def _features(r: TrainingRun, samples, pre: list[torch.nn.Module]) -> list[np.ndarray]:
    """Per-stage features of ``samples`` (``stage_features``, the ``pre`` modules' first), read as for
    validation (no augmentation)."""
    cfg = r.cfg
    tf = create_transforms(False, cfg.image_size)
    loader = torch.utils.data.DataLoader(ImageDataset(samples, r.index.classes, tf, r.index.options),
                                         batch_size=cfg.batch_size, num_workers=cfg.workers,
                                         pin_memory=r.device.type == "cuda")
    out = []
    r.model.eval()
    with inference_folded(r.model), autocast(cfg.precision, r.device):
        for x, _, _ in loader:
            x = x.to(r.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            _, feats = stage_features(r.model, x, pre)
            out.append([f.float().cpu() for f in feats])
    return [torch.cat(stage).numpy() for stage in zip(*out)]
