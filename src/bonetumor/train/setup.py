"""Everything a training run needs before its first epoch, checked before its folder is touched.

``start_run`` resolves the config (from ``last.pt`` when resuming), finds and checks the data,
builds the model, refuses a full disk or an unwritable folder, audits the data, chooses the
precision, and writes the run record (config, environment, data fingerprint, splits).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch
from rich.console import Console
from torch import nn

from bonetumor.config import TrainConfig, config_from_dict, config_to_dict
from bonetumor.data.grouping import split_samples
from bonetumor.data.layouts import DatasetIndex, check_files, discover, fingerprint
from bonetumor.data.lesions import LesionSource, check_lesions, training_lesions
from bonetumor.errors import BonetumorError, ConfoundWarning, LeakageWarning
from bonetumor.files import MARKER, RunDir, check_free_space
from bonetumor.model.backbones import count_parameters, create_model, resolve_freeze
from bonetumor.model.serialization import read_checkpoint_file
from bonetumor.runtime.batchnorm import resolve_bn_statistics
from bonetumor.runtime.device import (
    environment_info,
    seed_everything,
    select_device,
    to_device,
)
from bonetumor.runtime.distributed import describe as describe_ranks
from bonetumor.runtime.precision import autocast_dtype, resolve_precision
from bonetumor.task import Task
from bonetumor.tracking import check_tracker
from bonetumor.train.checkpointer import Progress

console = Console(stderr=True, soft_wrap=True, highlight=False)


@dataclass
class TrainingRun:
    """A run ready for its first epoch."""

    cfg: TrainConfig
    run: RunDir
    device: torch.device
    index: DatasetIndex
    task: Task
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    loss_fn: nn.Module
    progress: Progress
    lesions: dict[str, LesionSource] | None = None  # a guided run's training masks, by sample ref


def prepare_data(cfg: TrainConfig, classes: list[str] | None = None) -> DatasetIndex:
    """Discover samples and give each a split (files are not decoded yet)."""
    index = discover(cfg.data, cfg.manifest, cfg.train_dir, cfg.val_dir, cfg.test_dir, cfg.positive_class, classes,
                     options=cfg.read_options)
    # --split-by cluster reads every image to find copies: that scan is kept for the audit
    index.samples, index.facts = split_samples(index.samples, cfg.split_by, cfg.val_fraction, cfg.test_fraction,
                                               cfg.seed, index.options)
    index.split_by = cfg.split_by
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
    index.samples, skipped = check_files(index.samples, cfg.skip_bad_files, workers=os.cpu_count() or 2,
                                         problems=problems, options=index.options)
    require_every_class(index)  # again: skipped files may have removed a class
    return skipped


def lesion_sources(cfg: TrainConfig, index: DatasetIndex) -> dict[str, LesionSource] | None:
    """A lesion-guided run's training images that have a lesion source (``--lesion-masks``), by
    sample ref, every mask file read once first; None for a run without guidance."""
    if not cfg.lesion_masks:
        return None
    train = index.split("train")
    sources = training_lesions(cfg.lesion_masks, train, index.root)
    if not check_lesions(sources):
        raise BonetumorError(f"--lesion-masks {cfg.lesion_masks}: none of the {len(train)} training images has a "
                             "lesion in its mask")
    return {s.ref: src for s, src in zip(train, sources) if src is not None}


def checkpoint_bytes(model: nn.Module) -> int:
    """Size of a checkpoint of ``model``: its weights, plus Adam's two moments per trainable weight."""
    total = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return total + 2 * trainable


def create_optimizer(params, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """Adam, fused (one kernel over all parameters) on CPU and CUDA where this torch has it:
    the same update rule, in fewer passes over the weights."""
    if device.type in ("cpu", "cuda"):
        try:
            return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=True)
        except (RuntimeError, TypeError, ValueError):  # older torch: no fused Adam on this device
            pass
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _resumed_config(cfg: TrainConfig, run: RunDir) -> tuple[TrainConfig, dict]:
    """The config a run was saved with (its epochs, device and workers from ``cfg``) and last.pt."""
    if not run.has(RunDir.LAST):
        raise BonetumorError(f"{run.path}/{RunDir.LAST} not found: nothing to resume")
    state = read_checkpoint_file(run / RunDir.LAST)  # a damaged last.pt is refused, not trained on
    saved = config_from_dict(state["config"])
    # A run saved before --bn-statistics existed trained with batch statistics.
    saved.bn_statistics = state["config"].get("bn_statistics", "batch")
    ignored = _ignored_on_resume(cfg, saved)
    if ignored:
        raise BonetumorError(f"{run.path}: --resume continues the run as it was saved, so it would ignore "
                             f"{'; '.join(ignored)}: leave those options out, or start a new run in another folder")
    saved.epochs, saved.device, saved.workers = cfg.epochs, cfg.device, cfg.workers
    return saved, state


