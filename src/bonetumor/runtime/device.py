"""The device and the process: choosing cuda / mps / cpu, moving batches, seeding, memory, versions."""

from __future__ import annotations

import platform
import random
from importlib import metadata
from typing import Any

import numpy as np
import torch

from bonetumor.errors import BonetumorError


def release_free_memory() -> None:
    """Hand the memory freed during an epoch back to the OS.

    glibc keeps the freed blocks of a training step's large tensors for reuse, in a heap that
    fragments, so a long-running process looks as if it grew although nothing leaks;
    ``malloc_trim`` at each epoch's end returns them. A fixed mmap threshold would too, but
    at the cost of page faults on every step. No-op elsewhere.
    """
    if not platform.system() == "Linux":
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        pass


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB (Linux: VmHWM, since ru_maxrss keeps a
    parent's peak across exec; elsewhere ru_maxrss)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if platform.system() == "Darwin" else rss / 1024  # bytes on macOS, KB on Linux


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a batch to ``device``; image batches in channels_last (faster convolutions on CPU and GPU)."""
    x = x.to(device, non_blocking=True)
    return x.contiguous(memory_format=torch.channels_last) if x.ndim == 4 else x


def select_device(name: str = "auto") -> torch.device:
    """Pick cuda > mps > cpu for ``auto``; check that an explicit choice exists."""
    if name == "auto":
        if torch.cuda.is_available():
            return _tuned(torch.device("cuda"))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise BonetumorError(f"--device {name!r} is not a device (use auto, cpu, cuda, cuda:N or mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BonetumorError("--device cuda asked for, but no CUDA GPU is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise BonetumorError("--device mps asked for, but MPS is not available")
    return _tuned(dev) if dev.type == "cuda" else dev


def _tuned(device: torch.device) -> torch.device:
    """``device``, with cuDNN told to time its convolution algorithms for each new input shape
    and keep the fastest: images here come in one size, so the search is made once."""
    torch.backends.cudnn.benchmark = True
    return device


def cpu_has_fast_bf16() -> bool:
    """True when this CPU computes bf16 natively (AVX-512 BF16 or AMX); elsewhere bf16 is emulated and slow."""
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name)()) for name in checks if cpu is not None and hasattr(cpu, name))


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def environment_info(device: torch.device | None = None) -> dict[str, Any]:
    """Versions of Python, the key packages and the device, for the run record."""
    pkgs = {}
    for name in ("bonetumor", "torch", "torchvision", "numpy", "scikit-learn", "pillow", "matplotlib"):
        try:
            pkgs[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pkgs[name] = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": pkgs,
        "torch_threads": torch.get_num_threads(),
    }
    if device is not None:
        info["device"] = str(device)
        if device.type == "cuda":
            info["gpu"] = torch.cuda.get_device_name(device)
    return info
