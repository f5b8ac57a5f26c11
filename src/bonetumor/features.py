"""Frozen-backbone fast path: backbone features computed once per image and view, then the head
trains from them.

With the backbone frozen (the original's default), every epoch of the original ran the same
ResNet50 over every image again. Here each training image is seen through K augmented views
(``feature_views``; K = 1 means no augmentation), each view's pooled features are computed once,
and each epoch the head trains on one view per image drawn from (seed, epoch). E epochs then cost
K backbone passes instead of E. Validation features are computed once without augmentation.

View k of image i is drawn from its own seed, so the features are the same whatever the batch
size, worker count or order; a disk cache (``feature_cache_dir``) keys them by file content,
slice, transform, image size, view count, seed, backbone weights and precision.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Sequence

import torch
from rich.progress import track

from bonetumor.batchnorm import inference_folded
from bonetumor.checkpoint import weights_digest
from bonetumor.compiled import maybe_compiled
from bonetumor.config import TrainConfig, read_options
from bonetumor.data.datasets import Sample, load_tensor
from bonetumor.data.transforms import create_transforms
from bonetumor.utils import atomic_path, to_device


def uses_feature_cache(cfg: TrainConfig, model: torch.nn.Module) -> bool:
    """True when the backbone is wholly frozen (so its features never change) and caching is on."""
    return cfg.cache_features and not any(p.requires_grad for p in model.backbone.parameters())


class _Views(torch.utils.data.Dataset):
    """(image i, view k) -> the transformed image; view k of image i always gets the same draw."""

    def __init__(self, samples: Sequence[Sample], cfg: TrainConfig, views: int):
        self.samples, self.views, self.seed = list(samples), views, cfg.seed
        self.options = read_options(cfg)
        augment = views > 1
        self.tf = create_transforms(augment, cfg.image_size, cfg.hflip, cfg.rotate_degrees, (cfg.zoom_min, cfg.zoom_max))

    def __len__(self) -> int:
        return len(self.samples) * self.views

    def __getitem__(self, j: int) -> torch.Tensor:
        i, k = divmod(j, self.views)
        s = self.samples[i]
        x = load_tensor(s.path, s.frame, self.options)
        if self.views > 1:
            # torchvision's random transforms draw from torch's global generator: seed it per view.
            torch.manual_seed((self.seed * 1_000_003 + i * 7919 + k) % (2**63))
        return self.tf(x)


def cache_key(samples: Sequence[Sample], cfg: TrainConfig, model: torch.nn.Module, views: int,
              dtype: torch.dtype | None) -> str:
    """SHA-256 naming a feature tensor: everything that changes the features, nothing else."""
    h = hashlib.sha256()
    files: dict[str, str] = {}
    for s in samples:
        if s.path not in files:
            with open(s.path, "rb") as f:
                files[s.path] = hashlib.sha256(f.read()).hexdigest()
        h.update(f"{files[s.path]}#{s.frame}\n".encode())
    recipe = {k: getattr(cfg, k) for k in ("image_size", "hflip", "rotate_degrees", "zoom_min", "zoom_max", "seed",
                                           "backbone", "output_stride", "window", "slice_axis")}
    recipe.update(views=views, dtype=str(dtype), backbone_weights=weights_digest(model.backbone.state_dict()))
    h.update(json.dumps(recipe, sort_keys=True).encode())
    return h.hexdigest()


@torch.inference_mode()
def extract_features(model: torch.nn.Module, samples: Sequence[Sample], cfg: TrainConfig, views: int,
                     device: torch.device, dtype: torch.dtype | None = None, verbose: bool = False,
                     desc: str = "features") -> torch.Tensor:
    """Pooled backbone features of every sample's ``views`` views: float32 (N, views, F) on the CPU."""
    loader = torch.utils.data.DataLoader(_Views(samples, cfg, views), batch_size=cfg.batch_size, shuffle=False,
                                         num_workers=cfg.workers, pin_memory=device.type == "cuda")
    backbone = maybe_compiled(model.backbone.eval(), cfg.compile, len(loader.dataset), cfg.batch_size, device)
    out = []
    # Eager, BatchNorms fold into their convolutions; a compiled backbone has them folded already.
    with inference_folded(backbone):
        for x in track(loader, description=desc, transient=True, disable=not verbose):
            x = to_device(x, device)
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                out.append(backbone(x).float().cpu())
    feats = torch.cat(out) if out else torch.zeros(0, 0)
    return feats.reshape(len(samples), views, -1)


def cached_features(model: torch.nn.Module, samples: Sequence[Sample], cfg: TrainConfig, views: int,
                    device: torch.device, dtype: torch.dtype | None = None, verbose: bool = False,
                    desc: str = "features") -> tuple[torch.Tensor, bool]:
    """``extract_features`` through the disk cache ``cfg.feature_cache_dir`` when set.

    Returns:
        (features (N, views, F), whether they came from the disk cache).
    """
    if not cfg.feature_cache_dir:
        return extract_features(model, samples, cfg, views, device, dtype, verbose, desc), False
    path = Path(cfg.feature_cache_dir) / f"{cache_key(samples, cfg, model, views, dtype)}.pt"
    if path.is_file():
        try:
            feats = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(feats, torch.Tensor) and feats.shape[:2] == (len(samples), views):
                return feats, True
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed, never trusted
            pass
    feats = extract_features(model, samples, cfg, views, device, dtype, verbose, desc)
    with atomic_path(path) as tmp:
        torch.save(feats, tmp)
    return feats, False


class FeatureDataset(torch.utils.data.Dataset):
    """(features of one view, target, index) per sample; ``set_epoch`` picks each sample's view."""

    def __init__(self, feats: torch.Tensor, targets: Sequence[int], seed: int = 0):
        self.feats, self.targets, self.seed = feats, list(targets), seed
        self.view = torch.zeros(len(self.targets), dtype=torch.long)

    def set_epoch(self, epoch: int) -> None:
        """Draw one view per sample from (seed, epoch), apart from the shuffling's generator."""
        k = self.feats.shape[1]
        if k > 1:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch + 7)
            self.view = torch.randint(k, (len(self.targets),), generator=g)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.feats[i, self.view[i]], self.targets[i], i


def create_feature_loaders(model: torch.nn.Module, index, cfg: TrainConfig, device: torch.device,
                           dtype: torch.dtype | None, generator: torch.Generator, progress: bool = False):
    """Train and validation loaders over cached backbone features (``cfg.feature_views`` views of
    each training image, one plain view of each validation image), and a line saying so.

    Returns:
        (train loader, validation loader, summary).
    """
    t0 = time.perf_counter()
    loaders, notes = [], []
    for split, views, train in (("train", cfg.feature_views, True), ("valid", 1, False)):
        samples = index.split(split)
        feats, hit = cached_features(model, samples, cfg, views, device, dtype, progress, f"{split} features")
        notes.append(f"{split} {len(samples)}x{views}{' (from disk)' if hit else ''}")
        targets = [index.classes.index(s.label) for s in samples]
        ds = FeatureDataset(feats, targets, cfg.seed)
        # The same batches as train.create_loader, which drops a lone last training sample (for
        # BatchNorm), so that cached and uncached runs train alike.
        lone = train and len(ds) % cfg.batch_size == 1 and len(ds) > 1
        loaders.append(torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=train, drop_last=lone,
                                                   generator=generator if train else None))
    summary = (f"frozen backbone: features computed once ({', '.join(notes)} views) in "
               f"{time.perf_counter() - t0:.1f} s; the head trains from them")
    return loaders[0], loaders[1], summary
