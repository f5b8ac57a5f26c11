"""File I/O that never loses anything: atomic writes, checks before any work, and run folders.

Every command's output folder (a training run, an evaluation, an explanation, predictions,
cross-validation, an audit) is a ``RunDir``: the one place that names the files a command writes,
and writes them. It refuses to replace a folder without ``--overwrite``; every file goes in
through ``save``, written to a temporary file and renamed into place (a kill or a full disk
leaves the previous version, never half a file), and is noted in ``written``, in order, so that
tests and callers can see what a run wrote, and in the folder's record (``.bonetumor``), so that
``--overwrite`` removes what bonetumor wrote and nothing else: never a user's file, never the input.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

from bonetumor.errors import BonetumorError, first_line

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
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise BonetumorError(f"{p}: disk full while writing ({e.strerror}); the previous version, if any, "
                                 "is intact: free some space and run again (training: --resume)") from None
        raise
    except RuntimeError as e:
        Path(tmp).unlink(missing_ok=True)
        # torch.save's C++ writer reports a failed write ("unexpected pos", "basic_ios::clear")
        # as a RuntimeError without the errno: a full disk, a quota or a file size limit.
        if not any(w in str(e) for w in ("unexpected pos", "basic_ios", "PytorchStreamWriter", "inline_container")):
            raise
        raise BonetumorError(f"{p}: disk full while writing (the write failed: {first_line(e, 80)}); the previous "
                             "version, if any, is intact: free some space and run again (training: --resume)") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write text to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8", errors="surrogateescape")


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write JSON to ``path`` atomically (indented, keys in insertion order)."""
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_write_csv(path: str | Path, fieldnames: Sequence[str], rows: Iterable[dict]) -> None:
    """Write dict rows as CSV atomically (keys not in ``fieldnames`` are left out)."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
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


# The record that makes a folder bonetumor's: a header line, then each name written there, one JSON
# string a line (JSON, so that any file name, even one that is not UTF-8, reads back the same).
MARKER = ".bonetumor"
_MARKER_HEADER = ("bonetumor output folder: the files below were written by bonetumor; --overwrite removes "
                  "these and nothing else\n")


def _inside(folder: Path, name: str) -> Path | None:
    """``folder / name`` when it stays inside ``folder`` (a record could be edited by hand)."""
    target = folder / name.rstrip("/")
    if not name or Path(name).is_absolute() or ".." in Path(name).parts:
        return None
    if any(q.is_symlink() for q in target.parents if folder in q.parents):
        return None  # a subfolder since replaced by a link leads elsewhere
    return target


def recorded_names(folder: str | Path) -> list[str]:
    """The names a folder's record lists (an unreadable line, as a kill mid-write leaves, is skipped)."""
    names = []
    try:
        lines = (Path(folder) / MARKER).read_text(encoding="utf-8", errors="replace").splitlines()[1:]
    except OSError:
        return names
    for line in lines:
        try:
            name = json.loads(line)
        except ValueError:
            continue
        if isinstance(name, str):
            names.append(name)
    return names


def remove_written(folder: str | Path) -> None:
    """Remove what bonetumor wrote in ``folder`` (its record lists it), its record, its interrupted
    writes and, in turn, the bonetumor folders inside it; a user's own files and folders stay."""
    p = Path(folder)
    if not (p / MARKER).is_file():
        return
    made: set[Path] = set()  # the subfolders that bonetumor made for its files (maps/, panels/)
    for name in dict.fromkeys(recorded_names(p)):
        target = _inside(p, name)
        if target is None:
            continue
        if name.endswith("/"):
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            continue
        made.update(q for q in target.parents if p in q.parents)
        if target.is_symlink() or target.is_file():
            target.unlink()
    nested = [Path(d) for d, _, files in os.walk(p) if MARKER in files and Path(d) != p]
    for sub in sorted(nested, key=lambda q: len(q.parts), reverse=True):
        remove_written(sub)  # a run inside this one: a fold, a step of the demo
        made.add(sub)
    for sub in sorted(made, key=lambda q: len(q.parts), reverse=True):
        if sub.is_dir() and not sub.is_symlink():
            remove_stale_temporaries(sub)
            if not any(sub.iterdir()):
                sub.rmdir()
    remove_stale_temporaries(p)
    (p / MARKER).unlink()


def refuse_holding_inputs(out: str | Path, inputs: Iterable[str | Path | None]) -> None:
    """Raise when the output folder ``out`` is one of ``inputs`` or a folder above one."""
    o = Path(out).resolve()
    for i in inputs:
        if not isinstance(i, (str, os.PathLike)) or str(i) == "" or not os.path.lexists(i):
            continue  # None, a loaded model, "imagenet": not paths
        r = Path(i).resolve()
        if r == o or o in r.parents:
            what = "is" if r == o else "holds"
            raise BonetumorError(f"{out}: the output folder {what} the input {i}; choose another folder for the "
                                 "output, so that the input is never written over or removed")


