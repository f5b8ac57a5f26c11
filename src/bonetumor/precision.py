"""Choosing the compute precision: the fastest the device runs natively, if it agrees with fp32.

``auto`` tries bf16 on CUDA GPUs that support it and on CPUs with native bf16 (AVX-512 BF16,
AMX), fp16 on other CUDA GPUs, and keeps it only when the probabilities of a validation batch
stay within ``TOLERANCE`` of fp32's; otherwise, and on other devices, fp32.
"""

from __future__ import annotations

import torch

from bonetumor.utils import autocast_dtype, cpu_has_fast_bf16

TOLERANCE = 0.01


def candidate_precision(device: torch.device) -> str:
    """The reduced precision ``auto`` tries on ``device`` (fp32 when none is native)."""
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and cpu_has_fast_bf16():
        return "bf16"
    return "fp32"


@torch.inference_mode()
def _probs(model: torch.nn.Module, x: torch.Tensor, precision: str, device: torch.device) -> torch.Tensor:
    dtype = autocast_dtype(precision, device)
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        logits = model(x).float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)


def resolve_precision(requested: str, model: torch.nn.Module, x: torch.Tensor | None, device: torch.device) -> dict:
    """Resolve ``auto`` on a batch ``x`` (already on ``device``); other requests pass unchanged.

    Returns:
        {"requested", "chosen", and for auto: "candidate", "max_abs_diff_probability", "n", "tolerance"}.
    """
    return check_precision(requested, model, x, device)[0]


def check_precision(requested: str, model: torch.nn.Module, x: torch.Tensor | None,
                    device: torch.device) -> tuple[dict, torch.Tensor | None]:
    """``resolve_precision``'s answer and, when the check ran, the probabilities of ``x`` at the
    chosen precision (so that a caller predicting ``x`` need not run it again)."""
    if requested != "auto":
        return {"requested": requested, "chosen": requested}, None
    cand = candidate_precision(device)
    if cand == "fp32" or x is None or not len(x):
        return {"requested": "auto", "candidate": cand, "chosen": "fp32"}, None
    was_training = model.training
    model.eval()
    ref, low = _probs(model, x, "fp32", device), _probs(model, x, cand, device)
    model.train(was_training)
    diff = float((ref - low).abs().max())
    ok = diff <= TOLERANCE
    return ({"requested": "auto", "candidate": cand, "chosen": cand if ok else "fp32",
             "max_abs_diff_probability": diff, "n": len(x), "tolerance": TOLERANCE}, low if ok else ref)
