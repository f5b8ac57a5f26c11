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
