"""Recompute the first backbone stages in the backward pass instead of keeping their outputs.

Fine-tuning keeps every layer's output until the backward pass needs it: at batch 32 and
224 px, ResNet50 keeps 2.7 GB in fp32 (1.3 GB in bf16 autocast), and the first stages keep the
most per FLOP (the stem's 112x112 maps and max-pool indices: 11% of the bytes for 3% of the
forward FLOPs). A recomputed stage keeps only its input and runs its forward again during
backward (``torch.utils.checkpoint``): the stem costs about 1% more time per training step,
each further stage more (benchmarks/training_memory.py measures both).

Batch norm in training mode updates its running statistics on every forward, so the
recomputation would count each batch twice; the statistics are restored after it, which keeps
the model exactly what it would be without recomputation (tested).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Each backbone as five stages of module names (under ``Classifier.backbone``), stem first,
# as its torchvision forward runs them; the tail (pooling) follows in ``_tail``.
STAGES: dict[str, list[tuple[str, ...]]] = {
    "resnet50": [("conv1", "bn1", "relu", "maxpool"), ("layer1",), ("layer2",), ("layer3",), ("layer4",)],
    "densenet121": [("features.conv0", "features.norm0", "features.relu0", "features.pool0"),
                    ("features.denseblock1", "features.transition1"), ("features.denseblock2", "features.transition2"),
                    ("features.denseblock3", "features.transition3"), ("features.denseblock4", "features.norm5")],
    "efficientnet_b0": [("features.0",), ("features.1", "features.2"), ("features.3",), ("features.4", "features.5"),
                        ("features.6", "features.7", "features.8")],
}
def _tail(backbone: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """What the torchvision forward does after the last stage (its classifier is an Identity)."""
    if name == "densenet121":
        x = F.relu(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


@contextmanager
def _keep_batchnorm_statistics(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Undo the running-statistics updates that a recomputed forward makes."""
    bns = [m for mod in modules for m in mod.modules()
           if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.track_running_stats]
    saved = [[b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked) if b is not None] for m in bns]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, old in zip(bns, saved):
                for buf, value in zip([b for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                                       if b is not None], old):
                    buf.copy_(value)


def _run(modules: Sequence[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in modules:
        x = m(x)
    return x


def recompute_forward(backbone: nn.Module, name: str, n_stages: int, x: torch.Tensor) -> torch.Tensor:
    """The backbone's pooled features, as its own forward gives them, with the first
    ``n_stages`` stages recomputed in backward (where anything in or before them trains)."""
    named = dict(backbone.named_modules())
    grad = x.requires_grad
    for i, stage in enumerate(STAGES[name]):
        mods = [named[n] for n in stage]
        grad = grad or any(p.requires_grad for m in mods for p in m.parameters())
        if i < n_stages and grad:
            x = checkpoint(_run, mods, x, use_reentrant=False,
                           context_fn=lambda mods=mods: (nullcontext(), _keep_batchnorm_statistics(mods)))
        else:
            x = _run(mods, x)
    return _tail(backbone, name, x)
