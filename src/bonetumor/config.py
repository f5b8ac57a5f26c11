"""Run configuration: one schema, grouped; defaults < YAML file < command-line flags.

Every field of ``TrainConfig`` carries its help text, group, allowed values and checks
(``option``). From that one schema come the YAML keys (``load_config``), validation
(``TrainConfig.validate``), the options of ``train`` and ``cv`` (cli/options.py) and the options
table of the docs (``options_markdown``: ``make docs`` writes docs/options.md, and a test fails
while it is out of date), so that they cannot drift apart.
The resolved config is saved as ``config.yaml`` in every run folder and inside its checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from bonetumor.data.pixels import ReadOptions, parse_window
from bonetumor.errors import BonetumorError, first_line
from bonetumor.files import atomic_write_text

GROUPS = {"data": "Data", "read": "Reading and preprocessing", "model": "Model", "optimisation": "Optimisation",
          "runtime": "Runtime", "output": "Output"}
THRESHOLD_RULES = ("youden", "sensitivity:X", "specificity:X", "fixed:X")
WINDOW_HELP = "CENTRE,WIDTH in stored units (e.g. 40,400 Hounsfield) or pLOW,pHIGH percentiles (e.g. p1,p99)."
WINDOW_DEFAULT = "the file's own (DICOM header, NIfTI 0.5-99.5 percentiles)"


@dataclass(frozen=True)
class Option:
    """What the schema knows of one field besides its type and default."""

    help: str
    group: str
    choices: tuple | None = None  # the only values allowed
    rule: str | None = None  # what ``check`` requires, in words ("at least 1")
    check: Callable[[Any], bool] | None = None
    cli: bool = True  # a flag of train and cv (``data`` is their argument instead)
    default_text: str | None = None  # how the default reads in help, when not its value

    def flag(self, name: str) -> str:
        return "--" + name.replace("_", "-")


def option(default: Any = None, *, help: str, group: str, factory: Callable | None = None, **kw) -> Any:
    """A ``TrainConfig`` field with its ``Option``."""
    meta = {"option": Option(help, group, **kw)}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _at_least(n):
    return {"rule": f"at least {n}", "check": lambda v: v >= n}


@dataclass
class TrainConfig:
    """Everything that decides a training run. Saved as ``config.yaml`` in the run folder."""

    # Data
    data: str | None = option(help="Data folder (any supported layout).", group="data", cli=False)
    manifest: str | None = option(help="CSV with path,label[,patient_id][,split][,mask_path].", group="data")
    train_dir: str | None = option(help="Training folder of <class>/ subfolders.", group="data")
    val_dir: str | None = option(help="Validation folder of <class>/ subfolders.", group="data")
    test_dir: str | None = option(help="Test folder of <class>/ subfolders.", group="data")
    positive_class: str | None = option(help="Positive class when none is named 'cancer'.", group="data",
                                        default_text="the class named cancer")
    val_fraction: float = option(0.15, help="Validation share when the tool splits.", group="data",
                                 rule="in (0, 1)", check=lambda v: 0 < v < 1)
    test_fraction: float = option(0.15, help="Test share when the tool splits (0 for none).", group="data",
                                  rule="in [0, 1)", check=lambda v: 0 <= v < 1)
    split_by: str = option("given", help="given: the data's own splits, the rest split by patient; patient: "
                           "everything re-split, a patient's images together; cluster: also each cluster of copies "
                           "(exact, near, same export source) and each source group of both classes in one split.", group="data",
                           choices=("given", "patient", "cluster"))
    skip_bad_files: bool = option(False, help="List unreadable files with their problem instead of stopping.",
                                  group="data")
    audit: bool = option(True, help="Leakage audit before training (audit.json in the run folder).", group="data")
    # Reading and preprocessing (see data/pixels.py): kept with the model, so prediction reads alike
    window: str | None = option(help=WINDOW_HELP, group="read", default_text=WINDOW_DEFAULT)
    slice_axis: int = option(2, help="NIfTI axis to slice across (2 = axial in RAS).", group="read", choices=(0, 1, 2))
    allow_large_images: bool = option(False, help="Read images above Pillow's decompression-bomb limit.", group="read")
    image_size: int = option(224, help="Side of the square model input in pixels.", group="read", **_at_least(32))
    hflip: bool = option(True, help="Training augmentation: random horizontal flip.", group="read")
    rotate_degrees: float = option(15.0, help="Training augmentation: random rotation up to ± this.", group="read",
                                   **_at_least(0))
    zoom_min: float = option(0.9, help="Training augmentation: smallest random zoom.", group="read", **_at_least(0.01))
    zoom_max: float = option(1.1, help="Training augmentation: largest random zoom.", group="read", **_at_least(0.01))
    # Model
    backbone: str = option("resnet50", help="resnet50, densenet121 or efficientnet_b0 (torchvision).", group="model")
    weights: str = option("imagenet", help="imagenet (torchvision's weights API), none (random) or a weights or "
                          "checkpoint file.", group="model")
    freeze: str = option("auto", help="backbone (train the head only), none (train everything) or auto (backbone "
                         "with pretrained weights, none with --weights none).", group="model",
                         choices=("auto", "backbone", "none"))
    unfreeze: list[str] = option(help="Backbone blocks to fine-tune even when frozen, e.g. layer4,layer3.", group="model",
                                 factory=list, default_text="none")
    dropout: float = option(0.5, help="Dropout before the head's last layer.", group="model",
                            rule="in [0, 1)", check=lambda v: 0 <= v < 1)
    hidden: int = option(256, help="Width of the head's hidden layer.", group="model", **_at_least(1))
    output_stride: int = option(32, help="32, or 16/8 for resnet50: a finer last feature map and Grad-CAM.",
                                group="model", choices=(32, 16, 8))
    bn_statistics: str = option("auto", help="Fine-tuning: BatchNorm statistics from each batch (batch) or kept from "
                                "the pretrained weights (frozen: faster, less memory); auto: frozen unless --weights "
                                "none.", group="model", choices=("auto", "batch", "frozen"))
    # Optimisation
    epochs: int = option(30, help="Most epochs to train.", group="optimisation", **_at_least(1))
    batch_size: int = option(32, help="Images per training batch.", group="optimisation", **_at_least(1))
    lr: float = option(1e-3, help="Adam's learning rate.", group="optimisation", rule="positive", check=lambda v: v > 0)
    lr_schedule: str = option("constant", help="constant, or cosine (decays to 1% of --lr by the last epoch).",
                              group="optimisation", choices=("constant", "cosine"))
    weight_decay: float = option(0.0, help="Adam's weight decay.", group="optimisation", **_at_least(0))
    class_balanced: bool = option(False, help="Weight the loss so that every class counts alike.", group="optimisation")
    patience: int = option(5, help="Early stopping: epochs without a better validation loss.", group="optimisation",
                           **_at_least(1))
    threshold_rule: str = option("youden", help="Operating point chosen on validation: youden, sensitivity:0.95, "
                                 "specificity:0.9 or fixed:0.5.", group="optimisation")
    calibrate: bool = option(False, help="Temperature scaling fitted on validation.", group="optimisation")
    ood_quantile: float = option(0.99, help="Out-of-distribution check fitted after training: an image is 'unlike "
                                 "the training data' beyond this quantile of the validation images' feature distance "
                                 "(0 = no check).", group="optimisation", rule="0, or above 0.5 and below 1",
                                 check=lambda v: v == 0 or 0.5 < v < 1)
    lesion_masks: str | None = option(help="Lesion guidance: manifest (its mask_path column), a folder of mask images "
                                      "named like the images, or a CSV of boxes path,x0,y0,x1,y1. Adds a loss: one "
                                      "minus the lesion's share of the positive class's Grad-CAM; images without a "
                                      "mask add none. Trains on images, never on cached features.",
                                      group="optimisation", default_text="none (no guidance)")
    guidance_weight: float = option(1.0, help="Weight of the lesion-guidance loss beside the classification loss.",
                                    group="optimisation", **_at_least(0))
    # Runtime
    seed: int = option(42, help="Fixes splits, initialisation, shuffling and augmentation.", group="runtime")
    device: str = option("auto", help="auto (cuda > mps > cpu), cpu, cuda, cuda:N or mps.", group="runtime")
    workers: int = option(0, help="Data-loading worker processes.", group="runtime", rule="0 or more",
                          check=lambda v: v >= 0)
    precision: str = option("auto", help="auto (the device's native bf16/fp16 when a validation batch agrees with "
                            "fp32 within 0.01, else fp32), fp32, bf16 or fp16.", group="runtime",
                            choices=("auto", "fp32", "bf16", "fp16"))
    compile: str = option("auto", help="torch.compile the frozen backbone's feature pass: auto (from 5,000 image "
                          "views on), on or off.", group="runtime", choices=("auto", "on", "off"))
    cache_features: bool = option(True, help="Frozen backbone: compute its features once per image and view.",
                                  group="runtime")
    feature_views: int = option(4, help="Augmented views per training image for the feature cache (1 = none).",
                                group="runtime", **_at_least(1))
    feature_cache_dir: str | None = option(help="Also keep cached features on disk here, for later runs.",
                                           group="runtime")
    cache_images: bool | None = option(help="Keep decoded, resized images in memory.", group="runtime",
                                       default_text="on for GPUs")
    recompute_stages: int = option(0, help="Fine-tuning: recompute the first N backbone stages in backward instead of "
                                   "keeping them: less memory, more time (1 is the stem).", group="runtime",
                                   rule="0 to 5", check=lambda v: 0 <= v <= 5)
    # Output
    checkpoint_seconds: float = option(30.0, help="Write best.pt/last.pt when this many seconds have passed since the "
                                       "last write, and at the end (0 = every epoch).", group="output",
                                       rule="0 or more", check=lambda v: v >= 0)
    tracker: str = option("auto", help="Experiment tracking: mlflow, tensorboard, none, or auto (mlflow when "
                          "MLFLOW_TRACKING_URI is set, else none).", group="output",
                          choices=("auto", "none", "mlflow", "tensorboard"))
    tracking_uri: str | None = option(help="MLflow store; default MLFLOW_TRACKING_URI, else sqlite:///mlruns.db in the "
                                      "folder that holds the run folder.", group="output")

    @property
    def read_options(self) -> ReadOptions:
        """How this run reads pixels (window, slice axis, size limit); kept with the model."""
        return ReadOptions(window=self.window, slice_axis=self.slice_axis, allow_large=self.allow_large_images)

    @property
    def inputs(self) -> list[str | None]:
        """The files and folders this run reads, which its output folder may neither be nor hold."""
        masks = None if self.lesion_masks in (None, "manifest") else self.lesion_masks
        return [self.data, self.manifest, self.train_dir, self.val_dir, self.test_dir, self.weights, masks]

    def validate(self, need_data: bool = True) -> None:
        """Raise BonetumorError on values that cannot work, naming the option (``need_data``:
        also when no data is named, which a saved model's config need not)."""
        if need_data and self.data is None and self.manifest is None and self.train_dir is None:
            raise BonetumorError("no data given: pass DATA, --manifest or --train-dir")
        for f in fields(self):
            opt, value = f.metadata["option"], getattr(self, f.name)
            if opt.choices is not None and value not in opt.choices:
                raise BonetumorError(f"{opt.flag(f.name)} must be {_or(opt.choices)}, not {value!r}")
            if opt.check is not None and value is not None and not opt.check(value):
                raise BonetumorError(f"{opt.flag(f.name)} must be {opt.rule}, not {value}")
        if self.zoom_min > self.zoom_max:
            raise BonetumorError("--zoom-min must not exceed --zoom-max")
        parse_rule(self.threshold_rule)
        parse_window(self.window)


def _or(values) -> str:
    """'a, b or c'."""
    words = [str(v) for v in values]
    return ", ".join(words[:-1]) + f" or {words[-1]}" if len(words) > 1 else words[0]


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


def options() -> list[tuple[dataclasses.Field, Option]]:
    """Every field of ``TrainConfig`` with its ``Option``, in order."""
    return [(f, f.metadata["option"]) for f in fields(TrainConfig)]


def value_type(f: dataclasses.Field) -> type:
    """The Python type of a field's values (a list is given as comma-separated text)."""
    t = str(f.type)
    if t.startswith("list"):
        return list
    for name, typ in (("bool", bool), ("int", int), ("float", float)):
        if name in t:
            return typ
    return str


def default_text(f: dataclasses.Field, opt: Option) -> str:
    """A field's default as help and docs show it."""
    if opt.default_text is not None:
        return opt.default_text
    value = f.default
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else str(value)


def _coerce(name: str, value: Any, f: dataclasses.Field) -> Any:
    """Convert a YAML value to the field's type, so a typo fails here and not mid-run."""
    typ = value_type(f)
    try:
        if value is None:
            return None
        if typ is list:
            if isinstance(value, str):
                return [v.strip() for v in value.split(",") if v.strip()]
            return [str(v) for v in value]
        if typ is bool:
            if isinstance(value, str):
                return value.lower() in ("1", "true", "yes", "on")
            return bool(value)
        return typ(value)
    except (TypeError, ValueError):
        raise BonetumorError(f"config: {name} = {value!r} is not a valid {f.type}") from None


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Build a TrainConfig: defaults, then the YAML file at ``path``, then non-None ``overrides``."""
    known = {f.name: f for f in fields(TrainConfig)}
    values: dict[str, Any] = {}
    if path is not None:
        import yaml  # here, not at the top: every command imports this module, few read YAML

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
            values[k] = _coerce(k, v, known[k]) if value_type(known[k]) is list else v
    return dataclasses.replace(TrainConfig(), **values)


def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Plain dict (YAML/JSON and torch weights_only safe)."""
    return asdict(cfg)


def config_from_dict(d: dict[str, Any]) -> TrainConfig:
    """Inverse of config_to_dict; ignores keys a newer version may have added.

    Raises:
        BonetumorError: a value of the wrong type or outside its allowed values.
    """
    if not isinstance(d, dict):
        raise BonetumorError(f"config: expected a mapping, not {type(d).__name__}")
    known = {f.name: f for f in fields(TrainConfig)}
    cfg = TrainConfig(**{k: _coerce(k, v, known[k]) for k, v in d.items() if k in known})
    cfg.validate(need_data=False)
    return cfg


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    import yaml

    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))


def options_markdown() -> str:
    """The options table of the docs (docs/options.md), one section per group."""
    out = ["# Training options", "",
           "Generated from the config schema (`bonetumor.config.TrainConfig`); `train` and `cv` take each as a flag,",
           "a YAML file (`--config`) takes the same names as keys. Flags override the file, which overrides the",
           "defaults; the resolved values are saved as `config.yaml` in the run folder.", ""]
    for group, title in GROUPS.items():
        out += [f"## {title}", "", "| flag | YAML key | default | what it does |", "|---|---|---|---|"]
        for f, opt in options():
            if opt.group != group:
                continue
            flag = opt.flag(f.name) if opt.cli else "DATA (argument)"
            if value_type(f) is bool:
                flag = f"{flag} / --no-{flag[2:]}"
            allowed = f" One of: {_or(opt.choices)}." if opt.choices else f" Must be {opt.rule}." if opt.rule else ""
            text = f"{opt.help}{allowed}".replace("<", "&lt;").replace("|", "\\|")
            out.append(f"| `{flag}` | `{f.name}` | {default_text(f, opt)} | {text} |")
        out.append("")
    return "\n".join(out)
