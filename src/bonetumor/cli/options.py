"""Command-line options made from the config schema, so that flags, YAML keys and docs agree.

``with_config_options`` gives a command one flag per ``TrainConfig`` field (grouped into help
panels, with its default), and hands the values given to the command as ``options``: a dict of
field name -> value, None where the flag was not given (so that a YAML file's value stands).
"""

from __future__ import annotations

import inspect
import typing
from functools import wraps
from typing import Callable, Optional

import typer

from bonetumor.config import GROUPS, default_text, options, value_type


def config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter (a typer Option defaulting to None) per ``TrainConfig`` field."""
    params = []
    for f, opt in options():
        if not opt.cli:
            continue
        typ = value_type(f)
        decl = opt.flag(f.name)
        if typ is bool:
            decl = f"{decl}/--no-{decl[2:]}"
        help_text = opt.help + (f" One of: {', '.join(map(str, opt.choices))}." if opt.choices else "")
        info = typer.Option(None, decl, help=help_text, show_default=default_text(f, opt),
                            rich_help_panel=GROUPS[opt.group])
        annotation = Optional[str if typ is list else typ]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=annotation))
    return params


def with_config_options(fn: Callable) -> Callable:
    """``fn(..., options: dict)`` as a command that takes every config field as a flag."""
    own = [p for name, p in inspect.signature(fn).parameters.items() if name != "options"]
    hints = typing.get_type_hints(fn)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in own]
    extra = config_parameters()
    names = {p.name for p in extra}

    @wraps(fn)
    def command(**kwargs):
        return fn(**{k: v for k, v in kwargs.items() if k not in names},
                  options={k: v for k, v in kwargs.items() if k in names})

    params = own + extra
    command.__signature__ = inspect.Signature(params)
    command.__annotations__ = {p.name: p.annotation for p in params}
    return command


# The options of the commands other than train and cv, by parameter name: the panel each is
# listed under in --help (the config schema's groups), and the help of those that share one.
PANELS = {
    "Data": ("manifest", "split", "class_map", "external", "exclude_near_duplicates_of", "skip_bad_files", "window",
             "slice_axis", "allow_large_images", "masks", "boxes", "top_slices", "n_patients", "size", "seed",
             "modality", "slices", "bit_depth", "zoom", "fmt", "near_threshold", "aggregate", "folds", "eval_dir",
             "explain_dir"),
    "Model": ("method", "target", "layer", "engine", "precision", "compile_mode", "backbone", "epochs", "guided"),
    "Runtime": ("device", "batch_size", "workers", "host", "port", "token", "max_upload_mb", "nproc_per_node"),
    "Output": ("out_dir", "out_file", "onnx", "overwrite", "resume", "config", "as_json", "strict"),
}
SHARED_HELP = {
    "overwrite": "Replace the output folder or file if it exists (it is never replaced without this).",
    "manifest": "CSV with path,label[,patient_id][,split].",
    "batch_size": "Images per batch.",
    "workers": "Processes decoding images ahead of the model (0: in the main process).",
    "skip_bad_files": "List unreadable files with their problem instead of stopping.",
    "port": "TCP port to listen on.",
}
# What an option whose default is None does when not given, as its help shows it.
UNSET_TEXT = {
    ("evaluate", "batch_size"): "the model's training batch size", ("predict", "batch_size"): "8 on a CPU, 64 on a GPU",
    ("predict", "workers"): "up to 8 on a GPU, none on a CPU", ("evaluate", "split"): "test; all with --external",
    ("predict", "window"): "the model's", ("demo", "epochs"): "the demo's", ("report", "out_file"): "RUN/report.html",
    ("serve", "token"): "none: loopback only", ("explain", "layer"): "the backbone's last block",
}


def tidy_panels(app: typer.Typer) -> None:
    """Give every option of ``app``'s commands a help panel (``PANELS``) and, where it has none,
    its shared help text; the generated config options have theirs already."""
    panel_of = {name: panel for panel, names in PANELS.items() for name in names}
    for command in app.registered_commands:
        for name, param in inspect.signature(command.callback).parameters.items():
            info = param.default
            if not isinstance(info, typer.models.OptionInfo):
                continue
            info.rich_help_panel = info.rich_help_panel or panel_of.get(name, "Output")
            info.help = info.help or SHARED_HELP.get(name)
            if info.default is None and info.show_default is True:
                info.show_default = UNSET_TEXT.get((command.name or command.callback.__name__, name), "none")
