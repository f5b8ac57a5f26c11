"""Training: ``fit(cfg, out)`` runs the whole loop the original did, with its bugs fixed.

Adam, (binary) cross-entropy on logits, early stopping on validation loss with the best weights
restored, ``best.pt`` and ``last.pt`` written atomically every epoch, and ``--resume``. Each epoch
reseeds the shuffling, augmentation and dropout from (seed, epoch), so a resumed run repeats
the uninterrupted one.
"""

from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import track
from torch import nn

from bonetumor.batchnorm import folded_batchnorm, resolve_bn_statistics
from bonetumor.checkpoint import checkpoint_payload, read_torch_file, save_checkpoint, snapshot_bytes, write_checkpoint
from bonetumor.config import TrainConfig, config_from_dict, read_options, save_config
from bonetumor.data.datasets import (
    DatasetIndex,
    ImageDataset,
    check_files,
    discover,
    fingerprint,
)
from bonetumor.data.splits import assign_splits
from bonetumor.data.transforms import create_resize, create_transforms
from bonetumor.errors import BonetumorError, LeakageWarning
from bonetumor.evaluate import Predictions, binary_auc, loss_target, predict_loader
from bonetumor.features import FeatureDataset, create_feature_loaders, uses_feature_cache
from bonetumor.models import count_parameters, create_model
from bonetumor.utils import (
    atomic_write_csv,
    atomic_write_json,
    autocast_dtype,
    check_free_space,
    check_writable,
    environment_info,
    prepare_out_dir,
    release_free_memory,
    remove_stale_temporaries,
    seed_everything,
    select_device,
    to_device,
)

console = Console(stderr=True, soft_wrap=True, highlight=False)
HISTORY_FIELDS = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_roc_auc", "lr", "seconds"]


@dataclass
class FitResult:
    """What a finished run left behind."""

    run_dir: Path
    best_epoch: int
    best_val_loss: float
    history: list[dict] = field(default_factory=list)
    stopped_early: bool = False


HOLD_BEST_BYTES = 32 * 2**20


