"""Reading PyTorch files safely: ``weights_only=True``, so a file never runs code when loaded."""

from __future__ import annotations

import functools
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from bonetumor.errors import BonetumorError, first_line

FORMAT = "bonetumor-checkpoint"
FORMAT_VERSION = 1


def is_bonetumor_checkpoint(obj: Any) -> bool:
    """True for a dict written by ``save_checkpoint``."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


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


def _load(p: Path, mmap: bool) -> Any:
    try:
        with warnings.catch_warnings():  # foreign bytes can look like an odd pickle protocol
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
        if found:
            raise BonetumorError(f"{p}: refused to load: it holds code or objects, not only tensors "
                                 f"({found.group(1)}); only load checkpoints you trust") from None
        raise BonetumorError(f"{p}: not a readable PyTorch file (damaged, or not written by torch.save)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        raise BonetumorError(f"{p}: not a readable PyTorch file ({first_line(e, 160)})") from None
    except Exception as e:  # noqa: BLE001 - the unpickler fails on foreign bytes in many ways (KeyError, IndexError, struct.error...)
        raise BonetumorError(f"{p}: not a readable PyTorch file (damaged, or not written by torch.save: "
                             f"{type(e).__name__})") from None
