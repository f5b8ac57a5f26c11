"""Batch-norm statistics while fine-tuning: updated from each batch, or kept as trained.

``--bn-statistics batch`` is PyTorch's train mode: each BatchNorm normalises with the batch's
own mean and variance and updates its running statistics. ``frozen`` keeps the running
statistics of the weights the backbone starts from (normalising as at inference), while the
convolutions and BatchNorm's scale and shift still train. Keras's transfer-learning guide
prescribes ``frozen`` for fine-tuning a pretrained model (``training=False``), as torchvision's
detection models do (``FrozenBatchNorm2d``): a small medical dataset's batches estimate the
statistics noisily, and the pretrained ones are what the weights were trained with. ``auto``
(the default) means ``frozen`` from pretrained weights and ``batch`` from random ones, whose
running statistics are not statistics of anything yet.

Frozen statistics also make fine-tuning faster and smaller. A BatchNorm that normalises with
fixed statistics is a per-channel affine map, so it folds into the convolution before it:
conv(x, W·s) + (β − μ·s), with s = γ / √(σ² + ε). ``fold_batchnorm`` computes that weight and
bias from the trainable W, γ, β on every forward, so gradients reach the same parameters and
the model is the same function; but the BatchNorm's own passes over every activation (about
13% of a bf16 ResNet50 step on a CPU) and the copy of each convolution's output kept for its
backward (0.6 GB of 1.4 GB at batch 32, 224 px, bf16) are gone. PyTorch's own conv–BN fusions
(``torch.nn.utils.fusion``, ``torch.fx.experimental.optimization.fuse``) fold into fixed weights
for inference, and ``torch.ao``'s ConvBn2d serves quantisation-aware training only; hence this
module.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Callable, ContextManager, Iterator

import torch
import torch.fx
from torch import nn

def resolve_bn_statistics(setting: str, weights: str) -> str:
    """``batch`` or ``frozen`` for ``--bn-statistics setting`` with ``--weights weights``."""
    if setting != "auto":
        return setting
    return "batch" if str(weights).lower() == "none" else "frozen"


def keeps_statistics(bn: nn.Module, bn_statistics: str) -> bool:
    """Whether BatchNorm ``bn`` normalises with its running statistics while the model trains:
    always with ``frozen``, and when its own parameters are frozen (a frozen block must give the
    features its weights were trained with, as Keras does for ``trainable=False``)."""
    return bn_statistics == "frozen" or not any(p.requires_grad for p in bn.parameters())


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where a Conv2d's output goes only into a BatchNorm2d.

    Found from the module's traced graph (torch.fx), not from names, so that it holds for any
    torchvision backbone: all 53 BatchNorms of ResNet50 and 49 of EfficientNet-B0, but only 59 of
    DenseNet-121's 121, whose other BatchNorms come before their convolution.
    """
    try:
        graph = torch.fx.symbolic_trace(module).graph
    except Exception:  # noqa: BLE001 - an untraceable module trains unfolded, which is only slower
        return []
    mods = dict(module.named_modules())
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(mods[node.target]) is not nn.BatchNorm2d:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and type(mods[src.target]) is nn.Conv2d
                and len(src.users) == 1 and mods[node.target].affine and mods[node.target].track_running_stats):
            pairs.append((src.target, node.target))
    return pairs


class _FoldedConv2d(nn.Conv2d):
    """A Conv2d that applies the frozen-statistics BatchNorm after it (``self._bn``) itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bn = self._bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        # Multiplying keeps the weight's memory format (channels_last), which oneDNN wants.
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else shift + self.bias * scale
        return self._conv_forward(x, weight, bias)


class _FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose work the convolution before it does (see _FoldedConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # batch statistics cannot be folded: a caller bug, never silently wrong
            raise RuntimeError("a folded BatchNorm2d was put in training mode")
        return x


@contextmanager
def fold_batchnorm(module: nn.Module, where: Callable[[nn.Module], bool] = lambda bn: True) -> Iterator[int]:
    """Within the block, every BatchNorm2d of ``module`` that follows a convolution (and for
    which ``where(bn)`` holds) is folded into it (see the module docstring); yields how many.
    Those BatchNorms must stay in eval mode (frozen statistics) meanwhile. Parameter and buffer
    names are unchanged (the modules only change class), so state dicts and optimizers work as
    before; the classes are restored on exit."""
    named = dict(module.named_modules())
    pairs = [(c, b) for c, b in conv_bn_pairs(module) if where(named[b])]
    for conv_name, bn_name in pairs:
        conv, bn = named[conv_name], named[bn_name]
        conv.__class__, bn.__class__ = _FoldedConv2d, _FoldedBatchNorm2d
        object.__setattr__(conv, "_bn", bn)  # not a submodule: its state dict stays the BatchNorm's
    try:
        yield len(pairs)
    finally:
        for conv_name, bn_name in pairs:
            conv, bn = named[conv_name], named[bn_name]
            conv.__class__, bn.__class__ = nn.Conv2d, nn.BatchNorm2d
            object.__delattr__(conv, "_bn")


def folded_batchnorm(net: nn.Module) -> ContextManager[int]:
    """``fold_batchnorm`` over a Classifier's backbone, for the BatchNorms that keep their
    statistics while it trains (see ``keeps_statistics``); nothing for any other module (the
    head alone, when it trains from cached features)."""
    backbone = getattr(net, "backbone", None)
    if backbone is None:
        return nullcontext(0)
    mode = getattr(net, "bn_statistics", "batch")
    return fold_batchnorm(backbone, lambda bn: keeps_statistics(bn, mode))