def refuse_existing_file(path: str | Path | None, overwrite: bool = False,
                         inputs: Iterable[str | Path | None] = ()) -> None:
    """Raise, before any work, when an output file the user named exists (without ``overwrite``),
    is a folder, or is one of the command's ``inputs``."""
    if path is None:
        return
    p = Path(path)
    if p.is_dir():
        raise BonetumorError(f"{p} is a folder; name the file to write")
    for i in inputs:
        if isinstance(i, (str, os.PathLike)) and os.path.lexists(i) and p.exists() and Path(i).resolve() == p.resolve():
            raise BonetumorError(f"{p} is the input {i}; choose another file for the output")
    if p.exists() and not overwrite:
        raise BonetumorError(f"{p} already exists; pass --overwrite to replace it")


def remove_stale_temporaries(folder: str | Path) -> int:
    """Delete the temporary files of writes that a kill interrupted (``.<name>.<random>.tmp``)."""
    n = 0
    for tmp in Path(folder).glob(".*.tmp"):
        tmp.unlink(missing_ok=True)
        n += 1
    return n


class RunDir:
    """A folder of a command's outputs, named by the constants below."""

    # A training run
    BEST, LAST = "best.pt", "last.pt"
    CONFIG, ENVIRONMENT, DATA = "config.yaml", "environment.json", "data.json"
    SPLITS, SKIPPED, AUDIT = "splits.csv", "skipped_files.csv", "audit.json"
    DUPLICATES, CLUSTERS = "duplicates.csv", "clusters.csv"
    HISTORY, CURVES = "history.csv", "curves.png"
    PRECISION, OPERATING_POINT, OOD = "precision.json", "operating_point.json", "ood.json"
    REPORT = "report.html"
    TRACKING, VAL_ROC, VAL_CONFUSION = "tracking.json", "val_roc.png", "val_confusion.png"  # with --tracker
    # An evaluation (and cross-validation's and prediction's tables)
    METRICS, CLASSIFICATION_REPORT, PREDICTIONS = "metrics.json", "classification_report.txt", "predictions.csv"
    ROC, PR, RELIABILITY, SCORES, CONFUSION = "roc.png", "pr.png", "reliability.png", "scores.png", "confusion_matrix.png"
    STUDIES = "studies.csv"
    CV, CV_FOLDS, OOF = "cv.json", "cv_folds.csv", "oof_predictions.csv"
    # An explanation
    EXPLAIN, INDEX = "explain.json", "index.html"
    LOCALIZATION, LOCALIZATION_TABLE = "localization.json", "localization.csv"
    MAPS, PANELS = "maps", "panels"

    def __init__(self, path: str | Path, recording: bool = True):
        """``recording=False``: files are saved without being noted in the folder's record (a
        torchrun rank beside rank 0, which records them all once they are gathered)."""
        self.path = Path(path)
        self.recording = recording
        self.written: list[str] = []
        self._recorded: set[str] = set()

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    @classmethod
    def create(cls, path: "str | Path | RunDir", overwrite: bool = False, resume: bool = False,
               inputs: Iterable[str | Path | None] = (), resumable: bool = False) -> "RunDir":
        """The folder, made ready and marked as bonetumor's: a non-empty one is refused unless
        ``overwrite`` (what bonetumor wrote there is removed, nothing else) or ``resume`` (kept, its
        interrupted writes' temporary files removed). ``inputs`` are the command's input files
        and folders, which the folder may neither be nor hold; ``resumable``: the command has
        ``--resume`` (training), which the refusal then offers.

        Raises:
            BonetumorError: the folder exists with files and may not be replaced, holds an input,
                or is unwritable.
        """
        run = path if isinstance(path, RunDir) else cls(path)
        p = run.path
        run.refuse_existing(overwrite, resume, inputs, resumable)
        if p.is_dir() and any(p.iterdir()) and not resume:
            remove_written(p)
        try:
            p.mkdir(parents=True, exist_ok=True)
            probe = p / ".write-test"
            probe.write_text("ok")
            probe.unlink()
            if not (p / MARKER).is_file():
                atomic_write_text(p / MARKER, _MARKER_HEADER)
        except OSError as e:
            raise BonetumorError(f"{p}: cannot write to output folder ({e.strerror})") from None
        if resume:
            remove_stale_temporaries(p)  # left by a write that a kill interrupted
        return run

    def refuse_existing(self, overwrite: bool = False, resume: bool = False,
                        inputs: Iterable[str | Path | None] = (), resumable: bool = False) -> None:
        """Raise, before any work, when the folder holds files and may not be replaced, or is (or
        holds) one of the command's ``inputs``."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise BonetumorError(f"{p} exists and is not a folder")
        refuse_holding_inputs(p, inputs)
        # A folder bonetumor made for a command that then stopped on bad input holds its record
        # alone: no run to keep, so the command run again may use it.
        if not (p.is_dir() and any(f.name != MARKER for f in p.iterdir()) or recorded_names(p)) or resume:
            return
        if not overwrite:
            raise BonetumorError(f"{p} already exists; pass --overwrite to replace it"
                                 + (" or --resume to continue" if resumable else ""))
        if not (p / MARKER).is_file():
            raise BonetumorError(f"{p} holds files that bonetumor did not write (it has no {MARKER} record), so "
                                 "--overwrite will not touch it; choose a new or empty folder for the output")

    def check_writable(self) -> None:
        """Raise, before any work, when the folder cannot be created or written."""
        check_writable(self.path)

    def has(self, name: str) -> bool:
        return (self.path / name).is_file()

    def folder(self, name: str) -> Path:
        """A subfolder (maps/, panels/), made if missing."""
        (self.path / name).mkdir(parents=True, exist_ok=True)
        return self.path / name

    def save(self, name: str, write: Callable[[Path], Any], fsync: bool = True) -> Path:
        """Write ``name`` atomically: ``write(tmp)`` fills a temporary file that then replaces it.
        ``fsync=False`` skips forcing the bytes to disk, for many small files that can be remade."""
        with atomic_path(self.path / name, fsync=fsync) as tmp:
            write(tmp)
        self.claim(name)
        self.written.append(name)
        return self.path / name

    def claim(self, name: str) -> None:
        """Note in the folder's record that bonetumor wrote ``name`` (a file, or with a trailing
        "/" a whole subfolder), so that ``--overwrite`` removes it. A folder without a record
        (one that ``create`` did not make) keeps none."""
        if name in self._recorded:
            return
        self._recorded.add(name)
        if self.recording and (self.path / MARKER).is_file():
            with open(self.path / MARKER, "a", encoding="utf-8") as f:
                f.write(json.dumps(name) + "\n")

    def write_text(self, name: str, text: str) -> Path:
        return self.save(name, lambda tmp: tmp.write_text(text, encoding="utf-8", errors="surrogateescape"))

    def write_json(self, name: str, obj: Any) -> Path:
        """JSON, indented, keys in insertion order."""
        return self.write_text(name, json.dumps(obj, indent=2, default=str) + "\n")

    def write_yaml(self, name: str, obj: Any) -> Path:
        import yaml  # here: a one-image predict never writes YAML

        return self.write_text(name, yaml.safe_dump(obj, sort_keys=False))

    def write_csv(self, name: str, fieldnames: Sequence[str], rows: Iterable[dict]) -> Path:
        """Dict rows as CSV (keys not in ``fieldnames`` are left out)."""
        def write(tmp: Path) -> None:
            with open(tmp, "w", newline="", encoding="utf-8", errors="surrogateescape") as f:
                w = csv.DictWriter(f, fieldnames=list(fieldnames), extrasaction="ignore")
                w.writeheader()
                w.writerows(rows)
        return self.save(name, write)

    def save_figure(self, name: str, fig) -> Path:
        """A matplotlib figure as PNG (then closed)."""
        import matplotlib.pyplot as plt

        try:
            return self.save(name, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
        finally:
            plt.close(fig)

    def read_json(self, name: str) -> dict | None:
        """A JSON record of the run, or None if missing or unreadable."""
        try:
            return json.loads((self.path / name).read_text()) if self.has(name) else None
        except (OSError, ValueError):
            return None

    def read_splits(self) -> dict[str, str] | None:
        """{sample ref: split} as training recorded them, or None without a record."""
        if not self.has(self.SPLITS):
            return None
        with open(self.path / self.SPLITS, newline="", encoding="utf-8", errors="surrogateescape") as f:
            return {row["path"] + (f"#{row['slice']}" if row.get("slice") else ""): row["split"]
                    for row in csv.DictReader(f)}


def prepare_out_dir(path: str | Path, overwrite: bool = False, resume: bool = False,
                    inputs: Iterable[str | Path | None] = ()) -> Path:
    """Create an output folder (see ``RunDir.create``) and return its path."""
    return RunDir.create(path, overwrite, resume, inputs).path

