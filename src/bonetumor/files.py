"""Files written so that nothing is ever lost: atomic replacement, and checks before any work."""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

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
