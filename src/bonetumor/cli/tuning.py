"""``lr-find``: the learning-rate range test, with every training option (train/lr_find.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from bonetumor.cli.friendly import friendly
from bonetumor.cli.options import with_config_options
from bonetumor.cli.show import out


@friendly
@with_config_options
def lr_find_command(
    data: Optional[str] = typer.Argument(None, help="Data folder (same layout rules as train)."),
    out_dir: Path = typer.Option(..., "--out", help="Folder for lr_find.json, lr_find.png and the run record."),
    start_lr: float = typer.Option(1e-7, help="First learning rate of the sweep."),
    end_lr: float = typer.Option(10.0, help="Last learning rate of the sweep (it stops early when the loss diverges)."),
    steps: int = typer.Option(200, help="Training steps of the sweep, at exponentially growing rates."),
    config: Optional[Path] = typer.Option(None, help="YAML file of training options (as for train)."),
    overwrite: bool = typer.Option(False),
    options: dict = None,
):
    """Learning-rate range test: the loss over a sweep of rates with the run's own model and
    data (the head alone on cached features when the backbone is frozen), and a suggested --lr.
    Takes every training option (docs/options.md)."""
    from bonetumor.config import load_config
    from bonetumor.train.lr_find import lr_find

    r = lr_find(load_config(config, {"data": data, **options}), out_dir, start_lr, end_lr, steps, overwrite=overwrite)
    stopped = f", stopped after {len(r.lrs)} steps as the loss diverged" if r.diverged else ""
    out.print(f"suggested learning rate: {r.suggested_lr:.2e} (steepest fall of the smoothed loss, {r.path}{stopped}); "
              f"plot: {r.out / 'lr_find.png'}")
