"""Class activation maps: Grad-CAM, Grad-CAM++ and Eigen-CAM, batched.

Written here rather than taken from a CAM library: Captum has Grad-CAM but neither
Grad-CAM++ nor Eigen-CAM, and pytorch-grad-cam (with OpenCV and ttach) calls ``backward()``,
which on a fine-tuned model also computes every trainable parameter's gradient. Here one code path
serves all three methods: a forward hook swaps the target layer's output for a detached leaf
and parameters stop requiring gradients for the call, so autograd records nothing below the
target layer and the backward pass runs only through the small tail (pooling + head), so
Grad-CAM costs about one forward pass (docs/performance.md). The tests hold it equal to Captum.

Binary models with one logit: the score for the positive class is +logit and for the negative
class -logit, so a map for a wrong prediction still shows evidence for the class asked for.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bonetumor.errors import BonetumorError
from bonetumor.runtime.batchnorm import inference_folded
from bonetumor.runtime.precision import autocast
from bonetumor.task import Task

METHODS = ("gradcam", "gradcam++", "eigencam")
FOLD_MIN_BATCH = 4  # batches from this size on run with BatchNorms folded (see compute_cams)


@dataclass
class CamResult:
    """Maps in [0, 1] at the input's size, the model's probabilities and the explained class."""

    maps: torch.Tensor  # (N, H, W) float32 in [0, 1]
    raw: torch.Tensor  # (N, h, w) at the target layer's resolution, before normalisation
    probs: torch.Tensor  # (N,) P(positive) for binary, else (N, C)
    target_index: torch.Tensor  # (N,) class index explained
    predicted: torch.Tensor  # (N,) class index predicted (binary: P >= threshold)


def layer_names(model: nn.Module, depth: int = 3) -> list[str]:
    """Module names up to ``depth`` dots deep: the valid choices for ``--layer``."""
    return [n for n, _ in model.named_modules() if n and n.count(".") < depth]


def resolve_layer(model: nn.Module, name: str) -> nn.Module:
    """The module called ``name``; an unknown name lists the valid ones."""
    modules = dict(model.named_modules())
    if name not in modules or not name:
        valid = [n for n in layer_names(model, 2) if n.startswith("backbone.")]
        raise BonetumorError(f"--layer {name!r}: no such module; valid layers include {', '.join(valid)}")
    return modules[name]


@contextmanager
def _explaining(model: nn.Module) -> Iterator[None]:
    """Eval mode and no parameter gradients while explaining; restores both afterwards."""
    flags = [p.requires_grad for p in model.parameters()]
    was_training = model.training
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


@contextmanager
def _capture(layer: nn.Module, as_leaf: bool) -> Iterator[dict]:
    """Record the layer's output; with ``as_leaf`` replace it by a leaf that collects gradients."""
    store: dict = {}

    def hook(_mod, _inp, out):
        if as_leaf:
            store["act"] = out.detach().requires_grad_(True)
            # A copy goes on: the layer after may work in place (ResNet adds the shortcut into a
            # bn3's output), which autograd refuses on a leaf and which would change the record.
            return store["act"].clone()
        store["act"] = out
        return out

    handle = layer.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def _select_scores(logits: torch.Tensor, target: str | int, task: Task, predicted: torch.Tensor):
    """Per-image score to explain, and the class index it stands for."""
    if target == "predicted":
        idx = predicted
    else:
        i = target if isinstance(target, int) else _class_index(target, list(task.classes))
        idx = torch.full((len(logits),), i, dtype=torch.long, device=logits.device)
    return task.class_score(logits, idx), idx


def _class_index(name: str, classes: list[str]) -> int:
    if name not in classes:
        raise BonetumorError(f"--target {name!r}: choose predicted or one of {', '.join(classes)}")
    return classes.index(name)


