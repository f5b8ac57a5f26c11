"""The forward pass every inference runs through: one place for mode, folding, compile and precision.

``with Forward(model, device, precision) as forward: logits = forward(x)`` puts the model in eval
mode without autograd, folds its BatchNorms into their convolutions for the block (eager PyTorch;
a compiled model has them folded already, an exported one needs nothing), and runs every batch
in the one autocast context of the run. ``precision="auto"`` is resolved on the first batch
(``precision.check_precision``).

torch.compile is used only where it pays for its compile time. Compiled with its weights frozen,
a ResNet50 runs faster than eager, but its first call compiles for tens of seconds (a few once
torch's own compile cache, under the temporary folder, holds it), so it pays only over
thousands of images (docs/performance.md): ``auto`` compiles from ``COMPILE_MIN_IMAGES`` on,
``on`` always, ``off`` never. A batch of another size would compile again, so the last, short
batch is padded to the full batch size.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from typing import Callable

import torch
from torch import nn

from bonetumor.errors import BonetumorError, first_line
from bonetumor.runtime.batchnorm import inference_folded
from bonetumor.runtime.precision import Probabilities, autocast, check_precision

PRECISION_CHECK_IMAGES = 8  # images of the first batch that ``auto`` compares in fp32 and reduced precision
COMPILE_MIN_IMAGES = 5000
COMPILE_CHOICES = ("auto", "on", "off")


def should_compile(mode: str, n_images: int, device: torch.device) -> bool:
    """Whether ``mode`` (auto | on | off) compiles a model that will see ``n_images`` images."""
    if mode not in COMPILE_CHOICES:
        raise BonetumorError(f"--compile must be auto, on or off, not {mode!r}")
    if mode == "off" or device.type == "mps":  # inductor does not target MPS reliably
        return False
    return mode == "on" or n_images >= COMPILE_MIN_IMAGES


class CompiledInference:
    """Calls a module compiled (weights frozen as constants) for a fixed batch size; falls back
    to the eager module, with a warning, if compiling fails (e.g. no C++ compiler on the machine)."""

    def __init__(self, module: torch.nn.Module, batch_size: int):
        self.module, self.batch_size = module.eval(), batch_size
        self.compiled: Callable | None = torch.compile(module, dynamic=False, options={"freezing": True})

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = len(x)
        if self.compiled is None or n > self.batch_size:
            return self.module(x)
        if n < self.batch_size:  # pad: one compiled shape, not one per batch size
            x = torch.cat([x, x.new_zeros((self.batch_size - n, *x.shape[1:]))]).contiguous(
                memory_format=torch.channels_last if x.dim() == 4 else torch.contiguous_format)
        try:
            out = self.compiled(x)
            return tuple(o[:n] for o in out) if isinstance(out, tuple) else out[:n]
        except Exception as e:  # noqa: BLE001 - any compile failure leaves the eager model, which is correct
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); "
                          "running without it", RuntimeWarning, stacklevel=2)
            self.compiled = None
            return self.module(x[:n])


def maybe_compiled(module: torch.nn.Module, mode: str, n_images: int, batch_size: int,
                   device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` itself, or a ``CompiledInference`` of it when ``should_compile`` says so."""
    return CompiledInference(module, batch_size) if should_compile(mode, n_images, device) else module


class Forward:
    """A model (an ``nn.Module``, or an exported model's runner) ready for inference batches.

    Args:
        run: what to call instead of ``model`` (its compiled form, ``maybe_compiled``); BatchNorms
            are then left as they are.
        probabilities: logits -> probabilities, for ``auto``'s check (``Task.probabilities``).

        wrapped: ``run`` is an eager wrapper of ``model`` itself (``model.ood.WithDistance``), whose
            BatchNorms are folded as the model's are.

    A ``run`` that returns (logits, out-of-distribution scores) (model/ood.py) leaves each
    batch's scores in ``distances`` (None for a model without the check).
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32",
                 run: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 probabilities: Probabilities | None = None, wrapped: bool = False):
        self.model, self.device, self.precision = model, device, precision
        self.eager = run is None or run is model or wrapped
        self.run = run or model
        self.distances: torch.Tensor | None = None  # the last batch's out-of-distribution distances
        self.probabilities = probabilities
        self.check: dict | None = None  # ``auto``'s record, once made
        self._stack: ExitStack | None = None
        self._autocast = None

    def __enter__(self) -> "Forward":
        self._stack = ExitStack()
        if isinstance(self.model, nn.Module):
            self.model.eval()
        self._stack.enter_context(torch.inference_mode())
        if self.eager:
            self._stack.enter_context(inference_folded(self.model))
        if self.precision != "auto":
            self._autocast = autocast(self.precision, self.device)
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 outputs for a batch already on the device."""
        if self.precision == "auto":
            # Checked on a few images: the check's fp32 pass costs as much as predicting them.
            # A batch no larger than the check already has its outputs from it.
            self.check, checked = check_precision("auto", self.model, x[:PRECISION_CHECK_IMAGES], self.device,
                                                  self.probabilities)
            self.precision = self.check["chosen"]
            self._autocast = autocast(self.precision, self.device)
            if checked is not None and len(x) <= PRECISION_CHECK_IMAGES and self.run is self.model:
                return checked
        with self._autocast:
            out = self.run(x)
        if isinstance(out, tuple):  # (logits, out-of-distribution distances)
            out, self.distances = out[0], out[1].float()
        return out.float()

    def submit(self, x: torch.Tensor) -> Callable[[], tuple[torch.Tensor, torch.Tensor | None]]:
        """Start a batch and return what gives its (float32 logits, out-of-distribution
        distances or None). An exported model's runner with ``submit`` (OpenVINO's) runs it
        while the caller prepares the next batch; anything else runs it here, at once."""
        start = getattr(self.run, "submit", None)
        if start is None or self.precision == "auto":
            logits = self(x)
            distances = self.distances
            return lambda: (logits, distances)
        with self._autocast:
            finish = start(x)

        def outputs() -> tuple[torch.Tensor, torch.Tensor | None]:
            out = finish()
            return (out[0].float(), out[1].float()) if isinstance(out, tuple) else (out.float(), None)

        return outputs
