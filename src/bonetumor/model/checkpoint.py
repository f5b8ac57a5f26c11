"""Checkpoints: written atomically, read with ``weights_only=True`` (a file never runs code)."""

from __future__ import annotations

import math
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from bonetumor.config import TrainConfig, config_from_dict, config_to_dict
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from bonetumor.errors import BonetumorError, first_line
from bonetumor.files import atomic_path
from bonetumor.model.backbones import create_empty_model
from bonetumor.model.ood import attach_distance
from bonetumor.model.serialization import (
    FORMAT,
    FORMAT_VERSION,
    check_integrity,
    is_bonetumor_checkpoint,
    read_checkpoint_file,
    read_records,
    read_torch_file,
    save_sealed,
    weights_digest,
)
from bonetumor.runtime.precision import model_precision
from bonetumor.task import Task

__all__ = ["LoadedCheckpoint", "is_bonetumor_checkpoint", "load_checkpoint", "read_checkpoint_file", "read_torch_file",
           "save_checkpoint", "checkpoint_payload", "update_checkpoint", "weights_digest", "write_checkpoint"]


def save_checkpoint(path: str | Path, model: torch.nn.Module, cfg: TrainConfig, classes: list[str], *,
                    optimizer: torch.optim.Optimizer | None = None, scaler_state: dict | None = None,
                    epoch: int = 0, threshold: float = 0.5, extra: dict | None = None) -> None:
    """Write everything needed to predict, evaluate or resume, atomically.

    Holds: model weights, optimizer state, epoch, config, class names, image size,
    normalisation and the decision threshold (plus ``extra``: history, early-stopping state).
    """
    write_checkpoint(path, checkpoint_payload(model, cfg, classes, optimizer=optimizer, scaler_state=scaler_state,
                                              epoch=epoch, threshold=threshold, extra=extra, copy=False))


def checkpoint_payload(model: torch.nn.Module, cfg: TrainConfig, classes: list[str], *,
                       optimizer: torch.optim.Optimizer | None = None, scaler_state: dict | None = None,
                       epoch: int = 0, threshold: float = 0.5, extra: dict | None = None, copy: bool = True) -> dict:
    """The content of a checkpoint, for ``write_checkpoint``; with ``copy`` a snapshot on the CPU
    that later training steps leave unchanged (so the best epoch can be written later). Frozen
    modules' tensors cannot change, so the snapshot shares them instead of copying 94 MB."""
    frozen = _frozen_tensor_names(model) if copy else set()
    weights = {k: v.detach() if k in frozen and v.device.type == "cpu" else _cpu(v, copy)
               for k, v in model.state_dict().items()}
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": weights,
        "optimizer": _cpu(optimizer.state_dict(), copy) if optimizer is not None else None,
        "scaler": _cpu(scaler_state, copy),
        "epoch": int(epoch),
        "config": config_to_dict(cfg),
        "classes": list(classes),
        "backbone": cfg.backbone,
        "image_size": int(cfg.image_size),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "threshold": float(threshold),
        "extra": _cpu(extra or {}, copy),
    }


def snapshot_bytes(model: torch.nn.Module) -> int:
    """Bytes a snapshot (``checkpoint_payload`` with ``copy``) of ``model`` copies: its tensors
    outside frozen modules."""
    frozen = _frozen_tensor_names(model)
    return sum(v.numel() * v.element_size() for k, v in model.state_dict().items() if k not in frozen)


def _frozen_tensor_names(model: torch.nn.Module) -> set[str]:
    """State-dict names of the parameters and buffers of modules whose parameters are all frozen
    (their BatchNorm statistics stay fixed too: see Classifier.train)."""
    names = set()
    for prefix, m in model.named_modules():
        own = list(m.parameters(recurse=False))
        if own and not any(p.requires_grad for p in own):
            dot = f"{prefix}." if prefix else ""
            names.update(dot + n for n, _ in m.named_parameters(recurse=False))
            names.update(dot + n for n, b in m.named_buffers(recurse=False) if b is not None)
    return names


