"""TensorBoard: event files in the run folder (``RUN/tensorboard``), written by PyTorch's own
``SummaryWriter``; ``tensorboard --logdir RUNS`` then shows every run below RUNS side by side."""

from __future__ import annotations

import json
from pathlib import Path

from bonetumor.tracking.base import Tracker

LOG_DIR = "tensorboard"


class TensorBoardTracker(Tracker):
    """Scalars per epoch, figures and heatmap panels as images, the config and tags as text."""

    name = "tensorboard"

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.writer = None

    def start(self, meta: dict) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(self.log_dir))
        if meta.get("config"):
            # Markdown: indented four spaces, the YAML shows as written.
            self.writer.add_text("config", "\n".join("    " + line for line in meta["config"].splitlines()))
        if meta.get("tags"):
            self.set_tags(meta["tags"])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for k, v in metrics.items():
            self.writer.add_scalar(k, float(v), step or 0)

    def log_image(self, path: Path, tag: str) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as im:
            pixels = np.asarray(im.convert("RGB"))
        self.writer.add_image(tag, pixels, 0, dataformats="HWC")

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.add_text("tags", "    " + json.dumps(tags, indent=1).replace("\n", "\n    "))

    def record(self) -> dict:
        return {"tracker": self.name, "log_dir": LOG_DIR}

    def close(self, status: str = "FINISHED") -> None:
        if self.writer is not None:
            self.writer.close()
