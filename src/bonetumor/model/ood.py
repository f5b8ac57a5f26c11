"""Out-of-distribution check: is an image unlike the images the model was trained on?

A classifier gives every input a probability, an MRI slice sent to a radiograph model
included. The check measures how far an image's features lie from the training images': at
each backbone stage after the stem, the squared Mahalanobis distance of the stage's
channel means to the nearest class mean under one shared covariance (Lee et al., "A Simple
Unified Framework for Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS
2018, with its feature ensemble over layers). Each stage's distance is divided by that stage's
``quantile`` over the validation images, and the largest ratio is the image's score. An image
is "unlike the training data" when its score exceeds the same quantile of the validation
images' scores, so about ``1 - quantile`` of images like the training data are flagged by chance.

Why every stage: early stages carry acquisition style (modality, contrast, texture), the last
one content. On synthetic data, the last stage alone flagged 18-32% of radiographs sent to an
MRI model at the 0.99 quantile, the first stage after the stem 100%. Why each stage over its own
high quantile, not its median: the deeper stages' distances are heavy-tailed even for images
like the training data (validation images up to 40 times the median), and scaled by the median
they set a threshold that let 82% of those radiographs through; scaled by their own 0.99
quantile, 100% were flagged and 0-3% of the model's own test images (tests/model/test_ood.py).

The covariance is scikit-learn's Ledoit-Wolf shrinkage estimate. pytorch-ood's ``Mahalanobis``
detector computes the last-stage score, but inverts the raw scatter matrix with a 1e-6 ridge:
with fewer training images than feature dimensions (2,048 for ResNet50's last stage; common
here) that matrix is singular and the distances are numerical noise. Shrinkage keeps it
well-conditioned.

Why the input's own statistics as one more "stage": a model trained from scratch on a few
thousand images has weak early features, and the stem's channel means miss what a reader sees
at once (MRI speckle against a radiograph's flat background and collimation). ``InputStats``
gives the check the grey-level and gradient histograms, the Laplacian energy and an 8x8
thumbnail of the image itself. On the demo's synthetic MRI, a model trained on it flagged
87.5% of the shared set's test radiographs with the backbone stages alone and 96.5% with the
input stage added, 1% of its own test split either way (docs/results.md).

Why a separate, four-number "detail" stage (``DetailStats``): the reverse case, a model trained
on the shared radiographs shown synthetic MRI, flagged 0.3% of the slices with the stages above.
Radiographs come from many sources, so every broad statistic (and every stage of a model trained
on them from scratch) spreads wide enough to hold an MRI slice. What tells them apart is how the
fine detail is spread: a radiograph is smooth between edges, so most pixels' |Laplacian| lies far
below its image mean and the detail grows at coarser scales; MRI noise fills the field of view,
so |Laplacian| is nearly uniform and shrinks at coarser scales. Four numbers say that (the
share of pixels below half the mean |Laplacian| at full and half resolution, and the log ratio
of mean |Laplacian| between successive halvings). Kept as their own stage, a Mahalanobis distance
over four dimensions is not diluted by 89 others: the radiograph model then flagged 95.3% of
the synthetic MRI and 1.5% of its own test split (docs/results.md).

The check lives in the model as a submodule (``Classifier.ood``: per stage the class means and
the precision matrix, and the stages' scales, as buffers), so a checkpoint's checksum covers
it, it moves with the model, and an exported ONNX graph computes it as a second output
(``WithDistance``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from bonetumor.model.backbones import BACKBONES
from bonetumor.runtime.recompute import pool_tail

DEFAULT_QUANTILE = 0.99
MAX_TRAIN_IMAGES = 2000  # training images the check is fitted on at most (a random, seeded subset)


GREY_EDGES = tuple(i / 16 for i in range(1, 16))  # cumulative grey histogram, intensities in [0, 1]
GRADIENT_EDGES = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32)  # cumulative histogram of |gradient|
THUMBNAIL = 8  # the image's layout as an 8x8 grid of mean grey levels


class InputStats(nn.Module):
    """Normalised model input -> (N, 89) statistics of the image itself: its cumulative grey
    and gradient-magnitude histograms, mean |Laplacian|, mean and standard deviation of grey,
    and an 8x8 thumbnail. Written with plain tensor ops (no ``histc``) so that an exported
    graph computes them too."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            grey = (x.float() * self.std + self.mean).mean(1)  # back to [0, 1] intensities
            n, h, w = grey.shape
            # One image-sized comparison per edge, not one (pixels x edges) tensor: the same counts,
            # and OpenVINO runs it 4x faster (the big tensor cost 7% of an int8 ResNet50's time).
            hist = torch.stack([(grey <= e).float().mean((1, 2)) for e in GREY_EDGES], 1)
            gx, gy = grey[:, 1:, 1:] - grey[:, 1:, :-1], grey[:, 1:, 1:] - grey[:, :-1, 1:]
            gradient = torch.sqrt(gx * gx + gy * gy)
            ghist = torch.stack([(gradient <= e).float().mean((1, 2)) for e in GRADIENT_EDGES], 1)
            lap = (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
                   - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).abs().mean((1, 2))
            k = min(h, w) // THUMBNAIL  # a fixed kernel, not adaptive pooling: exports at any size
            thumb = nn.functional.avg_pool2d(grey[:, None, : k * THUMBNAIL, : k * THUMBNAIL], k).reshape(n, -1)
            return torch.cat([hist, ghist, lap[:, None], grey.mean((1, 2))[:, None], grey.std((1, 2))[:, None], thumb], 1)


