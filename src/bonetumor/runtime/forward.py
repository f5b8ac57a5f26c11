"""The forward pass every inference runs through: one place for mode, folding, compile and precision.

``with Forward(model, device, precision) as forward: logits = forward(x)`` puts the model in eval
mode without autograd, folds its BatchNorms into their convolutions for the block (eager PyTorch;
a compiled model has them folded already, an exported one needs nothing), and runs every batch
in the one autocast context of the run. ``precision="auto"`` is resolved on the first batch
(``precision.check_precision``).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Callable

import torch
from torch import nn

from bonetumor.runtime.batchnorm import inference_folded
from bonetumor.runtime.precision import Probabilities, autocast, check_precision

PRECISION_CHECK_IMAGES = 8  # images of the first batch that ``auto`` compares in fp32 and reduced precision


class Forward:
    """A model (an ``nn.Module``, or an exported model's runner) ready for inference batches.

    Args:
        run: what to call instead of ``model`` (its compiled form, see compile.py); BatchNorms
            are then left as they are.
        probabilities: logits -> probabilities, for ``auto``'s check (``Task.probabilities``).
    """

    def __init__(self, model: nn.Module, device: torch.device, precision: str = "fp32",
                 run: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 probabilities: Probabilities | None = None):
        self.model, self.device, self.precision = model, device, precision
        self.run = run or model
        self.probabilities = probabilities
        self.check: dict | None = None  # ``auto``'s record, once made
        self._stack: ExitStack | None = None
        self._autocast = None

    def __enter__(self) -> "Forward":
        self._stack = ExitStack()
        if isinstance(self.model, nn.Module):
            self.model.eval()
        self._stack.enter_context(torch.inference_mode())
        if self.run is self.model:
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
            if checked is not None and len(x) <= PRECISION_CHECK_IMAGES:
                return checked
        with self._autocast:
            return self.run(x).float()
