"""Compute precision: fp32, or autocast to bf16 / fp16, and ``auto``'s choice between them.

``autocast(precision, device)`` builds the one context a run computes in, once, and every
forward pass of that run enters it. ``auto`` tries bf16 on CUDA GPUs that support it and on CPUs
with native bf16 (AVX-512 BF16, AMX), fp16 on other CUDA GPUs, and keeps it only when the
probabilities of a batch stay within ``TOLERANCE`` of fp32's; otherwise, and on other devices,
fp32.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from enum import Enum
from typing import Callable

import torch

from bonetumor.errors import BonetumorError
from bonetumor.runtime.device import cpu_has_fast_bf16

TOLERANCE = 0.01


class Precision(str, Enum):
    """A compute precision, as written in options and records."""

    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # a quantised model's own (quantize.py): its engine runs it, no autocast

    @classmethod
    def parse(cls, value: "str | Precision", choices: str = "auto, fp32, bf16 or fp16") -> "Precision":
        """The precision called ``value``; anything else is a one-line error listing ``choices``."""
        try:
            return cls(str(value.value if isinstance(value, Precision) else value))
        except ValueError:
            raise BonetumorError(f"--precision must be {choices}, not {value!r}") from None

    def dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype on ``device`` (None: plain fp32). ``auto`` here means fp16 mixed
        precision on CUDA and fp32 elsewhere (before any check); ``fp16`` needs CUDA."""
        if self is Precision.AUTO:
            return torch.float16 if device.type == "cuda" else None
        if self is Precision.FP16 and device.type != "cuda":
            raise BonetumorError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
        return {Precision.FP32: None, Precision.INT8: None, Precision.BF16: torch.bfloat16,
                Precision.FP16: torch.float16}[self]


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name on a device (None means plain fp32)."""
    return Precision.parse(precision).dtype(device)


def autocast(precision: str | Precision, device: torch.device) -> AbstractContextManager:
    """The context every forward pass of a run at ``precision`` enters: autocast to its dtype,
    or nothing for fp32. Built once per run and entered again for each batch (not nested)."""
    dtype = autocast_dtype(precision, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def candidate_precision(device: torch.device) -> str:
    """The reduced precision ``auto`` tries on ``device`` (fp32 when none is native)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


def model_precision(trained: str, device: torch.device) -> str:
    """The precision a model trained (and validated) at ``trained`` runs at on ``device``: the same
    where the device computes it natively, else fp32. One answer per model and device, so that a
    file's probability never depends on what else is in the job."""
    if trained in ("bf16", "fp16") and candidate_precision(device) == trained:
        return trained
    return "fp32"


Probabilities = Callable[[torch.Tensor], torch.Tensor]  # logits -> probabilities (``Task.probabilities``)


@torch.inference_mode()
def _logits(model: Callable, x: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    with autocast(precision, device):
        return model(x).float()


def check_precision(requested: str, model: torch.nn.Module, x: torch.Tensor | None, device: torch.device,
                    probabilities: Probabilities) -> tuple[dict, torch.Tensor | None]:
    """Resolve ``auto`` on a batch ``x`` (already on ``device``), comparing the ``probabilities``
    of the model's outputs; other requests pass unchanged.

    Returns:
        ({"requested", "chosen", and for auto: "candidate", "max_abs_diff_probability", "n",
        "tolerance"}, the outputs (logits) of ``x`` at the chosen precision when the check ran,
        so that a caller predicting ``x`` need not run it again).
    """
    if requested != "auto":
        return {"requested": requested, "chosen": requested}, None
    cand = candidate_precision(device)
    if cand == "fp32" or x is None or not len(x):
        return {"requested": "auto", "candidate": cand, "chosen": "fp32"}, None
    was_training = model.training
    model.eval()
    ref, low = _logits(model, x, "fp32", device), _logits(model, x, cand, device)
    model.train(was_training)
    diff = float((probabilities(ref) - probabilities(low)).abs().max())
    ok = diff <= TOLERANCE
    return ({"requested": "auto", "candidate": cand, "chosen": cand if ok else "fp32",
             "max_abs_diff_probability": diff, "n": len(x), "tolerance": TOLERANCE}, low if ok else ref)


def resolve_precision(requested: str, model: torch.nn.Module, x: torch.Tensor | None, device: torch.device,
                      probabilities: Probabilities) -> dict:
    """``check_precision``'s answer alone (the record of the choice)."""
    return check_precision(requested, model, x, device, probabilities)[0]
