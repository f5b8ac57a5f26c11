"""Training: ``fit(cfg, out)`` (loop.py) over a run set up by setup.py, a batch source of images
or cached features (batches.py) and a checkpoint policy (checkpointer.py)."""

from bonetumor.train.loop import FitResult, fit
from bonetumor.train.setup import console, lr_at_epoch, prepare_data

__all__ = ["FitResult", "console", "fit", "lr_at_epoch", "prepare_data"]
