"""The training loop: ``fit(cfg, out)`` from the first epoch to the operating point.

Adam, (binary) cross-entropy on logits, early stopping on validation loss with the best weights
kept, checkpoints written atomically (train/checkpointer.py), and ``--resume``. Each epoch
reseeds the shuffling, augmentation and dropout from (seed, epoch), so a resumed run repeats
the uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from bonetumor.config import TrainConfig
from bonetumor.data.layouts import DatasetIndex
from bonetumor.errors import BonetumorError
from bonetumor.evaluate.calibration import operating_point
from bonetumor.evaluate.metrics import binary_auc
from bonetumor.files import RunDir
from bonetumor.inference import Predictions, score_loader
from bonetumor.progress import tracked
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime.batchnorm import folded_batchnorm
from bonetumor.runtime.device import release_free_memory, to_device
from bonetumor.runtime.distributed import init_distributed
from bonetumor.runtime.forward import Forward
from bonetumor.runtime.precision import autocast
from bonetumor.train.batches import BatchSource, create_batch_source
from bonetumor.train.checkpointer import Checkpointer
from bonetumor.train.guidance import guided_forward
from bonetumor.train.ood import fit_ood
from bonetumor.train.ranks import (
    data_parallel,
    merge_predictions,
    start_ranks,
    sync_weights,
)
from bonetumor.train.setup import TrainingRun, console, start_run
from bonetumor.train.tracked import RunTracker, tracking

HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "lr", "seconds"]


@dataclass
class FitResult:
    """What a finished run left behind."""

    run_dir: Path
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


def fit(cfg: TrainConfig, out: str | Path | RunDir, overwrite: bool = False, resume: bool = False,
        verbose: bool = True, index: DatasetIndex | None = None) -> FitResult:
    """Train a model as ``cfg`` says and write the run folder ``out``.

    ``index`` (samples with their splits already set, as cross-validation makes them) replaces
    finding the data from ``cfg``.

    Raises:
        BonetumorError: bad data, options or run folder (a one-line message).
    """
    run = out if isinstance(out, RunDir) else RunDir(out)
    if init_distributed(cfg.device):  # one rank of a torchrun job (train/ranks.py)
        verbose = verbose and ranks.is_main()
        r = start_ranks(cfg, run, overwrite, resume, verbose, index)
    else:
        r = start_run(cfg, run, overwrite, resume, verbose, index)
    return _train(r, verbose)


def _train(r: TrainingRun, verbose: bool) -> FitResult:
    """The epochs, then the operating point (rank 0 writes and tracks; every rank trains)."""
    cfg, progress, run = r.cfg, r.progress, r.run
    source = create_batch_source(r.model, r.index, cfg, r.device, verbose and console.is_terminal, r.lesions)
    if ranks.active():
        source.trained = data_parallel(source.net, r.device, cfg.bn_statistics)
    if verbose and source.summary:
        console.print(source.summary)
    checkpointer = Checkpointer(run, r.model, cfg, r.index.classes, cfg.checkpoint_seconds) if ranks.is_main() else None
    with tracking(cfg, run, progress.epoch > 0, len(r.index.split("train")), ranks.is_main()) as tracker:
        best_val = _epochs(r, source, checkpointer, tracker, verbose)
        best_val = _finish(r, source, checkpointer, best_val, verbose)
        if tracker is not None:
            tracker.finish(best_val, r.index.classes)
    return FitResult(run.path, progress.best_epoch, progress.best_loss, progress.history, progress.stopped)


def _epochs(r: TrainingRun, source: BatchSource, checkpointer: Checkpointer | None, tracker: RunTracker | None,
            verbose: bool) -> Predictions | None:
    """Train until the last epoch or early stopping; the best epoch's validation predictions
    (None when no epoch of this process improved on a resumed run's best)."""
    cfg, progress, run = r.cfg, r.progress, r.run
    fields = HISTORY_FIELDS + (["train_outside_lesion"] if r.lesions is not None else [])
    best_val = None
    for epoch in range(progress.epoch + 1, cfg.epochs + 1):
        if progress.stopped:
            break
        t0 = time.perf_counter()
        source.set_epoch(epoch, cfg.seed)
        lr = lr_at_epoch(cfg, epoch)
        for group in r.optimizer.param_groups:
            group["lr"] = lr
        with folded_batchnorm(source.net):
            tr_loss, tr_acc, outside = train_one_epoch(r, source, f"epoch {epoch}/{cfg.epochs}", verbose)
            val = validate(r, source)
        row = {"epoch": epoch, "train_loss": round(tr_loss, 6), "train_accuracy": round(tr_acc, 6),
               "val_loss": round(val.loss, 6), "val_accuracy": round(val.accuracy(), 6),
               "val_roc_auc": round(binary_auc(val.targets, val.probs), 6) if r.task.binary else "",
               "lr": float(f"{lr:.6g}"), "seconds": round(time.perf_counter() - t0, 2)}
        if outside is not None:
            row["train_outside_lesion"] = round(outside, 6)
        improved = progress.record(*ranks.broadcast((row, val.loss)))  # rank 0's word, on every rank
        best_val = val if improved else best_val
        if checkpointer is not None:
            checkpointer.epoch_end(epoch, improved, progress.stopped or epoch == cfg.epochs, r.optimizer, r.scaler,
                                   progress.saved())
            run.write_csv(RunDir.HISTORY, fields, progress.history)
        if tracker is not None:
            tracker.epoch(row)
        release_free_memory()
        if verbose:
            _print_epoch(row, improved)
    if verbose and progress.stopped:
        console.print(f"early stopping: no val_loss improvement for {cfg.patience} epochs; best epoch {progress.best_epoch}")
    return best_val


def _finish(r: TrainingRun, source: BatchSource, checkpointer: Checkpointer | None, best_val: Predictions | None,
            verbose: bool) -> Predictions | None:
    """The curves, and the operating point on the best epoch's validation predictions (returned)."""
    progress, run = r.progress, r.run
    if ranks.broadcast(best_val is None and checkpointer is not None and checkpointer.has_best):
        # resumed after its best epoch: that epoch's logits, again, from its weights, on every rank
        if checkpointer is not None:
            r.model.load_state_dict(checkpointer.best_weights())
        sync_weights(r.model)  # the other ranks take rank 0's best weights
        best_val = validate(r, source, loss=False)
    if checkpointer is not None:
        from bonetumor.evaluate.figures import (
            plot_curves,  # matplotlib: see evaluate.run
        )

        run.save_figure(RunDir.CURVES, plot_curves(progress.history, progress.best_epoch))
        if checkpointer.has_best:
            _set_operating_point(r, checkpointer, best_val, verbose)
    ranks.barrier()  # every rank returns once rank 0's files are written
    return best_val


def lr_at_epoch(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for ``epoch`` (1-based): constant, or a cosine decay to 1% over ``cfg.epochs``.

    A pure function of the epoch, not a scheduler object, so that a resumed run needs no
    scheduler state to follow the same curve.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (epoch - 1) / max(cfg.epochs - 1, 1)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_one_epoch(r: TrainingRun, source: BatchSource, desc: str = "train",
                    verbose: bool = True) -> tuple[float, float, float | None]:
    """One pass over the training batches (in the run's precision); returns (mean classification
    loss, accuracy, and for a lesion-guided run the guided images' mean guidance loss)."""
    net, device, task = source.trained or source.net, r.device, r.task
    net.train()
    total, n, correct, outside_sum, n_guided = 0.0, 0, 0, 0.0, 0
    context = autocast(r.cfg.precision, device)
    batches = tracked(source.train, len(source.train.sampler), desc, size=lambda b: len(b[1]), enabled=verbose)
    for x, y, _, *masks in batches:
        x, y = to_device(x, device), y.to(device, non_blocking=True)
        with context:
            logits, outside = guided_forward(net, x, y, masks[0].to(device), task) if masks else (net(x), None)
            loss = r.loss_fn(logits.float(), task.loss_target(logits, y))
        objective = loss if outside is None else loss + r.cfg.guidance_weight * outside.mean()
        r.optimizer.zero_grad(set_to_none=True)
        if r.scaler is not None:  # fp16 needs loss scaling; bf16 has fp32's range and does not
            r.scaler.scale(objective).backward()
            r.scaler.step(r.optimizer)
            r.scaler.update()
        else:
            objective.backward()
            r.optimizer.step()
        if not math.isfinite(objective.item()):
            raise BonetumorError("training loss became NaN/inf; lower --lr")
        total += loss.item() * len(y)
        n += len(y)
        correct += (task.predicted(logits) == y).sum().item()
        if outside is not None:
            outside_sum, n_guided = outside_sum + outside.sum().item(), n_guided + len(outside)
    total, n, correct, outside_sum, n_guided = ranks.all_sum([total, n, correct, outside_sum, n_guided])  # all ranks
    return total / max(n, 1), correct / max(n, 1), outside_sum / n_guided if n_guided else None


def validate(r: TrainingRun, source: BatchSource, loss: bool = True) -> Predictions:
    """The network's predictions (and mean loss) on the validation batches (under torchrun,
    every rank's share, merged in the split's order)."""
    with Forward(source.net, r.device, r.cfg.precision) as forward:
        return merge_predictions(score_loader(forward, source.valid, r.task, r.loss_fn if loss else None))


def _set_operating_point(r: TrainingRun, checkpointer: Checkpointer, best_val: Predictions, verbose: bool) -> None:
    """Choose the threshold (and temperature) on the best epoch's validation logits and store it
    in best.pt and operating_point.json."""
    cfg = r.cfg
    op = operating_point(best_val.logits, best_val.targets, cfg.threshold_rule, cfg.calibrate, cfg.precision)
    fields = {"threshold": float(op["threshold"]), "temperature": float(op.get("temperature", 1.0)),
              "operating_point": op}
    weights = None
    if cfg.ood_quantile > 0:
        r.model.load_state_dict(checkpointer.best_weights())  # the check describes the best epoch's features
        weights, fields["ood"] = fit_ood(r)
        r.run.write_json(RunDir.OOD, fields["ood"])
    checkpointer.finish(fields, weights)
    r.run.write_json(RunDir.OPERATING_POINT, op)
    if verbose:
        t = op.get("temperature")
        console.print(f"operating point ({cfg.threshold_rule}, on validation): threshold {op['threshold']:.4f}"
                      + (f"; temperature {t:.3f}, ECE {op['ece_before']:.4f} -> {op['ece_after']:.4f}" if t else ""))
        if "ood" in fields:
            o = fields["ood"]
            console.print(f"out-of-distribution check: {o['n_train']} training images' features; an image is "
                          f"unlike the training data beyond score {o['threshold']:.2f} (the {o['quantile']:g} "
                          f"quantile of {o['n_valid']} validation images)")


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else "-"


def _print_epoch(row: dict, improved: bool) -> None:
    console.print(f"epoch {row['epoch']:3d}  loss {row['train_loss']:.4f}  acc {row['train_accuracy']:.3f}  "
                  f"val_loss {row['val_loss']:.4f}  val_acc {row['val_accuracy']:.3f}  val_auc {_fmt(row['val_roc_auc'])}  "
                  f"{row['seconds']:.1f}s{'  *' if improved else ''}")