def _cpu(obj, copy: bool):
    """``obj`` with every tensor on the CPU (copied, with ``copy``) and containers rebuilt."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=copy)
    if isinstance(obj, dict):
        return {k: _cpu(v, copy) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v, copy) for v in obj)
    return obj


def write_checkpoint(path: str | Path, payload: dict) -> None:
    """Write ``payload`` (from ``checkpoint_payload``) atomically, sealed with its checksum."""
    with atomic_path(path) as tmp:
        save_sealed(payload, tmp)


def update_checkpoint(path: str | Path, fields: dict, raw: dict | None = None) -> None:
    """Rewrite a checkpoint with some entries set (e.g. the threshold chosen after training),
    atomically; ``raw`` is its already-read (and checked) content, if at hand."""
    write_checkpoint(path, {**(raw if raw is not None else read_checkpoint_file(path)), **fields})


@dataclass
class LoadedCheckpoint:
    """A model ready for inference plus what the checkpoint says about it."""

    model: torch.nn.Module
    config: TrainConfig
    classes: list[str]
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    threshold: float
    epoch: int
    raw: dict
    integrity: Future | None = None  # the weights' checksum check, when deferred (``verified``)

    def verified(self) -> "LoadedCheckpoint":
        """This checkpoint once its weights' checksum has been checked (waits for a deferred check).

        Raises:
            BonetumorError: the weights do not match their checksum.
        """
        if self.integrity is not None:
            self.integrity.result()
        return self

    @property
    def threshold_chosen(self) -> bool:
        """Whether training chose the threshold on validation: a best.pt written before training
        ended (stopped, killed or still running) holds the default 0.5."""
        return "operating_point" in self.raw or self.threshold != 0.5

    @property
    def read_options(self) -> ReadOptions:
        """How the model's training read its images (window, slice axis), to read new ones alike."""
        return self.config.read_options

    @property
    def task(self) -> Task:
        """What the model's outputs mean for its classes."""
        return Task.of(self.classes)

    def precision_on(self, device: torch.device) -> str:
        """The precision this model runs at on ``device`` (``runtime.precision.model_precision``);
        a quantised model's own (int8, or fp32 where it could not be quantised) anywhere."""
        return self.raw.get("fixed_precision") or model_precision(self.config.precision, device)

    @property
    def ood(self) -> dict | None:
        """The out-of-distribution check's record (threshold, quantile, fit facts; model/ood.py),
        or None for a model trained without one."""
        record = self.raw.get("ood")
        return record if isinstance(record, dict) and "threshold" in record else None

    @property
    def positive_class(self) -> str:
        """The class whose probability a binary model outputs."""
        return self.classes[-1]

    def label_for(self, prob) -> str:
        """The predicted class: P(positive) >= threshold for binary models, else the most probable class."""
        return self.task.label(prob, self.threshold)


def _read_checked(path: str | Path, records: bool = False) -> dict:
    """A checkpoint file's contents, refused unless bonetumor wrote it in a format it reads;
    tensors mapped from the file. ``records``: for its records alone (``read_records``)."""
    obj = read_records(path) if records else read_torch_file(path, mmap=True)
    if not is_bonetumor_checkpoint(obj):
        raise BonetumorError(f"{path}: not a bonetumor checkpoint (no format marker)")
    if obj.get("format_version", 0) > FORMAT_VERSION:
        raise BonetumorError(f"{path}: written by a newer bonetumor (format {obj['format_version']}); upgrade")
    return obj


def checkpoint_config(path: str | Path) -> TrainConfig:
    """A checkpoint's training config, read without building its model (a fraction of the time).

    Raises:
        BonetumorError: missing, foreign, too new or incomplete file.
    """
    obj = _read_checked(path, records=True)
    try:
        return config_from_dict(obj["config"])
    except (KeyError, TypeError) as e:
        raise BonetumorError(f"{path}: checkpoint is incomplete ({first_line(e, 160)})") from None


