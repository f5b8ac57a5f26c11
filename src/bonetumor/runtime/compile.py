"""torch.compile for inference, used only where it pays for its compile time.

Compiled with its weights frozen, a ResNet50 runs faster than eager, but its first call
compiles for tens of seconds (a few once torch's own compile cache, under the temporary folder,
holds it); so it pays only over thousands of images (docs/performance.md): ``auto`` compiles
from ``COMPILE_MIN_IMAGES`` on, ``on`` always, ``off`` never. A batch of another size would
compile again, so the last, short batch is padded to the full batch size.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from bonetumor.errors import BonetumorError, first_line

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
            return self.compiled(x)[:n]
        except Exception as e:  # noqa: BLE001 - any compile failure leaves the eager model, which is correct
            warnings.warn(f"torch.compile failed ({type(e).__name__}: {first_line(e)}); "
                          "running without it", RuntimeWarning, stacklevel=2)
            self.compiled = None
            return self.module(x[:n])


def maybe_compiled(module: torch.nn.Module, mode: str, n_images: int, batch_size: int,
                   device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """``module`` itself, or a ``CompiledInference`` of it when ``should_compile`` says so."""
    return CompiledInference(module, batch_size) if should_compile(mode, n_images, device) else module