def _ignored_on_resume(cfg: TrainConfig, saved: TrainConfig) -> list[str]:
    """The options ``cfg`` asks for (set away from their defaults) that differ from the saved run's;
    a resumed run takes only its epochs, device and workers from the command line."""
    default = TrainConfig()
    out = []
    for f in fields(TrainConfig):
        mine, theirs = getattr(cfg, f.name), getattr(saved, f.name)
        if f.name in ("epochs", "device", "workers") or mine == getattr(default, f.name):
            continue
        if f.name in ("data", "manifest", "train_dir", "val_dir", "test_dir") and mine and theirs:
            if Path(mine).resolve() == Path(theirs).resolve():  # the same place, written otherwise
                continue
        if mine != theirs:
            out.append(f"{f.metadata['option'].flag(f.name)} {mine} (the run's: {theirs})")
    return out


def _scan_and_check(run: RunDir, cfg: TrainConfig, index: DatasetIndex, model: nn.Module,
                    verbose: bool = True, audited: bool = False) -> tuple[list, list | None]:
    """Refuse an unwritable folder or a full disk, then decode every file once: for the bad-file
    check and, unless ``audited`` (a resumed run's audit is kept), the audit. Returns (files
    skipped, the kept samples' audit facts)."""
    run.check_writable()
    # best.pt and last.pt, each briefly twice while replaced atomically, plus plots and records.
    check_free_space(run.path, 3 * checkpoint_bytes(model) + 50 * 2**20, "a training run")
    facts = index.facts  # --split-by cluster read every image already
    if cfg.audit and not audited and facts is None:
        # Imported here: scikit-learn's neighbours are for audited runs, not every command.
        from bonetumor.data.audit import scan

        facts = dict(zip((s.ref for s in index.samples), scan(index.samples, options=index.options, verbose=verbose)))
    skipped = check_data(index, cfg, [facts[s.ref].error for s in index.samples] if facts else None)
    audit_facts = cfg.audit and not audited and facts is not None
    return skipped, [facts[s.ref] for s in index.samples] if audit_facts else None


def audit_data(index: DatasetIndex, run: RunDir, verbose: bool = True, facts: list | None = None) -> dict:
    """Run the leakage audit on the splits about to be used (``facts``: their scan, if made);
    write ``audit.json`` and warn, never silently, when a split shares images or patients."""
    from bonetumor.data.audit import audit, leakage_summary
    from bonetumor.data.confounds import confound_summary

    report = audit(index, facts=facts, run=run)
    summary = leakage_summary(report)
    if summary:
        msg = f"leakage in the data: {summary}; validation and test scores will be optimistic (see {run / RunDir.AUDIT})"
        _warn(msg, verbose, LeakageWarning)
    confound = confound_summary(report)
    if confound:
        _warn(f"{confound} (see {run / RunDir.AUDIT})", verbose, ConfoundWarning)
    return report


def _warn(msg: str, verbose: bool, category: type[Warning] = UserWarning) -> None:
    """One line on the console when the run talks, else a Python warning that a caller can catch."""
    if verbose:
        console.print(f"[bold yellow]warning:[/] {msg}")
    else:
        warnings.warn(msg, category, stacklevel=4)


def write_run_record(run: RunDir, cfg: TrainConfig, index: DatasetIndex, skipped, device: torch.device) -> None:
    """The run's config, environment, data record (with its fingerprint) and splits."""
    run.write_yaml(RunDir.CONFIG, config_to_dict(cfg))
    env = environment_info(device)
    if describe_ranks():  # under torchrun: how many ranks trained it
        env["distributed"] = describe_ranks()
    run.write_json(RunDir.ENVIRONMENT, env)
    run.write_json(RunDir.DATA, {
        "layout": index.layout, "root": index.root, "classes": index.classes,
        "positive_class": index.classes[-1] if len(index.classes) == 2 else None,
        "split_level": index.split_level, "counts": index.counts(), "fingerprint": fingerprint(index.samples, index.root),
        "skipped_files": len(skipped), "ignored_non_image_files": len(index.ignored_files),
    })
    run.write_csv(RunDir.SPLITS, ["path", "slice", "study", "label", "patient_id", "split"],
                  ({"path": s.path, "slice": "" if s.frame is None else s.frame, "study": s.study or "",
                    "label": s.label, "patient_id": s.patient_id or "", "split": s.split} for s in index.samples))
    if skipped:
        run.write_csv(RunDir.SKIPPED, ["path", "problem"], ({"path": p, "problem": why} for p, why in skipped))


def choose_training_precision(model: nn.Module, index: DatasetIndex, cfg: TrainConfig, device: torch.device,
                              task: Task) -> dict:
    """Resolve ``cfg.precision`` (``auto``: see runtime/precision.py) on the first validation
    batch; the choice is recorded in ``precision.json`` beside the config that then holds it."""
    from bonetumor.train.batches import create_loader

    x = None
    if cfg.precision == "auto" and index.split("valid"):
        x, _, _ = next(iter(create_loader(index, "valid", replace(cfg, batch_size=min(cfg.batch_size, 16)), False, device)))
        x = to_device(x, device)
    return resolve_precision(cfg.precision, model, x, device, task.probabilities)


