"""Recompute the first backbone stages in the backward pass instead of keeping their outputs.

Fine-tuning keeps every layer's output until the backward pass needs it, gigabytes at
batch 32 and 224 px, and the first stages keep the most bytes per FLOP (the stem's
full-resolution maps and max-pool indices). A recomputed stage keeps only its input and runs its
forward again during backward (``torch.utils.checkpoint``): the stem is the cheapest to
recompute, each further stage costs more time (benchmarks/training_memory.py measures both).

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

Stages = Sequence[Sequence[str]]  # module names per stage, stem first, as the backbone's forward runs them


def pool_tail(x: torch.Tensor, relu: bool) -> torch.Tensor:
    """What the torchvision forward does after the last stage (its classifier is an Identity)."""
    if relu:
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


def recompute_forward(backbone: nn.Module, stages: Stages, n_stages: int, x: torch.Tensor,
                      relu_tail: bool = False) -> torch.Tensor:
    """The backbone's pooled features, as its own forward gives them, with the first
    ``n_stages`` of its ``stages`` recomputed in backward (where anything in or before them
    trains); ``relu_tail``: the forward applies a ReLU before pooling (DenseNet)."""
    named = dict(backbone.named_modules())
    grad = x.requires_grad
    for i, stage in enumerate(stages):
        mods = [named[n] for n in stage]
        grad = grad or any(p.requires_grad for m in mods for p in m.parameters())
        if i < n_stages and grad:
            x = checkpoint(_run, mods, x, use_reentrant=False,
                           context_fn=lambda mods=mods: (nullcontext(), _keep_batchnorm_statistics(mods)))
        else:
            x = _run(mods, x)
    return pool_tail(x, relu_tail)