def _abs_laplacian(grey: torch.Tensor) -> torch.Tensor:
    """(N, H, W) -> (N, (H-2)(W-2)): |5-point Laplacian| at each inner pixel."""
    return (4 * grey[:, 1:-1, 1:-1] - grey[:, :-2, 1:-1] - grey[:, 2:, 1:-1]
            - grey[:, 1:-1, :-2] - grey[:, 1:-1, 2:]).abs().flatten(1)


class DetailStats(InputStats):
    """Normalised model input -> (N, 4): how the image's fine detail is spread (module
    docstring): the share of pixels whose |Laplacian| is below half its image mean, at full and
    half resolution, and log(mean |Laplacian| at half / at full resolution) and (quarter / half)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            grey = (x.float() * self.std + self.mean).mean(1, keepdim=True)
            half = nn.functional.avg_pool2d(grey, 2)
            laps = [_abs_laplacian(g[:, 0]) for g in (grey, half, nn.functional.avg_pool2d(half, 2))]
            means = [lap.mean(1) + 1e-6 for lap in laps]  # + 1e-6: a flat image gives 0 / 0 otherwise
            quiet = [(lap < 0.5 * m[:, None]).float().mean(1) for lap, m in zip(laps[:2], means)]
            return torch.stack([*quiet, torch.log(means[1] / means[0]), torch.log(means[2] / means[1])], 1)


def stage_features(model: nn.Module, x: torch.Tensor, pre: nn.Module | list[nn.Module] | None = None
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(the pooled features the head takes, as ``model.backbone(x)`` gives them; the channel
    means of each stage after the stem, the last being the pooled features, after ``m(x)`` for
    each image-statistics module ``m`` in ``pre``) in one pass."""
    spec = BACKBONES[model.backbone_name]
    named = dict(model.backbone.named_modules())
    pre = [] if pre is None else [pre] if isinstance(pre, nn.Module) else pre
    means = [m(x) for m in pre]
    for i, stage in enumerate(spec["stages"]):
        for name in stage:
            x = named[name](x)
        if 0 < i < len(spec["stages"]) - 1:
            means.append(x.float().mean((2, 3)))
    pooled = pool_tail(x, spec["relu_tail"])
    return pooled, means + [pooled.float()]


