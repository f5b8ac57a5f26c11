"""Run configuration: defaults < YAML file < command-line flags, saved in every run folder."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from bonetumor.data.pixels import ReadOptions, parse_window
from bonetumor.errors import BonetumorError, first_line
from bonetumor.files import atomic_write_text

THRESHOLD_RULES = ("youden", "sensitivity:X", "specificity:X", "fixed:X")


def parse_rule(rule: str) -> tuple[str, float | None]:
    """``youden`` | ``sensitivity:0.95`` | ``specificity:0.9`` | ``fixed:0.5`` → (kind, value)."""
    kind, _, value = rule.partition(":")
    kind = kind.strip().lower()
    if kind == "youden" and not value:
        return kind, None
    if kind in ("sensitivity", "specificity", "fixed"):
        try:
            v = float(value)
        except ValueError:
            v = -1.0
        if 0.0 <= v <= 1.0:
            return kind, v
    raise BonetumorError(f"--threshold-rule {rule!r}: use youden, sensitivity:X, specificity:X or fixed:X with X in [0, 1]")


@dataclass
class TrainConfig:
    """Everything that decides a training run. Saved as ``config.yaml`` in the run folder."""

    # Data
    data: str | None = None
    manifest: str | None = None
    train_dir: str | None = None
    val_dir: str | None = None
    test_dir: str | None = None
    positive_class: str | None = None
    val_fraction: float = 0.15
    test_fraction: float = 0.15
    skip_bad_files: bool = False
    audit: bool = True  # leakage audit before training (audit.json in the run folder)
    # Reading (see data.io.ReadOptions): kept with the model, so prediction reads alike
    window: str | None = None  # None: the file's own; "C,W" centre,width; "pLO,pHI" percentiles
    slice_axis: int = 2  # NIfTI volumes are sliced across this axis
    allow_large_images: bool = False  # above Pillow's decompression-bomb limit
    # Preprocessing and augmentation (the original: flip, zoom 0.9-1.1, rotate)
    image_size: int = 224
    hflip: bool = True
    rotate_degrees: float = 15.0
    zoom_min: float = 0.9
    zoom_max: float = 1.1
    # Model
    backbone: str = "resnet50"
    weights: str = "imagenet"
    freeze: str = "backbone"
    unfreeze: list[str] = field(default_factory=list)
    dropout: float = 0.5
    hidden: int = 256
    output_stride: int = 32  # 16 or 8 (resnet50): finer last feature map, finer Grad-CAM
    # Fine-tuning: the first N backbone stages (1 = the stem) are recomputed in backward instead
    # of kept, for less memory (see recompute.py); no effect on a frozen backbone or the results.
    recompute_stages: int = 0
    # Fine-tuning: BatchNorm statistics updated from each batch ("batch") or kept from the
    # pretrained weights ("frozen", folded into the convolutions: faster, less memory); "auto":
    # frozen from pretrained weights, batch from random ones (see batchnorm.py).
    bn_statistics: str = "auto"
    # Frozen-backbone fast path: features computed once per image and view (see features.py)
    cache_features: bool = True
    feature_views: int = 4  # augmented views per training image; 1 = no augmentation
    feature_cache_dir: str | None = None  # also keep features on disk, keyed by content and recipe
    compile: str = "auto"  # torch.compile the frozen backbone's feature pass: auto (large jobs), on, off
    cache_images: bool | None = None  # decoded, resized images kept in memory; None: on for GPUs
    # Optimisation (the original: Adam, binary cross-entropy, early stopping patience 5)
    epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant (as the original) or cosine (decay to 1% by the last epoch)
    weight_decay: float = 0.0
    class_balanced: bool = False
    patience: int = 5
    # best.pt/last.pt are written when this many seconds have passed since the last write, and at
    # the end: every epoch of a long run, but not 94 MB per sub-second epoch of the cached head.
    checkpoint_seconds: float = 30.0
    # Operating point and calibration, fitted on validation after training
    threshold_rule: str = "youden"  # youden | sensitivity:X | specificity:X | fixed:X
    calibrate: bool = False  # temperature scaling
    # Runtime
    seed: int = 42
    device: str = "auto"
    workers: int = 0
    precision: str = "auto"  # auto: the native bf16/fp16 if it agrees with fp32 (precision.py); fp32, bf16, fp16

    @property
    def read_options(self) -> ReadOptions:
        """How this run reads pixels (window, slice axis, size limit); kept with the model."""
        return ReadOptions(window=self.window, slice_axis=self.slice_axis, allow_large=self.allow_large_images)

    def validate(self) -> None:
        """Raise BonetumorError on values that cannot work, naming the option."""
        if self.data is None and self.manifest is None and self.train_dir is None:
            raise BonetumorError("no data given: pass DATA, --manifest or --train-dir")
        checks = [
            (self.image_size >= 32, f"--image-size must be at least 32, not {self.image_size}"),
            (self.batch_size >= 1, f"--batch-size must be at least 1, not {self.batch_size}"),
            (self.epochs >= 1, f"--epochs must be at least 1, not {self.epochs}"),
            (self.lr > 0, f"--lr must be positive, not {self.lr}"),
            (self.patience >= 1, f"--patience must be at least 1, not {self.patience}"),
            (self.workers >= 0, f"--workers must be 0 or more, not {self.workers}"),
            (self.checkpoint_seconds >= 0, f"--checkpoint-seconds must be 0 or more, not {self.checkpoint_seconds}"),
            (self.compile in ("auto", "on", "off"), f"--compile must be auto, on or off, not {self.compile!r}"),
            (self.feature_views >= 1, f"--feature-views must be at least 1, not {self.feature_views}"),
            (0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), not {self.val_fraction}"),
            (0 <= self.test_fraction < 1, f"test_fraction must be in [0, 1), not {self.test_fraction}"),
            (self.zoom_min <= self.zoom_max, "zoom_min must not exceed zoom_max"),
            (self.freeze in ("backbone", "none"), f"--freeze must be 'backbone' or 'none', not {self.freeze!r}"),
            (self.lr_schedule in ("constant", "cosine"), f"--lr-schedule must be constant or cosine, not {self.lr_schedule!r}"),
            (0 <= self.recompute_stages <= 5, f"--recompute-stages must be 0 to 5, not {self.recompute_stages}"),
            (self.bn_statistics in ("auto", "batch", "frozen"),
             f"--bn-statistics must be auto, batch or frozen, not {self.bn_statistics!r}"),
            (self.output_stride in (8, 16, 32), f"--output-stride must be 32, 16 or 8, not {self.output_stride}"),
            (self.precision in ("auto", "fp32", "bf16", "fp16"),
             f"--precision must be auto, fp32, bf16 or fp16, not {self.precision!r}"),
        ]
        parse_rule(self.threshold_rule)
        parse_window(self.window)
        checks.append((self.slice_axis in (0, 1, 2), f"--slice-axis must be 0, 1 or 2, not {self.slice_axis}"))
        for ok, msg in checks:
            if not ok:
                raise BonetumorError(msg)


def _coerce(name: str, value: Any, typ: Any) -> Any:
    """Convert a YAML value to the field's type, so a typo fails here and not mid-run."""
    t = str(typ)
    try:
        if value is None:
            return None
        if t.startswith("list"):
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if "bool" in t:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        if "int" in t and "float" not in t:
            return int(value)
        if "float" in t:
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise BonetumorError(f"config: {name} = {value!r} is not a valid {t}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a TrainConfig: defaults, then the YAML file at ``path``, then non-None ``overrides``."""
    known = {f.name: f.type for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except FileNotFoundError:
            raise BonetumorError(f"{p}: config file not found") from None
        except yaml.YAMLError as e:
            raise BonetumorError(f"{p}: not valid YAML ({first_line(e)})") from None
        if not isinstance(raw, dict):
            raise BonetumorError(f"{p}: expected a mapping of option: value")
        for k, v in raw.items():
            key = str(k).replace("-", "_")
            if key not in known:
                raise BonetumorError(f"{p}: unknown option {k!r}")
            values[key] = _coerce(key, v, known[key])
    for k, v in (overrides or {}).items():
        if v is not None:
            if k not in known:
                raise BonetumorError(f"unknown option {k!r}")
            values[k] = v
    return dataclasses.replace(TrainConfig(), **values)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain dict (YAML/JSON and torch weights_only safe)."""
    return asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of config_to_dict; ignores keys a newer version may have added."""
    known = {f.name for f in fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in d.items() if k in known})


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