def _normalise(cam: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Upsample to ``size`` and scale each map to [0, 1]; a flat map becomes zeros.

    Bicubic rather than the usual bilinear: a bilinear map's maximum always sits exactly on a
    cell centre, so its peak can only move in steps of a whole cell (16-32 px); bicubic lets it
    fall between two cells, towards the stronger neighbour, as heat-map keypoint detectors refine
    their peaks. Its overshoot is clipped to the coarse map's own range.
    """
    cam = cam[:, None].float()
    up = F.interpolate(cam, size=size, mode="bicubic", align_corners=False)
    up = torch.maximum(torch.minimum(up, cam.amax(dim=(2, 3), keepdim=True)), cam.amin(dim=(2, 3), keepdim=True))[:, 0]
    lo = up.amin(dim=(1, 2), keepdim=True)
    hi = up.amax(dim=(1, 2), keepdim=True)
    span = hi - lo
    return torch.where(span > 1e-12, (up - lo) / span.clamp_min(1e-12), torch.zeros_like(up))


def _weights_gradcam_pp(act: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    # Chattopadhyay et al. (2018), eq. 19, with the exponential-score simplification used widely.
    g2, g3 = grad.pow(2), grad.pow(3)
    denom = 2 * g2 + act.sum(dim=(2, 3), keepdim=True) * g3
    alpha = torch.where(grad != 0, g2 / torch.where(denom != 0, denom, torch.ones_like(denom)), torch.zeros_like(g2))
    return (alpha * grad.clamp_min(0)).sum(dim=(2, 3))


def _eigencam(act: torch.Tensor) -> torch.Tensor:
    """First principal component of the activations at each position (class-agnostic)."""
    n, c, h, w = act.shape
    a = act.float().reshape(n, c, h * w).transpose(1, 2)  # (N, hw, C)
    a = a - a.mean(dim=1, keepdim=True)
    _, _, vh = torch.linalg.svd(a, full_matrices=False)
    proj = (a @ vh[:, 0, :, None])[..., 0]  # (N, hw)
    # The sign of a principal component is arbitrary: orient it with the mean activation.
    mean_act = act.float().mean(1).reshape(n, h * w)
    sign = torch.sign(((proj - proj.mean(1, keepdim=True)) * (mean_act - mean_act.mean(1, keepdim=True))).sum(1))
    sign = torch.where(sign == 0, torch.ones_like(sign), sign)
    return (proj * sign[:, None]).clamp_min(0).reshape(n, h, w)


def _default_classes(n_outputs: int) -> list[str]:
    return ["normal", "cancer"] if n_outputs == 1 else [str(i) for i in range(n_outputs)]


def compute_cams(model: nn.Module, x: torch.Tensor, layer: str, method: str = "gradcam",
                 target: str | int = "predicted", classes: list[str] | None = None, threshold: float = 0.5,
                 precision: str = "fp32") -> CamResult:
    """Class activation maps for a batch ``x`` (N, 3, H, W) in one forward (and one backward).

    Args:
        layer: module name, e.g. ``backbone.layer4``.
        method: gradcam, gradcam++ or eigencam.
        target: ``predicted``, a class name or a class index.
        classes: the model's classes (default: normal, cancer for one output).
        precision: ``fp32``, ``bf16`` or (CUDA) ``fp16``.

    The model's mode and parameter gradient flags are restored on return.
    """
    if method not in METHODS:
        raise BonetumorError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    module = resolve_layer(model, layer)
    # BatchNorms folded into their convolutions (eval mode: see runtime/batchnorm.py), all but the
    # watched layer's own pair, whose output must stay what it is. Folding is one pass over the
    # weights per call, which pays only from a few images on (docs/performance.md).
    fold = inference_folded(model, keep=module) if len(x) >= FOLD_MIN_BATCH else nullcontext(0)
    with _explaining(model), fold, _capture(module, as_leaf=method != "eigencam") as store:  # entered in this order
        with torch.enable_grad() if method != "eigencam" else torch.inference_mode():
            with autocast(precision, x.device):
                logits = model(x)
            task = Task.of(classes or _default_classes(logits.shape[1]))
            probs = task.probabilities(logits.detach().float())
            predicted = task.indices(probs, threshold)
            score, idx = _select_scores(logits.float(), target, task, predicted)
            act = store["act"]
            if method == "eigencam":
                raw = _eigencam(act)
            else:
                (grad,) = torch.autograd.grad(score.sum(), act)
                act, grad = act.detach().float(), grad.float()
                weights = grad.mean(dim=(2, 3)) if method == "gradcam" else _weights_gradcam_pp(act, grad)
                raw = torch.relu((weights[:, :, None, None] * act).sum(1))
    return CamResult(_normalise(raw.detach(), tuple(x.shape[-2:])), raw.detach().float(), probs, idx.detach(),
                     predicted)
