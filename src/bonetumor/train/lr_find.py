"""``lr-find``: the learning-rate range test (Smith, "Cyclical learning rates for training neural
networks", 2017; fastai's ``lr_find``): a few hundred steps at exponentially growing rates, with
the run's own model, data, loss and frozen-feature path, and the rate where the loss falls
fastest as a first choice for ``--lr``.

The sweep itself is torch-lr-finder's (``LRFinder.range_test``, exponential steps, smoothed loss,
stop on divergence, weights restored); this module feeds it the run's batches and loss and writes
the result.
"""

from __future__ import annotations

import contextlib
import io
import math
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from bonetumor.config import TrainConfig
from bonetumor.errors import BonetumorError
from bonetumor.files import RunDir
from bonetumor.progress import tracked
from bonetumor.runtime.precision import autocast_dtype
from bonetumor.train.batches import create_batch_source
from bonetumor.train.setup import console, start_run

RESULT, PLOT = "lr_find.json", "lr_find.png"
SKIP_START, SKIP_END = 10, 5  # the first steps (the smoothing's warm-up) and the last (divergence) are not suggested


@dataclass
class LRFindResult:
    """The sweep: rates and smoothed losses per step, and the suggested rate."""

    out: Path
    lrs: list[float]
    losses: list[float]
    suggested_lr: float
    diverged: bool
    path: str  # "frozen features" or "images"


def lr_find(cfg: TrainConfig, out: str | Path, start_lr: float = 1e-7, end_lr: float = 10.0, steps: int = 200,
            overwrite: bool = False, verbose: bool = True) -> LRFindResult:
    """Sweep the learning rate from ``start_lr`` to ``end_lr`` over ``steps`` training steps
    (exponentially) and write ``lr_find.json`` and ``lr_find.png`` in ``out`` beside the run
    record (config, data, splits, audit) that ``train`` writes. The model is the one ``train``
    would build; with a frozen backbone only the head trains, on cached features.

    Raises:
        BonetumorError: bad options or data, or too few steps before the loss diverged.
    """
    from torch_lr_finder import LRFinder, TrainDataLoaderIter

    if not 0 < start_lr < end_lr:
        raise BonetumorError(f"--start-lr must be above 0 and below --end-lr, not {start_lr} and {end_lr}")
    if steps < SKIP_START + SKIP_END + 5:
        raise BonetumorError(f"--steps must be at least {SKIP_START + SKIP_END + 5}, not {steps}")
    r = start_run(replace(cfg, epochs=1, ood_quantile=0.0), RunDir(out), overwrite, False, verbose)
    source = create_batch_source(r.model, r.index, r.cfg, r.device, verbose and console.is_terminal)
    if verbose and source.summary:
        console.print(source.summary)

    class Batches(TrainDataLoaderIter):  # the run's batches are (inputs, targets, indices[, masks])
        def inputs_labels_from_batch(self, batch):
            return batch[0], batch[1]

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return r.loss_fn(logits.float(), r.task.loss_target(logits, y))

    dtype = autocast_dtype(r.cfg.precision, r.device)
    amp = {} if dtype is None else {"amp_backend": "torch", "amp_config": {"device_type": r.device.type, "dtype": dtype},
                                    "grad_scaler": torch.amp.GradScaler(r.device.type, enabled=dtype == torch.float16)}
    finder = LRFinder(source.net, r.optimizer, loss, device=r.device, **amp)
    with _library_output(steps, verbose):
        finder.range_test(Batches(source.train), start_lr=start_lr, end_lr=end_lr, num_iter=steps, step_mode="exp")
    finder.reset()  # the model as it was: the sweep trains nothing that is kept
    return _write(r.run, finder, steps, "frozen features" if source.net is not r.model else "images")


@contextlib.contextmanager
def _library_output(steps: int, verbose: bool):
    """torch-lr-finder prints its own lines and a tqdm bar; the command shows one progress line
    of its own instead."""
    import torch_lr_finder.lr_finder as library

    plain = library.tqdm
    library.tqdm = lambda it: tracked(it, steps, "lr-find", unit="steps", enabled=verbose)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        library.tqdm = plain


def suggest_lr(lrs, losses, skip_start: int = SKIP_START) -> float:
    """The rate where the smoothed loss falls fastest against log(rate), on its way down to its
    minimum. torch-lr-finder's own suggestion takes the steepest point of the whole curve, which
    past the minimum is often a dip in the divergence's noise; fastai's ``steep`` looks, as here,
    only at the descent. A sweep whose loss never fell suggests a tenth of its best rate."""
    import numpy as np

    lr, loss = np.asarray(lrs[skip_start:], dtype=float), np.asarray(losses[skip_start:], dtype=float)
    loss = np.where(np.isfinite(loss), loss, np.inf)
    end = int(np.argmin(loss)) + 1
    if end < 3:
        return float(lr[end - 1] / 10)
    slope = np.gradient(loss[:end], np.log(lr[:end]))
    return float(lr[int(np.argmin(slope))])


def _write(run: RunDir, finder, steps: int, path: str) -> LRFindResult:
    from bonetumor.evaluate.figures import plt  # matplotlib without a display

    lrs, losses = finder.history["lr"], finder.history["loss"]
    if len(lrs) < SKIP_START + SKIP_END + 2:
        raise BonetumorError(f"the loss diverged after {len(lrs)} of {steps} steps, too few to suggest a rate: "
                             "lower --end-lr or --start-lr")
    suggested = suggest_lr(lrs, losses)
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    with contextlib.redirect_stdout(io.StringIO()):
        finder.plot(skip_start=SKIP_START, skip_end=SKIP_END, ax=ax, suggest_lr=False, show_lr=suggested)
    ax.set_title(f"Learning-rate range test ({path}); suggested {suggested:.2e}")
    ax.grid(alpha=0.3, which="both")
    run.save_figure(PLOT, fig)
    result = LRFindResult(run.path, [float(v) for v in lrs], [float(v) for v in losses], suggested, len(lrs) < steps, path)
    run.write_json(RESULT, {"suggested_lr": suggested, "rule": "steepest fall of the smoothed loss against log(rate), "
                            "before its minimum", "path": path, "steps": steps, "steps_run": len(lrs),
                            "diverged": result.diverged, "start_lr": lrs[0], "end_lr": lrs[-1],
                            "lr": result.lrs, "loss": [v if math.isfinite(v) else None for v in result.losses]})
    return result
