"""What happens at an epoch's end: early stopping's count (``Progress``) and when the run writes
its checkpoints (``Checkpointer``: the best/last/interval policy, in one place).

- ``best.pt`` serves predicting and evaluating: the best epoch's weights, no optimizer state.
  At the end it gets the operating point chosen on validation.
- ``last.pt`` serves ``--resume``: the last epoch's weights with the optimizer state.
- Both are written when ``every_seconds`` have passed since the last write, and at the end: a
  long epoch is saved every epoch, a sub-second epoch of the cached head is not (a ResNet50
  checkpoint is about 94 MB).
- Meanwhile the best epoch's snapshot waits in memory, when it is small (a frozen backbone's
  tensors are shared, not copied); a fine-tuned backbone's is written at once from the model
  itself instead, as holding it would add its size to the run's peak memory for a write that
  costs far less than one of its epochs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import torch

from bonetumor.config import TrainConfig
from bonetumor.files import RunDir
from bonetumor.model.checkpoint import checkpoint_payload, snapshot_bytes
from bonetumor.model.serialization import read_checkpoint_file, save_sealed

HOLD_BEST_BYTES = 32 * 2**20  # a best-epoch snapshot up to this size waits in memory for its write


@dataclass
class Progress:
    """Where a run stands: its history, the best epoch so far, and early stopping's count."""

    patience: int
    epoch: int = 0  # the last epoch done
    history: list[dict] = field(default_factory=list)
    best_loss: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    @classmethod
    def restored(cls, patience: int, state: dict) -> "Progress":
        """The progress saved in ``last.pt``."""
        ex = state["extra"]
        return cls(patience, state["epoch"], ex["history"], ex["best_val_loss"], ex["best_epoch"], ex["bad_epochs"])

    @property
    def stopped(self) -> bool:
        return self.bad_epochs >= self.patience

    def record(self, row: dict, val_loss: float) -> bool:
        """Add an epoch's row; True when its validation loss is the best yet."""
        self.epoch = row["epoch"]
        self.history.append(row)
        improved = val_loss < self.best_loss - 1e-7
        if improved:
            self.best_loss, self.best_epoch, self.bad_epochs = val_loss, self.epoch, 0
        else:
            self.bad_epochs += 1
        return improved

    def saved(self) -> dict:
        """What ``last.pt`` keeps of it (``restored`` reads it back)."""
        return {"history": self.history, "best_val_loss": self.best_loss, "best_epoch": self.best_epoch,
                "bad_epochs": self.bad_epochs}


class Checkpointer:
    """Writes ``run``'s best.pt and last.pt for ``model`` as the module docstring says."""

    def __init__(self, run: RunDir, model: torch.nn.Module, cfg: TrainConfig, classes: list[str],
                 every_seconds: float, clock: Callable[[], float] = time.monotonic, hold_bytes: int = HOLD_BEST_BYTES):
        self.run, self.model, self.cfg, self.classes = run, model, cfg, classes
        self.every, self.clock = every_seconds, clock
        self.holds = snapshot_bytes(model) <= hold_bytes  # the best epoch waits in memory, or is written at once
        self.pending: dict | None = None
        self.last_write = clock()

    def epoch_end(self, epoch: int, improved: bool, final: bool, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler | None, extra: dict) -> None:
        """After an epoch: note (or write) a new best, and write what is due."""
        state = {"optimizer": optimizer, "scaler_state": scaler.state_dict() if scaler else None, "epoch": epoch,
                 "extra": extra}
        if improved:
            self.pending = None  # the old snapshot goes before the new one is made
            best = {**state, "optimizer": None, "scaler_state": None}
            if self.holds:
                self.pending = checkpoint_payload(self.model, self.cfg, self.classes, **best)
            else:
                self._write(RunDir.BEST, checkpoint_payload(self.model, self.cfg, self.classes, copy=False, **best))
        if final or self.clock() - self.last_write >= self.every:
            if self.pending is not None and not final:  # the final best.pt is written with its operating point
                self._write(RunDir.BEST, self.pending)
                self.pending = None
            self._write(RunDir.LAST, checkpoint_payload(self.model, self.cfg, self.classes, copy=False, **state))
            self.last_write = self.clock()

    @property
    def has_best(self) -> bool:
        return self.pending is not None or self.run.has(RunDir.BEST)

    def best_weights(self) -> dict:
        """The best epoch's weights (to score validation again after a resume)."""
        return (self.pending or read_checkpoint_file(self.run / RunDir.BEST))["model"]

    def finish(self, fields: dict, weights: dict | None = None) -> None:
        """Write best.pt with ``fields`` (the operating point) set and ``weights`` (the
        out-of-distribution check's) added: from the snapshot held, or the file written earlier."""
        base = self.pending if self.pending is not None else read_checkpoint_file(self.run / RunDir.BEST)
        payload = {**base, **fields}
        if weights:
            payload["model"] = {**base["model"], **weights}
        self._write(RunDir.BEST, payload)
        self.pending = None

    def _write(self, name: str, payload: dict) -> None:
        self.run.save(name, partial(save_sealed, payload))
