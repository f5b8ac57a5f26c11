"""Small shared helpers: atomic writes, run folders, device choice, seeding, versions."""

from __future__ import annotations

import csv
import errno
import json
import os
import platform
import random
import shutil
import tempfile
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from bonetumor.errors import BonetumorError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one step.

    A crash, kill or full disk mid-write leaves the old file (or none), never a half-written one.
    ``fsync=False`` skips forcing the bytes to disk, for many small files that can be remade.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the usual permissions
        os.replace(tmp, p)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BonetumorError(f"{p}: disk full while writing ({e.strerror}); the previous version, if any, "
                                 "is intact: free some space and run again (training: --resume)") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_csv(path: str | Path, fieldnames: Sequence[str], rows: Iterable[dict]) -> None:
    """Write dict rows as CSV atomically (keys not in ``fieldnames`` are left out)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def prepare_out_dir(path: str | Path, overwrite: bool = False, resume: bool = False) -> Path:
    """Create an output folder; refuse a non-empty one unless ``overwrite`` (or ``resume``).

    Raises:
        BonetumorError: the folder exists with files and neither flag is given, or is unwritable.
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise BonetumorError(f"{p} exists and is not a folder")
    if p.exists() and any(p.iterdir()) and not resume:
        if not overwrite:
            raise BonetumorError(f"{p} already exists; pass --overwrite to replace it or --resume to continue")
        shutil.rmtree(p)
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise BonetumorError(f"{p}: cannot write to output folder ({e.strerror})") from None
    return p


def _existing_ancestor(path: str | Path) -> Path:
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | Path) -> None:
    """Refuse, before any work, an output folder that cannot be created or written.

    A file is created and removed in the folder, or in its nearest existing parent, since
    permission bits alone do not tell (root, read-only mounts, /proc).

    Raises:
        BonetumorError: naming the folder and the reason.
    """
    where = _existing_ancestor(path)
    if not where.is_dir():
        raise BonetumorError(f"{path}: cannot write to output folder ({where} is a file, not a folder)")
    try:
        fd, probe = tempfile.mkstemp(dir=where, prefix=".bonetumor-write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise BonetumorError(f"{path}: cannot write to output folder ({e.strerror or e})") from None


def check_free_space(path: str | Path, need_bytes: int, what: str) -> None:
    """Refuse, before any work, when the disk holding ``path`` has less than ``need_bytes`` free.

    Raises:
        BonetumorError: naming the folder, the space free and the space needed.
    """
    free = shutil.disk_usage(_existing_ancestor(path)).free
    if free < need_bytes:
        raise BonetumorError(f"{path}: only {free / 2**20:,.0f} MB free on its disk, and {what} needs about "
                             f"{need_bytes / 2**20:,.0f} MB; free some space or choose another folder")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files of writes that a kill interrupted (``.<name>.<random>.tmp``)."""
    n = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


def release_free_memory() -> None:
    """Hand the memory freed during an epoch back to the OS.

    glibc keeps freed blocks of the large tensors a training step makes for reuse, in a heap that
    fragments, so a training process seemed to grow by hundreds of MB over epochs while nothing
    leaked; ``malloc_trim`` at each epoch's end returns them (a few milliseconds). A fixed mmap
    threshold would too, but made every step 30% slower with page faults. No-op elsewhere.
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
    and keep the fastest, as images here come in one size. For ResNet50 on an H200 it made no
    difference (1.00x at batch 64 and 256, benchmarks/gpu.py); other GPUs and backbones may
    gain."""
    torch.backends.cudnn.benchmark = True
    return device


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for a precision name on a device (None means plain fp32).

    ``auto`` is fp16 mixed precision on CUDA and fp32 elsewhere; ``bf16`` works on CPUs
    (fast where they have bf16 instructions) and GPUs; ``fp16`` needs CUDA.
    """
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision == "fp16" and device.type != "cuda":
        raise BonetumorError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on this device")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


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