def prepare_data(cfg: TrainConfig, classes: list[str] | None = None) -> DatasetIndex:
    """Discover samples and give each a split (files are not decoded yet)."""
    index = discover(cfg.data, cfg.manifest, cfg.train_dir, cfg.val_dir, cfg.test_dir, cfg.positive_class, classes,
                     options=read_options(cfg))
    index.samples = assign_splits(index.samples, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    require_every_class(index)
    return index


def require_every_class(index: DatasetIndex) -> None:
    """Training and validation need every class (the loss, early stopping and the threshold do)."""
    for split in ("train", "valid"):
        labels = {s.label for s in index.split(split)}
        if len(labels) < len(index.classes):
            raise BonetumorError(f"the {split} split holds only {sorted(labels) or 'no'} images; it needs every class")


def check_data(index: DatasetIndex, cfg: TrainConfig, problems: list[str | None] | None = None) -> list[tuple[str, str]]:
    """Decode every file once to catch bad ones before training (or use ``problems`` from a
    decoding pass already made); returns the skipped ones."""
    index.samples, skipped = check_files(index.samples, cfg.skip_bad_files, workers=os.cpu_count() or 2, problems=problems,
                                         options=read_options(cfg))
    require_every_class(index)  # again: skipped files may have removed a class
    return skipped


def create_loader(index: DatasetIndex, split: str, cfg: TrainConfig, train: bool, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """DataLoader for one split with the train or eval transforms of ``cfg``; with the image cache
    (``cfg.cache_images``, by default on for GPUs) images are decoded and resized once."""
    cache = cfg.cache_images if cfg.cache_images is not None else device.type in ("cuda", "mps")
    tf = create_transforms(train, cfg.image_size, cfg.hflip, cfg.rotate_degrees, (cfg.zoom_min, cfg.zoom_max), resize=not cache)
    ds = ImageDataset(index.split(split), index.classes, tf, read_options(cfg), create_resize(cfg.image_size) if cache else None)
    # Batch norm cannot train on a batch of one: a lone last sample waits for the next
    # epoch's shuffle instead.
    lone = train and len(ds) % cfg.batch_size == 1 and len(ds) > 1
    return torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=train, drop_last=lone, num_workers=cfg.workers,
        persistent_workers=cache and cfg.workers > 0,  # each worker keeps its part of the cache
        generator=generator, pin_memory=device.type == "cuda",
    )


def checkpoint_bytes(model: nn.Module) -> int:
    """Size of a checkpoint of ``model``: its weights, plus Adam's two moments per trainable weight."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total + 2 * trainable


def choose_training_precision(model: nn.Module, index: DatasetIndex, cfg: TrainConfig, device: torch.device) -> dict:
    """Resolve ``cfg.precision`` (``auto``: see precision.py) on the first validation batch;
    the choice is recorded in ``precision.json`` beside the config that then holds it."""
    from bonetumor.precision import resolve_precision

    x = None
    if cfg.precision == "auto" and index.split("valid"):
        x, _, _ = next(iter(create_loader(index, "valid", replace(cfg, batch_size=min(cfg.batch_size, 16)), False, device)))
        x = to_device(x, device)
    return resolve_precision(cfg.precision, model, x, device)


def create_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam, fused (one kernel over all parameters) on CPU and CUDA where this torch has it:
    about 5% faster full fine-tuning steps on a 2-core CPU, same update rule."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # older torch: no fused Adam on this device
            pass
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def create_loss(index: DatasetIndex, cfg: TrainConfig, device: torch.device) -> nn.Module:
    """BCEWithLogits for two classes, cross-entropy otherwise; optionally class-balanced."""
    counts = np.array([sum(s.label == c for s in index.split("train")) for c in index.classes], dtype=float)
    if len(index.classes) == 2:
        pw = torch.tensor([counts[0] / counts[1]], device=device) if cfg.class_balanced else None
        return nn.BCEWithLogitsLoss(pos_weight=pw)
    w = torch.tensor(counts.sum() / (len(counts) * counts), dtype=torch.float32, device=device) if cfg.class_balanced else None
    return nn.CrossEntropyLoss(weight=w)


def train_one_epoch(model, loader, optimizer, loss_fn, device, dtype=None, scaler=None, verbose=True,
                    desc="train") -> tuple[float, float]:
    """One pass over ``loader`` (autocast to ``dtype`` when given); returns (mean loss, accuracy)."""
    model.train()
    total, n, correct = 0.0, 0, 0
    for x, y, _ in track(loader, description=desc, transient=True, disable=not (verbose and console.is_terminal), console=console):
        x = to_device(x, device)
        y = y.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            logits = model(x)
            loss = loss_fn(logits.float(), loss_target(logits, y))
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:  # fp16 needs loss scaling; bf16 has fp32's range and does not
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if not math.isfinite(loss.item()):
            raise BonetumorError("training loss became NaN/inf; lower --lr")
        total += loss.item() * len(y)
        n += len(y)
        pred = (logits[:, 0] > 0).long() if logits.shape[1] == 1 else logits.argmax(1)
        correct += (pred == y).sum().item()
    return total / max(n, 1), correct / max(n, 1)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) and math.isfinite(v) else "-"


def _write_run_record(run: Path, cfg: TrainConfig, index: DatasetIndex, skipped, device) -> None:
    save_config(cfg, run / "config.yaml")
    atomic_write_json(run / "environment.json", environment_info(device))
    atomic_write_json(run / "data.json", {
        "layout": index.layout, "root": index.root, "classes": index.classes,
        "positive_class": index.classes[-1] if len(index.classes) == 2 else None,
        "split_level": "patient" if index.patient_level else "image",
        "counts": index.counts(), "fingerprint": fingerprint(index.samples, index.root),
        "skipped_files": len(skipped), "ignored_non_image_files": len(index.ignored_files),
    })
    atomic_write_csv(run / "splits.csv", ["path", "slice", "study", "label", "patient_id", "split"],
                     ({"path": s.path, "slice": "" if s.frame is None else s.frame, "study": s.study or "",
                       "label": s.label, "patient_id": s.patient_id or "", "split": s.split} for s in index.samples))
    if skipped:
        atomic_write_csv(run / "skipped_files.csv", ["path", "problem"],
                         ({"path": p, "problem": why} for p, why in skipped))


def audit_data(index: DatasetIndex, run: Path, verbose: bool = True, facts: list | None = None) -> dict:
    """Run the leakage audit on the splits about to be used (``facts``: their scan, if made);
    write ``audit.json`` and warn, never silently, when a split shares images or patients."""
    from bonetumor.data.audit import audit, leakage_summary

    report = audit(index, facts=facts)
    atomic_write_json(run / "audit.json", report)
    summary = leakage_summary(report)
    if summary:
        msg = f"leakage in the data: {summary}; validation and test scores will be optimistic (see {run / 'audit.json'})"
        if verbose:
            console.print(f"[bold yellow]warning:[/] {msg}")
        else:
            warnings.warn(msg, LeakageWarning, stacklevel=2)
    return report


def lr_at_epoch(cfg: TrainConfig, epoch: int) -> float:
    """Learning rate for ``epoch`` (1-based): constant, or a cosine decay to 1% over ``cfg.epochs``.

    A pure function of the epoch, not a scheduler object, so that a resumed run needs no
    scheduler state to follow the same curve.
    """
    if cfg.lr_schedule == "constant":
        return cfg.lr
    frac = (epoch - 1) / max(cfg.epochs - 1, 1)
    return cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def fit(cfg: TrainConfig, out: str | Path, overwrite: bool = False, resume: bool = False, verbose: bool = True,
        index: DatasetIndex | None = None) -> FitResult:
    """Train a model as ``cfg`` says and write the run folder ``out``.

    ``index`` (samples with their splits already set, as cross-validation makes them) replaces
    finding the data from ``cfg``.

    Raises:
        BonetumorError: bad data, options or run folder (a one-line message).
    """
    run = Path(out)
    state = None
    if resume:
        if not (run / "last.pt").is_file():
            raise BonetumorError(f"{run}/last.pt not found: nothing to resume")
        state = read_torch_file(run / "last.pt")
        saved = config_from_dict(state["config"])
        # A run saved before --bn-statistics existed trained with batch statistics.
        saved.bn_statistics = state["config"].get("bn_statistics", "batch")
        saved.epochs, saved.device, saved.workers = cfg.epochs, cfg.device, cfg.workers
        cfg = saved
    cfg.validate()
    # Resolved before anything is saved, so the run records (and --resume keeps) what it trained with.
    cfg = replace(cfg, bn_statistics=resolve_bn_statistics(cfg.bn_statistics, cfg.weights))
    device = select_device(cfg.device)
    if run.exists() and not run.is_dir() or (run.is_dir() and any(run.iterdir()) and not (overwrite or resume)):
        raise BonetumorError(f"{run} already exists; pass --overwrite to replace it or --resume to continue")
    seed_everything(cfg.seed)
    index = index if index is not None else prepare_data(cfg, state["classes"] if state else None)
    n_out = 1 if len(index.classes) == 2 else len(index.classes)
    # The model (and its weights) come before the file scan, so a weights problem shows at once.
    model = create_model(cfg.backbone, "none" if state else cfg.weights, cfg.freeze, cfg.unfreeze, n_out, cfg.hidden, cfg.dropout,
                         cfg.output_stride)
    # A full disk is known now, not at the first checkpoint: best.pt and last.pt, each briefly
    # twice while replaced atomically, plus plots and records.
    check_writable(run)
    check_free_space(run, 3 * checkpoint_bytes(model) + 50 * 2**20, "a training run")
    facts = None
    if cfg.audit and not (run / "audit.json").is_file():
        from bonetumor.data.audit import scan

        # The audit decodes every file anyway: its read also serves the bad-file check.
        facts = dict(zip((s.ref for s in index.samples), scan(index.samples, options=read_options(cfg))))
    skipped = check_data(index, cfg, [facts[s.ref].error for s in index.samples] if facts else None)
    # Only now, with data and weights known to be usable, is an old run folder replaced.
    run = prepare_out_dir(run, overwrite=overwrite, resume=resume)
    if resume:
        remove_stale_temporaries(run)  # left by a write that a kill interrupted
    if skipped and verbose:
        console.print(f"[yellow]skipped {len(skipped)} unreadable file(s); listed in {run / 'skipped_files.csv'}")
    if facts is not None:
        audit_data(index, run, verbose, [facts[s.ref] for s in index.samples])
    model.to(device).to(memory_format=torch.channels_last)
    model.recompute_stages = cfg.recompute_stages
    model.bn_statistics = cfg.bn_statistics
    if not state:  # a resumed run keeps the precision its first epoch chose
        precision = choose_training_precision(model, index, cfg, device)
        cfg = replace(cfg, precision=precision["chosen"])  # saved with the run, so --resume keeps it
        atomic_write_json(run / "precision.json", precision)
        if verbose and precision["requested"] == "auto" and "max_abs_diff_probability" in precision:
            console.print(f"precision auto: {precision['chosen']} ({precision['candidate']} vs fp32 on {precision['n']} "
                          f"validation images: max |Δ probability| {precision['max_abs_diff_probability']:.4f}, "
                          f"limit {precision['tolerance']})")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = create_optimizer(params, cfg, device)
    dtype = autocast_dtype(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None
    loss_fn = create_loss(index, cfg, device)
    history: list[dict] = []
    best_loss, best_epoch, bad_epochs, start = math.inf, 0, 0, 1
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        ex = state["extra"]
        history, best_loss, best_epoch, bad_epochs = ex["history"], ex["best_val_loss"], ex["best_epoch"], ex["bad_epochs"]
        start = state["epoch"] + 1
    _write_run_record(run, cfg, index, skipped, device)
    if verbose:
        tr, tot = count_parameters(model)
        console.print(f"data: {index.layout} layout, classes {index.classes}, counts {index.counts()}, "
                      f"{'patient' if index.patient_level else 'image'}-level splits")
        console.print(f"model: {cfg.backbone} ({cfg.weights} weights), {tr:,} of {tot:,} parameters trainable; device {device}, "
                      f"{'fp32' if dtype is None else str(dtype).split('.')[-1]} compute")
    gen = torch.Generator()
    net = model
    if uses_feature_cache(cfg, model):
        # Frozen backbone: its features never change, so they are computed once and the head trains alone.
        train_loader, val_loader, summary = create_feature_loaders(model, index, cfg, device, dtype, gen,
                                                                   verbose and console.is_terminal)
        if verbose:
            console.print(summary)
        net = model.head
    else:
        train_loader = create_loader(index, "train", cfg, True, device, gen)
        val_loader = create_loader(index, "valid", cfg, False, device)
    stopped = bad_epochs >= cfg.patience
    # The best epoch's checkpoint waits in memory until a write is due (cfg.checkpoint_seconds),
    # and with it that epoch's validation logits, from which the operating point is chosen.
    pending_best: dict | None = None
    # ...unless the snapshot is large (a backbone that trains: 94 MB for ResNet50), where holding
    # it would add that much to the training's peak memory for a write that costs far less than
    # one of its epochs.
    hold_best = snapshot_bytes(model) <= HOLD_BEST_BYTES
    best_val = None
    last_write = time.monotonic()
    for epoch in range(start, cfg.epochs + 1):
        if stopped:
            break
        t0 = time.perf_counter()
        # Reseed per epoch so that a resumed run draws exactly what an uninterrupted one would.
        gen.manual_seed(cfg.seed * 100003 + epoch)
        torch.manual_seed(cfg.seed * 100003 + epoch)
        lr = lr_at_epoch(cfg, epoch)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if isinstance(train_loader.dataset, FeatureDataset):
            train_loader.dataset.set_epoch(epoch)
        with folded_batchnorm(net):
            tr_loss, tr_acc = train_one_epoch(net, train_loader, optimizer, loss_fn, device, dtype, scaler, verbose,
                                              f"epoch {epoch}/{cfg.epochs}")
            val = predict_loader(net, val_loader, device, loss_fn=loss_fn, dtype=dtype)
        row = {"epoch": epoch, "train_loss": round(tr_loss, 6), "train_accuracy": round(tr_acc, 6),
               "val_loss": round(val.loss, 6), "val_accuracy": round(val.accuracy(), 6),
               "val_roc_auc": round(binary_auc(val.targets, val.probs), 6) if n_out == 1 else "",
               "lr": float(f"{lr:.6g}"), "seconds": round(time.perf_counter() - t0, 2)}
        history.append(row)
        improved = val.loss < best_loss - 1e-7
        if improved:
            best_loss, best_epoch, bad_epochs, best_val = val.loss, epoch, 0, val
        else:
            bad_epochs += 1
        stopped = bad_epochs >= cfg.patience
        final = stopped or epoch == cfg.epochs
        extra = {"history": history, "best_val_loss": best_loss, "best_epoch": best_epoch, "bad_epochs": bad_epochs}
        state_kw = {"optimizer": optimizer, "scaler_state": scaler.state_dict() if scaler else None,
                    "epoch": epoch, "extra": extra}
        if improved:
            # best.pt serves predicting and evaluating; resuming starts from last.pt, so the best
            # epoch's snapshot leaves out the optimizer state (twice the weights, in full fine-tuning).
            pending_best = None  # the old snapshot goes before the new one is made
            best_kw = {**state_kw, "optimizer": None, "scaler_state": None}
            if hold_best:
                pending_best = checkpoint_payload(model, cfg, index.classes, **best_kw)
            else:  # a fine-tuned backbone: written now, from the model itself, rather than held
                write_checkpoint(run / "best.pt", checkpoint_payload(model, cfg, index.classes, copy=False, **best_kw))
        if final or time.monotonic() - last_write >= cfg.checkpoint_seconds:
            if pending_best is not None and not final:  # the final best.pt is written with its operating point
                write_checkpoint(run / "best.pt", pending_best)
                pending_best = None
            save_checkpoint(run / "last.pt", model, cfg, index.classes, **state_kw)
            last_write = time.monotonic()
        atomic_write_csv(run / "history.csv", HISTORY_FIELDS, history)
        release_free_memory()
        if verbose:
            console.print(f"epoch {epoch:3d}  loss {tr_loss:.4f}  acc {tr_acc:.3f}  val_loss {val.loss:.4f}  "
                          f"val_acc {row['val_accuracy']:.3f}  val_auc {_fmt(row['val_roc_auc'])}  "
                          f"{row['seconds']:.1f}s{'  *' if improved else ''}")
    if verbose and stopped:
        console.print(f"early stopping: no val_loss improvement for {cfg.patience} epochs; best epoch {best_epoch}")
    from bonetumor.plots import plot_curves

    plot_curves(history, run / "curves.png")
    if pending_best is not None or (run / "best.pt").is_file():
        if best_val is None:  # resumed after its best epoch: that epoch's logits, again, from best.pt
            model.load_state_dict(read_torch_file(run / "best.pt")["model"])
            best_val = predict_loader(net, val_loader, device, dtype=dtype)
        op = set_operating_point(run, cfg, best_val, pending_best)
        if verbose:
            t = op.get("temperature")
            console.print(f"operating point ({cfg.threshold_rule}, on validation): threshold {op['threshold']:.4f}"
                          + (f"; temperature {t:.3f}, ECE {op['ece_before']:.4f} -> {op['ece_after']:.4f}" if t else ""))
    return FitResult(run, best_epoch, best_loss, history, stopped)


def set_operating_point(run: Path, cfg: TrainConfig, val: Predictions, pending: dict | None = None) -> dict:
    """Fit the temperature (with ``cfg.calibrate``) and choose the threshold on the best epoch's
    validation logits ``val``; store both in best.pt (written from ``pending``, the best epoch's
    checkpoint still in memory, if given) and write ``operating_point.json``."""
    from bonetumor.calibration import choose_threshold, fit_temperature, probabilities
    from bonetumor.checkpoint import update_checkpoint
    from bonetumor.metrics import binary_values, expected_calibration_error

    logits, targets = val.logits.astype(np.float64), val.targets
    op: dict = {"split": "valid", "n": len(targets), "rule": cfg.threshold_rule, "precision": cfg.precision}
    temperature = 1.0
    if cfg.calibrate:
        temperature = fit_temperature(logits, targets)
        op.update(temperature=temperature,
                  ece_before=expected_calibration_error(targets, probabilities(logits)),
                  ece_after=expected_calibration_error(targets, probabilities(logits, temperature)))
    probs = probabilities(logits, temperature)
    threshold = choose_threshold(targets, probs, cfg.threshold_rule) if probs.ndim == 1 else 0.5
    op["threshold"] = threshold
    if probs.ndim == 1:
        keep = ("sensitivity", "specificity", "accuracy", "balanced_accuracy")
        chosen, half = binary_values(targets, probs, threshold), binary_values(targets, probs, 0.5)
        op["at_threshold"] = {k: chosen[k] for k in keep}
        op["at_threshold_0.5"] = {k: half[k] for k in keep}
    fields = {"threshold": float(threshold), "temperature": float(temperature), "operating_point": op}
    if pending is not None:
        write_checkpoint(run / "best.pt", {**pending, **fields})
    else:
        update_checkpoint(run / "best.pt", fields)
    atomic_write_json(run / "operating_point.json", op)
    return op
