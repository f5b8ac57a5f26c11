"""Prediction on files and folders with a trained checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from bonetumor.checkpoint import load_checkpoint
from bonetumor.data.datasets import load_tensor
from bonetumor.data.io import is_image_file
from bonetumor.data.transforms import create_transforms
from bonetumor.errors import BonetumorError
from bonetumor.utils import select_device


def expand_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image files below them (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f))
            if not found:
                raise BonetumorError(f"{p}: folder holds no image files")
            out += found
        elif p.exists():
            out.append(p)
        else:
            raise BonetumorError(f"{p}: file not found")
    return out


@torch.inference_mode()
def predict(checkpoint: str | Path, paths: Sequence[str | Path], device: str = "auto", batch_size: int = 16) -> list[dict]:
    """Probability of the positive class and the label at the checkpoint's threshold, per file.

    Returns:
        [{"path", "probability", "label", "threshold"}] for binary models; multiclass models
        give {"path", "probabilities": {class: p}, "label"}.

    Raises:
        BonetumorError: a missing or unreadable file (one line naming it), a bad checkpoint.
    """
    dev = select_device(device)
    ck = load_checkpoint(checkpoint, dev)
    files = expand_paths(paths)
    tf = create_transforms(False, ck.image_size, mean=ck.mean, std=ck.std)
    results = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        x = torch.stack([tf(load_tensor(f)) for f in chunk]).to(dev).contiguous(memory_format=torch.channels_last)
        logits = ck.model(x).float()
        if logits.shape[1] == 1:
            for f, p in zip(chunk, torch.sigmoid(logits[:, 0]).tolist()):
                results.append({"path": str(f), "probability": round(p, 6), "label": ck.label_for(p),
                                "threshold": ck.threshold})
        else:
            for f, p in zip(chunk, torch.softmax(logits, 1).tolist()):
                results.append({"path": str(f), "probabilities": dict(zip(ck.classes, p)), "label": ck.label_for(p)})
    return results
