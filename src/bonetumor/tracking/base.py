"""What a tracker is, and how a run talks to one without ever waiting on it or failing with it.

A tracker (MLflow, TensorBoard) records a run's parameters, per-epoch metrics, figures and files
where a lab lists and compares runs. Training must not slow down or stop for it: every call is
queued to one background thread, and the first failure (a locked store, a full disk, a missing
package) warns once and turns the tracker off for the rest of the run.
"""

from __future__ import annotations

import queue
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from bonetumor.errors import first_line


class TrackingWarning(UserWarning):
    """The tracker failed; the run goes on without it."""


class Tracker:
    """The calls a run makes; this base class records nothing (``--tracker none``)."""

    name = "none"

    def start(self, meta: dict) -> None:
        """Open the run: ``meta`` holds ``experiment``, ``run_name``, ``params`` (flat), ``tags``,
        ``config`` (its YAML text) and, to add to an existing run, ``record`` (``record()``)."""

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        """Numbers, at ``step`` (the epoch) when they form a series."""

    def log_image(self, path: Path, tag: str) -> None:
        """A figure or heatmap panel (PNG)."""

    def log_file(self, path: Path, folder: str = "") -> None:
        """A file kept with the run (a checkpoint, metrics.json, the report)."""

    def set_tags(self, tags: dict[str, str]) -> None:
        """Labels of the run (``external: true``)."""

    def adopt(self, child: dict) -> None:
        """Show another run (its ``record()``) under this one (cross-validation's folds)."""

    def record(self) -> dict:
        """What finds this run again (``tracking.json`` in the run folder)."""
        return {}

    def close(self, status: str = "FINISHED") -> None:
        """End the run (FINISHED or FAILED)."""


class Background:
    """A tracker behind a queue and one daemon thread: calls return at once, run in order, and
    the first failure warns once and drops what follows. ``close`` waits for the queue, at most
    ``timeout`` seconds, so a stuck store cannot hold the command's end."""

    def __init__(self, tracker: Tracker, warn: Callable[[str], None] | None = None):
        self.tracker = tracker
        self.failed: str | None = None
        self.started = False  # the tracker's ``start`` has run: its run is known
        self._warn = warn or (lambda msg: warnings.warn(msg, TrackingWarning, stacklevel=2))
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=f"bonetumor-{tracker.name}", daemon=True)
        self._thread.start()

    @property
    def name(self) -> str:
        return self.tracker.name

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            method, args, kwargs, always = item
            if self.failed is not None and not always:
                continue
            try:
                method(*args, **kwargs)
                self.started = self.started or method == self.tracker.start
            except Exception as e:  # noqa: BLE001 - any failure of the store ends tracking, never the run
                if self.failed is None:
                    self.failed = f"{self.tracker.name} tracking stopped: {type(e).__name__}: {first_line(e, 300)}"
                    self._warn(f"{self.failed}; the run goes on without it")

    def __getattr__(self, attr: str) -> Callable[..., None]:
        method = getattr(self.tracker, attr)
        return lambda *args, **kwargs: self._queue.put((method, args, kwargs, False))

    def close(self, status: str = "FINISHED", timeout: float = 60.0) -> str | None:
        """Finish the queued calls and end the run, waiting at most ``timeout`` seconds; the
        failure, if any (warned once, when it happened)."""
        self._queue.put((self.tracker.close, (status,), {}, False))
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive() and self.failed is None:
            self.failed = f"{self.tracker.name} tracking stopped: the store did not answer within {timeout:.0f} s"
            self._warn(f"{self.failed}; the run itself is complete")
        return self.failed

    def ready_record(self) -> dict | None:
        """``record()`` when the tracker has started and not failed, else None; never waits."""
        return self.tracker.record() if self.started and self.failed is None else None

    def record(self, timeout: float = 60.0) -> dict:
        """The tracker's ``record()`` once the calls queued before have run (so the run's id is
        known); empty when it failed."""
        done = threading.Event()
        box: dict[str, Any] = {}

        def read() -> None:
            try:
                if self.failed is None:
                    box.update(self.tracker.record())
            finally:
                done.set()

        self._queue.put((read, (), {}, True))
        done.wait(timeout)
        return box
