"""Reading and writing PyTorch files safely: ``weights_only=True``, so a file never runs code when
loaded, and a checkpoint's every byte under a checksum, so a damaged or altered one is refused."""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from bonetumor.errors import BonetumorError, first_line

FORMAT = "bonetumor-checkpoint"
# 2: the SHA-256 of the whole file in the archive's comment (``save_sealed``); 1: of the weights
# alone, in the entry "model_sha256" (the threshold, classes and config were not covered).
FORMAT_VERSION = 2

# torch.save writes a zip archive, whose last record may carry a comment that torch's reader
# skips. The seal is that comment: this prefix and the hex SHA-256 of every byte before the hex.
# torch's reader checks no CRC of its members, and zipfile's CRCs would leave the headers out.
_SEAL = b"bonetumor-sha256:"
_END_OF_ARCHIVE = b"PK\x05\x06"
_HEX = 64


def is_bonetumor_checkpoint(obj: Any) -> bool:
    """True for a dict written by ``save_checkpoint``."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_sealed(obj: Any, path: str | Path) -> None:
    """``torch.save`` to ``path``, then seal it: its SHA-256 written into the archive's comment."""
    torch.save(obj, path)
    with open(path, "r+b") as f:
        f.seek(-22, os.SEEK_END)
        end = f.read(22)
        if end[:4] != _END_OF_ARCHIVE or end[-2:] != b"\0\0":  # torch's writer always ends so
            raise RuntimeError(f"{path}: unexpected end of archive from torch.save; cannot seal it")
        f.seek(-2, os.SEEK_END)
        f.write((len(_SEAL) + _HEX).to_bytes(2, "little") + _SEAL)
        f.flush()
        f.seek(0)
        h = hashlib.sha256()
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
        f.write(h.hexdigest().encode())


def file_seal(path: str | Path) -> str | None:
    """The checksum a sealed file carries (see ``save_sealed``), or None for an unsealed file."""
    n = len(_SEAL) + _HEX
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        if size < n + 22:
            return None
        f.seek(size - n - 2)
        tail = f.read()
    if int.from_bytes(tail[:2], "little") != n or tail[2:2 + len(_SEAL)] != _SEAL:
        return None
    return tail[-_HEX:].decode("ascii", "replace")


def check_seal(path: str | Path, expected: str | None = None) -> None:
    """Raise unless every byte of ``path`` matches the checksum it carries (``expected``: that
    checksum, when the caller has read it already with ``file_seal``).

    Raises:
        BonetumorError: no checksum, or bytes that do not match it.
    """
    expected = expected or file_seal(path)
    if expected is None:
        raise BonetumorError(f"{path}: its checksum is missing; the file was altered or damaged")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = f.seek(0, os.SEEK_END) - _HEX
        f.seek(0)
        while left > 0:
            block = f.read(min(1 << 22, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    if h.hexdigest() != expected:
        raise BonetumorError(f"{path}: the file does not match its checksum; it was altered or damaged")


def weights_digest(state: dict) -> str:
    """SHA-256 over the names, shapes, dtypes and bytes of a state dict, in order (the checksum of
    format 1, and a key for what a backbone's weights compute)."""
    h = hashlib.sha256()
    for k, t in state.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{k}|{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no copy
    return h.hexdigest()


def check_integrity(path: str | Path, obj: dict) -> None:
    """Raise unless the file ``path`` (read as ``obj``) is as it was written: a sealed file by its
    checksum; a bonetumor checkpoint of format 1 (older files) by its weights' checksum; a
    bonetumor checkpoint of a later format must be sealed.

    Raises:
        BonetumorError: altered or damaged, or a checksum missing.
    """
    seal = file_seal(path)
    if seal is not None:
        return check_seal(path, seal)
    if not is_bonetumor_checkpoint(obj):
        return  # a foreign file (torchvision's weights, a state dict) carries no checksum
    if obj.get("format_version", 0) >= 2:
        raise BonetumorError(f"{path}: its checksum is missing; the file was altered or damaged")
    expected, state = obj.get("model_sha256"), obj.get("model")
    if not isinstance(expected, str) or not isinstance(state, dict):
        raise BonetumorError(f"{path}: its checksum is missing; the file was altered or damaged")
    if weights_digest(state) != expected:
        raise BonetumorError(f"{path}: the weights do not match their checksum; the file was altered or damaged")


def read_checkpoint_file(path: str | Path, mmap: bool = False) -> Any:
    """``read_torch_file``, with the file's integrity checked (``check_integrity``)."""
    obj = read_torch_file(path, mmap=mmap)
    check_integrity(path, obj)
    return obj


def read_torch_file(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load`` with weights_only=True on CPU, with one-line errors naming the file;
    ``mmap``: tensors mapped from the file rather than copied into memory (where its format
    allows), so that only what is used is read."""
    p = Path(path)
    if not p.is_file():
        raise BonetumorError(f"{p}: file not found")
    return _load(p, mmap=mmap and zipfile.is_zipfile(p))


def read_records(path: str | Path) -> Any:
    """A file's contents, mapped, and shared by the calls that read the same version of it:
    for its records (config, checksum), which several steps of one command want; unpickling
    costs a tenth of a second. Treat it as read-only."""
    p = Path(path)
    if not p.is_file():
        raise BonetumorError(f"{p}: file not found")
    st = p.stat()
    return _mapped(str(p.resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=4)
def _mapped(path: str, mtime_ns: int, size: int) -> Any:
    return _load(Path(path), mmap=zipfile.is_zipfile(path))


# What torch.save's pickles name: tensors, storages and the containers around them.
_TORCH_GLOBALS = re.compile(r"(torch|collections\.OrderedDict|_codecs\.encode|builtins\.(set|frozenset|bytearray|slice))\b")


def _foreign_globals(p: Path, limit: int = 16 * 2**20) -> list[str]:
    """The functions and classes a pickle names beyond torch's own, read without running it
    (torch's refusal names them only for some pickle protocols)."""
    import pickletools

    try:
        if zipfile.is_zipfile(p):
            with zipfile.ZipFile(p) as z:
                member = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(member)[:limit] if member else b""
        else:
            with open(p, "rb") as f:
                data = f.read(limit)
        names, strings = [], []
        for op, arg, _ in pickletools.genops(data):
            if op.name == "GLOBAL":
                names.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                names.append(f"{strings[-2]}.{strings[-1]}")
            elif isinstance(arg, str):
                strings.append(arg)
            if op.name == "STOP":
                break
    except Exception:  # noqa: BLE001 - damaged bytes: nothing more to say than "not readable"
        return []
    return [n for n in dict.fromkeys(names) if not _TORCH_GLOBALS.match(n)]


def _load(p: Path, mmap: bool) -> Any:
    try:
        with warnings.catch_warnings():  # foreign bytes can look like an odd pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        names = [found.group(1)] if found else _foreign_globals(p)
        if names:
            raise BonetumorError(f"{p}: refused to load: it holds code or objects, not only tensors "
                                 f"({', '.join(names[:3])}); only load checkpoints you trust") from None
        raise BonetumorError(f"{p}: not a readable PyTorch file (damaged, or not written by torch.save)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise BonetumorError(f"{p}: not a readable PyTorch file ({first_line(e, 160)})") from None
    except Exception as e:  # noqa: BLE001 - the unpickler fails on foreign bytes in many ways (KeyError, IndexError, struct.error...)
        raise BonetumorError(f"{p}: not a readable PyTorch file (damaged, or not written by torch.save: "
                             f"{type(e).__name__})") from None
