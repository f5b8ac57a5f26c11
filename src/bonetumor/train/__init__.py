"""Training: ``fit(cfg, out)`` (loop.py) over a run set up by setup.py, a batch source of images
or cached features (batches.py) and an epoch's-end policy of early stopping and checkpoints
(checkpointer.py)."""

from bonetumor.train.loop import FitResult, fit, lr_at_epoch
from bonetumor.train.setup import console, prepare_data

__all__ = ["FitResult", "console", "fit", "lr_at_epoch", "prepare_data"]
