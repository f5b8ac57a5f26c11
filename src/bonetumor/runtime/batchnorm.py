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
the model is the same function; but the BatchNorm's own passes over every activation and the
copy of each convolution's output kept for its backward are gone (docs/performance.md). PyTorch's own conv–BN fusions
(``torch.nn.utils.fusion``, ``torch.fx.experimental.optimization.fuse``) fold into fixed weights
for inference, and ``torch.ao``'s ConvBn2d serves quantisation-aware training only; hence this
module.

At inference every BatchNorm uses its running statistics, so eager inference (validation,
``evaluate``, ``predict`` with PyTorch, the frozen backbone's feature pass) folds them all
(``inference_folded``), which is faster. Folding within a block, rather than into a
separate fused model, keeps the module names that checkpoints, hooks and Grad-CAM's layer names
refer to; the folded weights made for inference live only as long as the block.
"""

from __future__ import annotations

import weakref
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


class _Tracer(torch.fx.Tracer):
    """fx's tracer, with folded modules kept whole (so that a model can be traced while folded)."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (_FoldedConv2d, _FoldedBatchNorm2d)) or super().is_leaf_module(m, qualname)


# Pairs per module, found once: tracing takes tens of milliseconds, and inference folds on every call (a
# served model, per request). Weak keys: a cached module is not kept alive by the cache.
_PAIRS: "weakref.WeakKeyDictionary[nn.Module, list[tuple[str, str]]]" = weakref.WeakKeyDictionary()


def conv_bn_pairs(module: nn.Module) -> list[tuple[str, str]]:
    """(conv, batchnorm) module names where a Conv2d's output goes only into a BatchNorm2d
    (whether or not they are folded at the moment).

    Found from the module's traced graph (torch.fx), not from names, so that it holds for any
    torchvision backbone: all 53 BatchNorms of ResNet50 and 49 of EfficientNet-B0, but only 59 of
    DenseNet-121's 121, whose other BatchNorms come before their convolution.
    """
    mods = dict(module.named_modules())
    if not any(isinstance(m, nn.BatchNorm2d) for m in mods.values()):
        # Nothing to fold, and nothing traced: tracing runs forward on placeholders, which code
        # outside PyTorch (an exported model's runtime, behind a module) must never see.
        return []
    cached = _PAIRS.get(module)
    if cached is not None and all(isinstance(mods.get(c), nn.Conv2d) and isinstance(mods.get(b), nn.BatchNorm2d)
                                  for c, b in cached):
        return list(cached)
    try:
        graph = _Tracer().trace(module)
    except Exception:  # noqa: BLE001 - an untraceable module runs unfolded, which is only slower
        return []
    conv_types, bn_types = (nn.Conv2d, _FoldedConv2d), (nn.BatchNorm2d, _FoldedBatchNorm2d)
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or type(mods[node.target]) not in bn_types:
            continue
        src = node.args[0]
        if (isinstance(src, torch.fx.Node) and src.op == "call_module" and type(mods[src.target]) in conv_types
                and len(src.users) == 1 and mods[node.target].affine and mods[node.target].track_running_stats):
            pairs.append((src.target, node.target))
    _PAIRS[module] = pairs
    return list(pairs)


class _FoldedConv2d(nn.Conv2d):
    """A Conv2d that applies the frozen-statistics BatchNorm after it (``self._bn``) itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, *self._folded())

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The folded weight and bias: recomputed on every call while they are to be trained;
        otherwise (inference, or nothing here requires grad) kept until a tensor they come from
        changes (its version counter moves), as folding 25 M weights per call costs a third of a
        batch-of-one ResNet50 forward. Kept for one block only: fused optimizers (Adam with
        ``fused=True``) update parameters without moving their version counters."""
        bn = self._bn
        sources = (self.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, self.bias)
        trained = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in sources)
        if trained:
            return self._fold()
        try:
            key = (torch.is_inference_mode_enabled(), *(t._version for t in sources if t is not None))
        except RuntimeError:  # a tensor made under inference_mode has no version counter
            return self._fold()
        cached = self.__dict__.get("_fold_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, *self._fold())
            object.__setattr__(self, "_fold_cache", cached)
        return cached[1], cached[2]

    def _fold(self) -> tuple[torch.Tensor, torch.Tensor]:
        bn = self._bn
        scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
        # Multiplying keeps the weight's memory format (channels_last), which oneDNN wants.
        weight = self.weight * scale.reshape(-1, 1, 1, 1)
        shift = bn.bias - bn.running_mean * scale
        bias = shift if self.bias is None else shift + self.bias * scale
        return weight, bias


class _FoldedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d whose work the convolution before it does (see _FoldedConv2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # batch statistics cannot be folded: a caller bug, never silently wrong
            raise RuntimeError("a folded BatchNorm2d was put in training mode")
        return x


@contextmanager
def fold_batchnorm(module: nn.Module, where: Callable[[nn.Module], bool] = lambda bn: True,
                   keep: nn.Module | None = None) -> Iterator[int]:
    """Within the block, every BatchNorm2d of ``module`` that follows a convolution (and for
    which ``where(bn)`` holds) is folded into it (see the module docstring); yields how many.
    Those BatchNorms must stay in eval mode (frozen statistics) meanwhile. Parameter and buffer
    names are unchanged (the modules only change class), so state dicts and optimizers work as
    before; the classes are restored on exit. A pair that includes ``keep`` is not folded."""
    named = dict(module.named_modules())
    # Pairs folded already (by an enclosing block) are left to it.
    pairs = [(c, b) for c, b in conv_bn_pairs(module)
             if type(named[c]) is nn.Conv2d and where(named[b]) and keep not in (named[c], named[b])]
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
            conv.__dict__.pop("_fold_cache", None)


def folded_batchnorm(net: nn.Module) -> ContextManager[int]:
    """``fold_batchnorm`` over a Classifier's backbone, for the BatchNorms that keep their
    statistics while it trains (see ``keeps_statistics``); nothing for any other module (the
    head alone, when it trains from cached features)."""
    backbone = getattr(net, "backbone", None)
    if backbone is None:
        return nullcontext(0)
    mode = getattr(net, "bn_statistics", "batch")
    return fold_batchnorm(backbone, lambda bn: keeps_statistics(bn, mode))


def inference_folded(model: nn.Module, keep: nn.Module | None = None) -> ContextManager[int]:
    """``fold_batchnorm`` for inference: every BatchNorm of ``model`` (a Classifier's backbone, or
    any module) that is in eval mode, so that it normalises with its running statistics, is folded
    into its convolution, for faster eager inference. A pair
    with ``keep`` in it (a layer whose output is being watched, such as Grad-CAM's) stays as it is.
    Other objects (an exported model's runner) pass unchanged."""
    target = getattr(model, "backbone", model)
    if not isinstance(target, nn.Module):
        return nullcontext(0)
    return fold_batchnorm(target, lambda bn: not bn.training, keep)
