"""The feature cache: a frozen backbone's pooled features, computed once per image and view.

A frozen backbone gives every image the same features in every epoch, so running it again each
epoch is wasted work. Here each training image is seen through K augmented views
(``feature_views``; K = 1 means no augmentation), each view's features are computed once, and the
head trains from them (the batch source in train/batches.py draws one view per image and epoch):
E epochs cost K backbone passes instead of E.

View k of image i is drawn from its own seed, so the features are the same whatever the batch
size, worker count or order; a disk cache (``feature_cache_dir``) keys them by file content,
slice, transform, image size, view count, seed, backbone weights and precision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Sequence

import torch

from bonetumor.config import TrainConfig
from bonetumor.data.readers import load_tensor
from bonetumor.data.studies import Sample
from bonetumor.data.transforms import create_transforms
from bonetumor.files import atomic_path
from bonetumor.progress import tracked
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime.device import to_device
from bonetumor.runtime.forward import Forward, maybe_compiled
from bonetumor.runtime.precision import autocast_dtype


class _Views(torch.utils.data.Dataset):
    """(image i, view k) -> the transformed image; view k of image i always gets the same draw."""

    def __init__(self, samples: Sequence[Sample], cfg: TrainConfig, views: int, ids: Sequence[int] | None = None):
        # ids: the samples' places in the whole split, which seed their views (a rank's share keeps them)
        self.samples, self.views, self.seed = list(samples), views, cfg.seed
        self.ids = list(range(len(self.samples))) if ids is None else list(ids)
        self.options = cfg.read_options
        augment = views > 1
        self.tf = create_transforms(augment, cfg.image_size, cfg.hflip, cfg.rotate_degrees, (cfg.zoom_min, cfg.zoom_max))

    def __len__(self) -> int:
        return len(self.samples) * self.views

    def __getitem__(self, j: int) -> torch.Tensor:
        i, k = divmod(j, self.views)
        s = self.samples[i]
        x = load_tensor(s.path, s.frame, self.options, rgb=False)
        if self.views > 1:
            # torchvision's random transforms draw from torch's global generator: seed it per view.
            torch.manual_seed((self.seed * 1_000_003 + self.ids[i] * 7919 + k) % (2**63))
        return self.tf(x)


def cache_key(samples: Sequence[Sample], cfg: TrainConfig, backbone_digest: str, views: int,
              device: torch.device) -> str:
    """SHA-256 naming a feature tensor: everything that changes the features, nothing else
    (``backbone_digest``: the backbone's weights, ``model.checkpoint.weights_digest``)."""
    h = hashlib.sha256()
    files: dict[str, str] = {}
    for s in samples:
        if s.path not in files:
            with open(s.path, "rb") as f:
                files[s.path] = hashlib.sha256(f.read()).hexdigest()
        h.update(f"{files[s.path]}#{s.frame}\n".encode())
    recipe = {k: getattr(cfg, k) for k in ("image_size", "hflip", "rotate_degrees", "zoom_min", "zoom_max", "seed",
                                           "backbone", "output_stride", "window", "slice_axis")}
    dtype = autocast_dtype(cfg.precision, device)
    recipe.update(views=views, dtype=str(dtype), backbone_weights=backbone_digest)
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


def extract_features(backbone: torch.nn.Module, samples: Sequence[Sample], cfg: TrainConfig, views: int,
                     device: torch.device, verbose: bool = False, desc: str = "features") -> torch.Tensor:
    """Pooled backbone features of every sample's ``views`` views, at ``cfg.precision``:
    float32 (N, views, F) on the CPU. Under torchrun each rank computes its share
    (``rank::world``) and every rank gets them all, in order."""
    if ranks.world_size() == 1:
        return _extract(backbone, samples, cfg, views, device, verbose, desc)
    ids = ranks.shard(len(samples))
    part = _extract(backbone, [samples[i] for i in ids], cfg, views, device, verbose and ranks.is_main(), desc, ids)
    feats = ranks.gather_in_order(ids, list(part))
    return torch.stack(feats) if feats else part


def _extract(backbone: torch.nn.Module, samples: Sequence[Sample], cfg: TrainConfig, views: int,
             device: torch.device, verbose: bool, desc: str, ids: Sequence[int] | None = None) -> torch.Tensor:
    loader = torch.utils.data.DataLoader(_Views(samples, cfg, views, ids), batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda")
    run = maybe_compiled(backbone.eval(), cfg.compile, len(loader.dataset), cfg.batch_size, device)
    out = []
    with Forward(backbone, device, cfg.precision, run) as forward:
        for x in tracked(loader, len(samples) * views, desc, "image views", size=len, enabled=verbose):
            out.append(forward(to_device(x, device)).cpu())
    if not out:  # no samples (a rank's empty share)
        return torch.zeros(0, views, 0)
    return torch.cat(out).reshape(len(samples), views, -1)


def cached_features(backbone: torch.nn.Module, samples: Sequence[Sample], cfg: TrainConfig, views: int,
                    device: torch.device, backbone_digest: str, verbose: bool = False,
                    desc: str = "features") -> tuple[torch.Tensor, bool]:
    """``extract_features`` through the disk cache ``cfg.feature_cache_dir`` when set.

    Returns:
        (features (N, views, F), whether they came from the disk cache).
    """
    if not cfg.feature_cache_dir:
        return extract_features(backbone, samples, cfg, views, device, verbose, desc), False
    path = Path(cfg.feature_cache_dir) / f"{cache_key(samples, cfg, backbone_digest, views, device)}.pt"
    # Rank 0 reads the cache and sends what it found: other nodes may not see its disk.
    feats = ranks.broadcast(_read_cached(path, len(samples), views) if ranks.is_main() else None)
    if feats is not None:
        return feats, True
    feats = extract_features(backbone, samples, cfg, views, device, verbose, desc)
    if ranks.is_main():
        with atomic_path(path) as tmp:
            torch.save(feats, tmp)
    return feats, False


def _read_cached(path: Path, n: int, views: int) -> torch.Tensor | None:
    if path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, torch.Tensor) and feats.shape[:2] == (n, views):
                return feats
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            pass
    return None
