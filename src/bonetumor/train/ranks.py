"""Training as one rank of several (``torchrun``): who sets the run up, what each rank trains on,
and how their validation predictions become the one set a single process would make.

Rank 0 sets the run up exactly as a process on its own does (it checks the data, audits it,
creates the run folder and writes the records) and then sends the others what they need: the
resolved config, the samples with their splits, the run's progress and, when resuming, the
optimizer's state. Every rank then starts from rank 0's weights (``sync_weights``), trains on its
part of each epoch's permutation through ``DistributedDataParallel`` (gradients averaged over
ranks, so ``world x batch`` images make each step) and scores its share of the validation
images; ``merge_predictions`` puts the shares back in the split's order. Rank 0 alone writes
checkpoints and records; every rank takes rank 0's word on early stopping.

Batch norm with batch statistics becomes ``SyncBatchNorm`` on GPUs (statistics over the whole
step's batch); PyTorch's ``SyncBatchNorm`` does not run on CPUs, so a CPU run with batch
statistics normalises each rank's batch alone (said on the console).
"""

from __future__ import annotations

import inspect
from dataclasses import replace

import numpy as np
import torch
from torch import nn

from bonetumor.config import TrainConfig
from bonetumor.data.layouts import DatasetIndex
from bonetumor.files import RunDir
from bonetumor.inference import Predictions
from bonetumor.model.backbones import create_model
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime.device import seed_everything, select_device
from bonetumor.runtime.precision import autocast_dtype
from bonetumor.task import Task
from bonetumor.train.setup import (
    TrainingRun,
    console,
    create_loss,
    create_optimizer,
    start_run,
)


def start_ranks(cfg: TrainConfig, run: RunDir, overwrite: bool, resume: bool, verbose: bool,
                index: DatasetIndex | None) -> TrainingRun:
    """``start_run`` on rank 0; on every other rank the same run, from what rank 0 sends."""
    r = ranks.made_by_main(lambda: start_run(cfg, run, overwrite, resume, verbose, index),
                           lambda r: {"cfg": r.cfg, "index": replace(r.index, facts=None), "progress": r.progress,
                                      "optimizer": r.optimizer.state_dict() if r.progress.epoch else None,
                                      "scaler": r.scaler.state_dict() if r.scaler is not None else None,
                                      "lesions": r.lesions})
    if not ranks.is_main():
        r = _follow(r, run)
    sync_weights(r.model)
    trains_bn = any(p.requires_grad for p in r.model.backbone.parameters())  # a frozen backbone's never trains
    if r.device.type != "cuda" and r.cfg.bn_statistics == "batch" and trains_bn and ranks.world_size() > 1 and verbose:
        console.print("note: batch norm normalises each rank's batch alone (PyTorch's SyncBatchNorm needs GPUs)")
    return r


def _follow(sent: dict, run: RunDir) -> TrainingRun:
    """A non-zero rank's run: rank 0's config, samples and progress, its own model and optimizer
    (the weights come from rank 0 through ``sync_weights``)."""
    cfg: TrainConfig = sent["cfg"]
    device = ranks.local_device(select_device(cfg.device))
    seed_everything(cfg.seed)
    index: DatasetIndex = sent["index"]
    task = Task.of(index.classes)
    model = create_model(cfg.backbone, "none", cfg.freeze, cfg.unfreeze, task.n_outputs, cfg.hidden, cfg.dropout,
                         cfg.output_stride)
    model.to(device).to(memory_format=torch.channels_last)
    model.recompute_stages, model.bn_statistics = cfg.recompute_stages, cfg.bn_statistics
    optimizer = create_optimizer([p for p in model.parameters() if p.requires_grad], cfg, device)
    if sent["optimizer"] is not None:
        optimizer.load_state_dict(sent["optimizer"])
    scaler = torch.amp.GradScaler(device.type) if autocast_dtype(cfg.precision, device) == torch.float16 else None
    if scaler is not None and sent["scaler"]:
        scaler.load_state_dict(sent["scaler"])
    return TrainingRun(cfg, run, device, index, task, model, optimizer, scaler, create_loss(index, cfg, device, task),
                       sent["progress"], sent["lesions"])


def sync_weights(model: nn.Module) -> None:
    """Every rank's weights and buffers made rank 0's (in place)."""
    if ranks.world_size() == 1:
        return
    with torch.no_grad():
        for t in model.state_dict().values():
            torch.distributed.broadcast(t, src=0)


def data_parallel(net: nn.Module, device: torch.device, bn_statistics: str) -> nn.Module:
    """``net`` wrapped in ``DistributedDataParallel`` (with ``SyncBatchNorm`` on GPUs when batch
    norm uses batch statistics).

    Two of DDP's per-step costs are left out where they do nothing. Its gradients are views of
    its all-reduce buckets (``gradient_as_bucket_view``): each is copied into its bucket (the loop
    sets gradients to None each step) but not back out after the all-reduce. Its
    buffers (batch norm's running statistics) are sent from rank 0 before each forward only
    where the ranks' copies can differ: batch statistics without SyncBatchNorm (CPU ranks), each
    rank's running statistics then following its own batches. SyncBatchNorm updates them from
    the whole step's batch, the same on every rank; frozen statistics never change; a world of
    one has no other copy. On a GPU each of the two costs a kernel launch per tensor per step
    (about 160 for ResNet50), which the Python thread pays when loading keeps it busy."""
    world = ranks.world_size()
    synced_bn = device.type == "cuda" and bn_statistics == "batch" and world > 1
    if synced_bn:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    ids = [device.index] if device.type == "cuda" else None
    differ = world > 1 and bn_statistics == "batch" and not synced_bn
    # torch 2.13 renamed broadcast_buffers (still accepted, with a deprecation warning).
    named = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    sync = {"forward_sync_buffers" if "forward_sync_buffers" in named else "broadcast_buffers": differ}
    return nn.parallel.DistributedDataParallel(net, device_ids=ids, output_device=device.index if ids else None,
                                               gradient_as_bucket_view=True, **sync)


def merge_predictions(part: Predictions) -> Predictions:
    """Every rank's validation predictions (each image scored on one rank) as one set in the
    split's order, with the mean loss over all images, on every rank."""
    if ranks.world_size() == 1:
        return part
    n_part = len(part.targets)
    parts = ranks.gather((part.probs, part.targets, part.indices, part.logits, part.loss * n_part if n_part else 0.0, n_part))
    order = np.argsort(np.concatenate([p[2] for p in parts]), kind="stable")
    cat = lambda k: np.concatenate([p[k] for p in parts])[order]  # noqa: E731
    n = sum(p[5] for p in parts)
    return Predictions(part.task, cat(0), cat(1), cat(2), sum(p[4] for p in parts) / n if n else float("nan"), cat(3))
