"""How a command ends on a problem the user can fix: one line on stderr and exit code 2, never
a traceback, and under torchrun one line for the whole job."""

from __future__ import annotations

import os
import time
from functools import wraps
from typing import Callable

import typer

from bonetumor.cli.show import err
from bonetumor.errors import BonetumorError, RankStopped

# How long a rank that stopped for another's error waits for rank 0 to print that error and end.
# torchrun stops every rank as soon as one ends; were it this one, rank 0 might be stopped before
# its line is out. Rank 0's end stops this wait at once, so the bound is seldom reached.
RANK_0_GRACE_S = 5.0


def friendly(fn: Callable) -> Callable:
    """Turn user-fixable errors into one line and exit code 2."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RankStopped:
            if os.environ.get("RANK", "0") != "0":  # a rank of a torchrun job, not its launcher
                time.sleep(RANK_0_GRACE_S)
            raise typer.Exit(2) from None
        except BonetumorError as e:
            err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted")
            raise typer.Exit(130) from None
    return wrapper