def load_checkpoint(path: str | Path, device: torch.device | str = "cpu", check: str = "now") -> LoadedCheckpoint:
    """Load a bonetumor checkpoint and rebuild its model (eval mode) on ``device``.

    ``check``: ``now`` checks the weights against their checksum before returning; ``deferred``
    checks them in a thread while the caller works, and the caller must call ``verified()``
    before it shows or writes any result. A checksum of ResNet50's weights takes about half a
    second here, which a one-image prediction would otherwise wait for.

    Raises:
        BonetumorError: missing, foreign, tampered or incompatible file.
    """
    obj = _read_checked(path)
    state = obj.get("model")
    # hashing releases the GIL: it runs beside building the model
    pool = ThreadPoolExecutor(1, thread_name_prefix="bonetumor-checksum")
    integrity = pool.submit(check_integrity, path, obj)
    pool.shutdown(wait=False)
    try:
        rec = _checked_records(obj)
        cfg, classes = rec["config"], rec["classes"]
        model = create_empty_model(cfg.backbone, Task.of(classes).n_outputs, cfg.hidden, cfg.dropout,
                                   cfg.output_stride)
        attach_distance(model, state)
        model.load_state_dict(state, assign=True)
    except (KeyError, TypeError, RuntimeError, AttributeError, ValueError, BonetumorError) as e:
        integrity.result()  # a damaged file says so first
        raise BonetumorError(f"{path}: checkpoint is incomplete, has invalid values or does not match its model "
                             f"({first_line(e, 160)})") from None
    if check == "now":
        integrity.result()
        integrity = None
    model.temperature = rec["temperature"]
    model.to(device).to(memory_format=torch.channels_last).eval()  # as inputs are: no layout reorders per call
    return LoadedCheckpoint(model, cfg, classes, rec["image_size"], rec["mean"], rec["std"], rec["threshold"],
                            rec["epoch"], obj, integrity)


def _checked_records(obj: dict) -> dict:
    """The entries that steer a prediction, each checked: a checksum says a file is as written,
    not that what was written makes sense (a file can be made by hand, checksum and all).

    Raises:
        ValueError, KeyError, TypeError, BonetumorError: naming the entry.
    """
    cfg = config_from_dict(obj["config"])
    classes = obj["classes"]
    if (not isinstance(classes, list) or len(classes) < 2 or len(set(classes)) != len(classes)
            or not all(isinstance(c, str) and c for c in classes)):
        raise ValueError(f"classes must be two or more distinct names, not {classes!r}")
    norm = obj.get("normalization", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    mean, std = tuple(float(v) for v in norm["mean"]), tuple(float(v) for v in norm["std"])
    rec = {"config": cfg, "classes": list(classes), "mean": mean, "std": std,
           "image_size": _number(obj, "image_size", int, 8, 8192), "threshold": _number(obj, "threshold", float, 0, 1, 0.5),
           "temperature": _number(obj, "temperature", float, 1e-3, 1e3, 1.0), "epoch": _number(obj, "epoch", int, 0, 10**9, 0)}
    ood = obj.get("ood")
    if ood is not None:
        _number(ood, "threshold", float, 0, 1e12)
        _number(ood, "quantile", float, 0, 1)
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"normalization must be 3 finite means and 3 positive deviations, not {norm!r}")
    return rec


def _number(obj: dict, key: str, kind: type, low: float, high: float, default: float | None = None):
    """``obj[key]`` as ``kind``, finite and within [low, high] (``default`` when missing)."""
    value = obj.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key} must be a number, not {value!r}")
    if not (math.isfinite(value) and low <= value <= high) or (kind is int and value != int(value)):
        raise ValueError(f"{key} must be {'a whole number' if kind is int else 'a number'} from {low:g} to "
                         f"{high:g}, not {value!r}")
    return kind(value)
