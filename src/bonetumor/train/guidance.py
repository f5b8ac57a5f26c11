"""Lesion guidance: an auxiliary loss that keeps the positive class's Grad-CAM inside the lesion.

The method is the external supervision of GAIN (Li et al., "Tell Me Where to Look: Guided
Attention Inference Network", CVPR 2018, section 3.3): the network's own attention map of the
image's class is trained towards the lesion mask, end to end, beside the classification loss. The
map here is Grad-CAM of the last block (Selvaraju et al., 2017), the map ``explain`` draws and
scores, and the loss is one minus its energy inside the lesion (what ``explain`` measures) rather
than GAIN's squared error to the mask: it asks the evidence to lie in the lesion without asking it
to fill the lesion, which a classifier need not do.

The energy is taken before Grad-CAM's final ReLU, as the lesion's signed share of the map's
absolute mass, ``sum(cam * inside) / sum(|cam|)``. On a map with no negative values it is
``explain``'s energy; unlike the share of the rectified map, it keeps a gradient when every value
of a map is negative. With the rectified share, a push on the mass outside the lesion could
leave a map with no positive value at all, whose loss is flat: on a planted problem, maps died
that way within ten steps and stayed dead (the guided maps then put 0.0 of their mass in the
lesion against 0.04 unguided).

Grad-CAM weights are the gradients of the class score with respect to the last block's
activation ``A``, averaged over its positions. They come from ``torch.autograd.grad(...,
create_graph=True)``: the backward reaches only the pooling and the head, and the map stays
differentiable with respect to the head and (when it trains) the backbone, so that ``backward``
of the total loss trains both to move the evidence. Images without a mask, and for one logit
images of the negative class, add nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from bonetumor.model.backbones import BACKBONES
from bonetumor.task import Task


@contextmanager
def capture_activation(model: nn.Module, layer: str) -> Iterator[dict]:
    """While open, ``store["act"]`` is the named layer's output of the latest forward, in the
    autograd graph (a frozen layer's output is made a leaf that records its gradient)."""
    module = dict(model.named_modules())[layer]
    store: dict = {}

    def hook(_mod, _inp, out):
        act = out if out.requires_grad else out.detach().requires_grad_(True)
        store["act"] = act
        # A copy goes on: the next layer may work in place (DenseNet's final ReLU), which
        # would change the recorded activation under autograd.
        return act.clone()

    handle = module.register_forward_hook(hook)
    try:
        yield store
    finally:
        handle.remove()


def gradcam(score: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Grad-CAM maps (N, h, w) of per-image scores ``score`` (N,) at activation ``act`` (N, C, h, w)
    before the final ReLU, differentiable (the gradients are taken with ``create_graph``)."""
    (grad,) = torch.autograd.grad(score.sum(), act, create_graph=True)
    weights = grad.float().mean(dim=(2, 3))
    return (weights[:, :, None, None] * act.float()).sum(1)


def outside_share(cams: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per map (before the ReLU), one minus the lesion's signed share of its absolute mass: 0 when
    all of it is positive and inside the lesion, 1 for a map that is nonnegative and wholly outside,
    up to 2 for one negative inside. ``masks`` (N, H, W) boolean at the input's size are averaged to
    the map's cells (the fraction of each cell inside the lesion). A map of zeros counts 1."""
    inside = F.adaptive_avg_pool2d(masks[:, None].float(), cams.shape[-2:])[:, 0]
    total = cams.abs().sum(dim=(1, 2))
    energy = (cams * inside).sum(dim=(1, 2)) / total.clamp_min(1e-12)
    return torch.where(total > 0, 1 - energy, torch.ones_like(energy))


def guided_images(y: torch.Tensor, masks: torch.Tensor, task: Task) -> torch.Tensor:
    """Which images the guidance applies to: those with a lesion in their mask, and for one logit
    only those of the positive class (the class whose evidence should lie in the lesion)."""
    has = masks.flatten(1).any(1)
    return has & (y == 1) if task.binary else has


def guided_forward(net: nn.Module, x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor,
                   task: Task) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The logits of ``net`` (a ``Classifier``, or one wrapped in DistributedDataParallel) for
    ``x``, and per guided image the true class's Grad-CAM's ``outside_share`` (None when the
    batch has no guided image). Under DDP the map's gradient is taken with respect to an
    activation, not the weights, so the weights' gradients still come once, from ``backward``."""
    inner = getattr(net, "module", net)
    layer = BACKBONES[inner.backbone_name]["cam_layer"]
    with capture_activation(inner, layer) as store:
        logits = net(x)
    keep = guided_images(y, masks, task)
    if not bool(keep.any()):
        return logits, None
    score = task.class_score(logits.float(), y)
    # Gradients of the guided images' scores only: the others' add nothing to their maps.
    cams = gradcam(score * keep, store["act"])
    return logits, outside_share(cams[keep], masks[keep])
