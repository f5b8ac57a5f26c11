"""Progress of long loops: a rich bar in a terminal, a plain line at most every 10 s elsewhere.

Redirected to a file (nohup, SLURM, CI logs) a bar draws nothing useful: rich's progress only
renders where it can redraw, and tqdm writes a line per refresh with carriage returns. So
outside a terminal this module prints its own plain lines ("evaluate: 480/872 images (55%),
31.2 images/s, ETA 0:13"), throttled to one per ``BONETUMOR_PROGRESS_SECONDS`` (default 10),
and a last line with the total time when it printed any. Everything goes to stderr, so stdout
stays the command's result (tables, JSON lines).
"""

from __future__ import annotations

import os
import time
from typing import Callable, Iterable, Iterator, TypeVar

from rich.console import Console

T = TypeVar("T")
console = Console(stderr=True, soft_wrap=True, highlight=False)


def _interval() -> float:
    try:
        return float(os.environ.get("BONETUMOR_PROGRESS_SECONDS", "10"))
    except ValueError:
        return 10.0


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def tracked(items: Iterable[T], total: int | None, what: str, unit: str = "images",
            size: Callable[[T], int] | None = None, enabled: bool = True, out: Console | None = None) -> Iterator[T]:
    """``items`` unchanged, with progress shown while they are consumed.

    Args:
        total: how many ``unit`` in all (None: unknown, so no percentage or ETA).
        what: the line's label ("train epoch 3", "evaluate").
        size: how many ``unit`` one item holds (e.g. a batch's images); default 1.
        enabled: False shows nothing (a quiet run, or a caller that shows its own).
    """
    out = out or console
    if not enabled:
        yield from items
        return
    count = size or (lambda _item: 1)
    if out.is_terminal:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TaskProgressColumn,
            TextColumn,
            TimeRemainingColumn,
        )

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
                      TimeRemainingColumn(), console=out, transient=True) as bar:
            task = bar.add_task(what, total=total)
            for item in items:
                yield item
                bar.advance(task, count(item))
        return
    every, start = _interval(), time.monotonic()
    done, last, printed = 0, start, False
    for item in items:
        yield item
        done += count(item)
        now = time.monotonic()
        if now - last >= every:
            out.print(_line(what, done, total, unit, now - start))
            last, printed = now, True
    if printed:
        out.print(f"{what}: {done} {unit} in {_clock(time.monotonic() - start)}")


def _line(what: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    rate = done / elapsed if elapsed > 0 else 0.0
    if total:
        eta = _clock((total - done) / rate) if rate > 0 else "?"
        return f"{what}: {done}/{total} {unit} ({100 * done / total:.0f}%), {rate:.1f} {unit}/s, ETA {eta}"
    return f"{what}: {done} {unit}, {rate:.1f} {unit}/s"