class Distance(nn.Module):
    """Per-stage features -> the image's score: the largest over stages of the squared
    Mahalanobis distance to the nearest class mean, over that stage's validation quantile."""

    def __init__(self, means: list[torch.Tensor], precisions: list[torch.Tensor], scales: torch.Tensor,
                 inputs: InputStats | None = None, detail: DetailStats | None = None):
        super().__init__()
        self.inputs = inputs  # the first stage, when set (checkpoints before it have none)
        self.detail = detail  # the stage after it, when set (checkpoints before it have none)
        self.n_stages = len(means)
        for i, (m, p) in enumerate(zip(means, precisions)):
            self.register_buffer(f"means_{i}", m.float())
            self.register_buffer(f"precision_{i}", p.float())
        self.register_buffer("scales", scales.float())

    @classmethod
    def empty(cls, shapes: list[tuple[int, int]], inputs: bool = False, detail: bool = False) -> "Distance":
        """A detector of these (classes, features) shapes per stage, to load a checkpoint into."""
        return cls([torch.zeros(c, d) for c, d in shapes], [torch.zeros(d, d) for _, d in shapes],
                   torch.ones(len(shapes)), InputStats(torch.zeros(3), torch.ones(3)) if inputs else None,
                   DetailStats(torch.zeros(3), torch.ones(3)) if detail else None)

    def pre_stages(self) -> list[nn.Module]:
        """The image-statistics modules whose outputs come before the backbone stages."""
        return [m for m in (self.inputs, self.detail) if m is not None]

    def stage_distances(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(N, stages) squared distances to the nearest class mean, unscaled."""
        # fp32 even inside a bf16 autocast: sums over thousands of squared terms in bf16 would
        # move scores near the threshold across it.
        with torch.autocast(feats[0].device.type, enabled=False):
            out = []
            for i, f in enumerate(feats):
                centred = f.float()[:, None, :] - getattr(self, f"means_{i}")[None]  # (N, C, D)
                out.append(((centred @ getattr(self, f"precision_{i}")) * centred).sum(-1).min(dim=1).values)
            return torch.stack(out, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return (self.stage_distances(feats) / self.scales).max(dim=1).values


def fit_distance(train: list[np.ndarray], labels: np.ndarray, valid: list[np.ndarray],
                 quantile: float = DEFAULT_QUANTILE, inputs: InputStats | None = None,
                 detail: DetailStats | None = None) -> Distance:
    """The detector fitted on the training images' per-stage features ``train`` with their class
    ``labels``: a mean per class and one Ledoit-Wolf covariance of the class-centred features per
    stage, each stage scaled by the ``quantile`` of its distances over the validation images'
    features ``valid``. ``inputs``, ``detail``: the modules that made the first stages, if they did."""
    from sklearn.covariance import (
        LedoitWolf,  # scikit-learn only where a detector is fitted
    )

    y = np.asarray(labels)
    classes = np.unique(y)
    means, precisions = [], []
    for x in train:
        x = np.asarray(x, dtype=np.float64)
        m = np.stack([x[y == c].mean(axis=0) for c in classes])
        precision = LedoitWolf(assume_centered=True).fit(x - m[np.searchsorted(classes, y)]).precision_
        means.append(torch.from_numpy(m))
        precisions.append(torch.from_numpy(precision))
    detector = Distance(means, precisions, torch.ones(len(train)), inputs, detail)
    with torch.no_grad():
        d = detector.stage_distances([torch.from_numpy(np.asarray(v, dtype=np.float32)) for v in valid])
    detector.scales.copy_(torch.from_numpy(np.quantile(d.double().numpy(), quantile, axis=0)).clamp_min(1e-12))
    return detector


def distance_threshold(valid_scores: np.ndarray, quantile: float = DEFAULT_QUANTILE) -> float:
    """The score above which an image is flagged: the ``quantile`` of the validation images'."""
    return float(np.quantile(np.asarray(valid_scores, dtype=np.float64), quantile))


def attach_distance(model: nn.Module, state: dict) -> None:
    """Give ``model`` an empty ``ood`` submodule when the weights ``state`` hold one, so that
    ``load_state_dict`` fills it (a checkpoint written before the check has none)."""
    shapes, i = [], 0
    while f"ood.means_{i}" in state:
        shapes.append(tuple(int(n) for n in state[f"ood.means_{i}"].shape))
        i += 1
    if shapes:
        model.ood = Distance.empty(shapes, inputs="ood.inputs.mean" in state, detail="ood.detail.mean" in state)


def distance_state(detector: Distance) -> dict:
    """The detector's buffers as checkpoint weight entries (``ood.means_0``, ...)."""
    return {f"ood.{k}": v.detach().cpu() for k, v in detector.state_dict().items()}


class WithDistance(nn.Module):
    """A classifier with an ``ood`` detector as one module: images -> (logits, distances).

    It computes the backbone once for both; the logits are the classifier's own (with its
    temperature). What inference runs, compiles and exports when a model has the check.
    """

    def __init__(self, classifier: nn.Module):
        super().__init__()
        self.classifier = classifier

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.classifier
        pooled, feats = stage_features(c, x, c.ood.pre_stages())
        logits = c.head(pooled)
        if c.temperature != 1.0:
            logits = logits / c.temperature
        return logits, c.ood(feats)


def inference_module(model: nn.Module) -> nn.Module:
    """What inference calls: ``WithDistance(model)`` when the model has the check, else the model."""
    return WithDistance(model) if getattr(model, "ood", None) is not None else model


def flagged(distances: np.ndarray | None, record: dict | None) -> np.ndarray | None:
    """Whether each distance lies beyond the stored threshold (None without a check)."""
    if distances is None or not record:
        return None
    return np.asarray(distances) > float(record["threshold"])


OOD_FIELDS = ("ood_distance", "unlike_training")  # what a prediction row gains from the check


@torch.inference_mode()
def image_distances(model: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The distances of an input batch ``x`` (one backbone pass), or None without a check; for
    callers whose forward pass does not go through ``WithDistance`` (Grad-CAM's)."""
    if getattr(model, "ood", None) is None:
        return None
    return model.ood(stage_features(model, x, model.ood.pre_stages())[1]).cpu()


def ood_summary(rows: list[dict], record: dict | None) -> dict:
    """How many of the prediction ``rows`` are unlike the training data, with the check's
    threshold; ``{"checked": False}`` for a model without the check."""
    if not record:
        return {"checked": False}
    checked = [r for r in rows if "unlike_training" in r]
    n = sum(bool(r["unlike_training"]) for r in checked)
    return {"checked": True, "flagged": n, "of": len(checked), "rate": n / len(checked) if checked else None,
            "threshold": float(record["threshold"]), "quantile": float(record["quantile"])}