def _choose_precision(model: nn.Module, index: DatasetIndex, cfg: TrainConfig, device: torch.device, task: Task,
                      run: RunDir, verbose: bool) -> TrainConfig:
    """``cfg`` with its precision resolved (saved with the run, so ``--resume`` keeps it)."""
    precision = choose_training_precision(model, index, cfg, device, task)
    run.write_json(RunDir.PRECISION, precision)
    if verbose and precision["requested"] == "auto" and "max_abs_diff_probability" in precision:
        console.print(f"precision auto: {precision['chosen']} ({precision['candidate']} vs fp32 on {precision['n']} "
                      f"validation images: max |Δ probability| {precision['max_abs_diff_probability']:.4f}, "
                      f"limit {precision['tolerance']})")
    return replace(cfg, precision=precision["chosen"])


def create_loss(index: DatasetIndex, cfg: TrainConfig, device: torch.device, task: Task) -> nn.Module:
    """The task's loss on ``device``; with ``cfg.class_balanced`` weighted by the training split's class counts."""
    counts = [sum(s.label == c for s in index.split("train")) for c in index.classes]
    return task.create_loss(counts if cfg.class_balanced else None).to(device)


def _print_setup(cfg: TrainConfig, index: DatasetIndex, model: nn.Module, device: torch.device) -> None:
    tr, tot = count_parameters(model)
    dtype = autocast_dtype(cfg.precision, device)
    console.print(f"data: {index.layout} layout, classes {index.classes}, counts {index.counts()}, "
                  f"{index.split_level}-level splits")
    console.print(f"model: {cfg.backbone} ({cfg.weights} weights), {tr:,} of {tot:,} parameters trainable; device {device}, "
                  f"{'fp32' if dtype is None else str(dtype).split('.')[-1]} compute")


def start_run(cfg: TrainConfig, run: RunDir, overwrite: bool = False, resume: bool = False, verbose: bool = True,
              index: DatasetIndex | None = None) -> TrainingRun:
    """Everything checked and made for the first epoch (see the module docstring); ``index``:
    samples with their splits already set (cross-validation's folds) instead of finding them."""
    state = None
    if resume and not run.has(RunDir.LAST) and run.has(MARKER):
        # Killed before its first checkpoint: there is nothing to resume, and what it wrote is
        # bonetumor's to remove, so the run starts again (a user's own files in the folder stay).
        if verbose:
            console.print(f"{run / RunDir.LAST} not written yet (the run stopped before its first checkpoint): "
                          "starting from the first epoch")
        resume, overwrite = False, True
    if resume:
        cfg, state = _resumed_config(cfg, run)
    cfg.validate()
    check_tracker(cfg.tracker)  # a missing MLflow says so before the data are read, not after the features
    # Resolved before anything is saved, so the run records (and --resume keeps) what it trained with.
    cfg = replace(cfg, bn_statistics=resolve_bn_statistics(cfg.bn_statistics, cfg.weights),
                  freeze=resolve_freeze(cfg.freeze, cfg.weights))
    if not state and cfg.freeze == "backbone" and str(cfg.weights).lower() == "none":
        _warn("--freeze backbone with --weights none: the frozen backbone is random, so its features mean "
              "nothing and only the head learns; use --freeze auto or none, or pretrained weights", verbose)
    device = select_device(cfg.device)
    run.refuse_existing(overwrite, resume, cfg.inputs, resumable=True)
    seed_everything(cfg.seed)
    index = index if index is not None else prepare_data(cfg, state["classes"] if state else None)
    task = Task.of(index.classes)
    # The model (and its weights) come before the file scan, so a weights problem shows at once.
    model = create_model(cfg.backbone, "none" if state else cfg.weights, cfg.freeze, cfg.unfreeze, task.n_outputs,
                         cfg.hidden, cfg.dropout, cfg.output_stride)
    # The old audit.json counts only for a resumed run: --overwrite removes it after this check.
    skipped, facts = _scan_and_check(run, cfg, index, model, verbose, audited=resume and run.has(RunDir.AUDIT))
    lesions = lesion_sources(cfg, index)
    RunDir.create(run, overwrite, resume, cfg.inputs, resumable=True)  # only now, with data and weights known to be usable
    if skipped and verbose:
        console.print(f"[yellow]skipped {len(skipped)} unreadable file(s); listed in {run / RunDir.SKIPPED}")
    if facts is not None:
        audit_data(index, run, verbose, facts)
    model.to(device).to(memory_format=torch.channels_last)
    model.recompute_stages, model.bn_statistics = cfg.recompute_stages, cfg.bn_statistics
    if not state:  # a resumed run keeps the precision its first epoch chose
        cfg = _choose_precision(model, index, cfg, device, task, run, verbose)
    optimizer = create_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype(cfg.precision, device) == torch.float16 else None
    loss_fn = create_loss(index, cfg, device, task)
    progress = Progress(cfg.patience)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        progress = Progress.restored(cfg.patience, state)
    write_run_record(run, cfg, index, skipped, device)
    if verbose:
        _print_setup(cfg, index, model, device)
    return TrainingRun(cfg, run, device, index, task, model, optimizer, scaler, loss_fn, progress, lesions)
