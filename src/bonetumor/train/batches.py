"""The batch source of a training run: images through the whole model (``ImageDataset``), or,
with the backbone frozen, cached backbone features through the head alone (runtime/features.py).

Both give the loop the same things: the network to train and validate, a training loader
reshuffled and re-augmented from (seed, epoch), and a validation loader.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from bonetumor.config import TrainConfig
from bonetumor.data.layouts import DatasetIndex
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import load_tensor
from bonetumor.data.studies import Sample
from bonetumor.data.transforms import create_resize, create_transforms
from bonetumor.model.checkpoint import weights_digest
from bonetumor.runtime.features import cached_features


class ImageDataset(torch.utils.data.Dataset):
    """Samples → (image tensor 3xHxW, target, index).

    Grey images stay one channel through resizing and augmentation (a third of the work) and
    become three channels only for normalisation (``create_transforms``).
    With ``resize`` (the deterministic first step of the transform, kept apart from ``transform``)
    each image is decoded and resized once and kept in memory (a grey image as one channel, 200 KB
    at 224 px), up to ``cache_mb``; later epochs only augment, so decoding never bounds a fast
    device. The cache keeps float32: float16 rounding changes training measurably (docs/performance.md).
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable | None = None,
                 options: ReadOptions | None = None, resize: Callable | None = None, cache_mb: float = 4096):
        self.samples = list(samples)
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.options = options
        self.resize = resize
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_left = cache_mb * 2**20

    def __len__(self) -> int:
        return len(self.samples)

    def _image(self, i: int) -> torch.Tensor:
        s = self.samples[i]
        if self.resize is None:
            return load_tensor(s.path, s.frame, self.options, rgb=False)
        c = self._cache.get(i)
        if c is None:
            x = self.resize(load_tensor(s.path, s.frame, self.options, rgb=False))
            # An RGB file of a grey image is cached as one channel too.
            grey = x.shape[0] == 1 or bool((x[0] == x[1]).all() and (x[1] == x[2]).all())
            c = (x[:1] if grey else x).contiguous()
            if c.numel() * 4 <= self._cache_left:
                self._cache[i] = c
                self._cache_left -= c.numel() * 4
        return c

    def __getitem__(self, i: int):
        x = self._image(i)
        if self.transform is not None:
            x = self.transform(x)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1).contiguous()
        return x, self.class_to_idx[self.samples[i].label], i


@dataclass
class BatchSource:
    """What the loop trains (``net``: the model, or its head on cached features) and from what."""

    net: nn.Module
    train: torch.utils.data.DataLoader
    valid: torch.utils.data.DataLoader
    generator: torch.Generator
    summary: str | None = None  # a line saying how features were made, for the log

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Reseed shuffling, augmentation and dropout from (seed, epoch), so that a resumed run
        draws exactly what an uninterrupted one would."""
        self.generator.manual_seed(seed * 100003 + epoch)
        torch.manual_seed(seed * 100003 + epoch)
        if isinstance(self.train.dataset, FeatureDataset):
            self.train.dataset.set_epoch(epoch)


def create_loader(index: DatasetIndex, split: str, cfg: TrainConfig, train: bool, device: torch.device,
                  generator: torch.Generator | None = None) -> torch.utils.data.DataLoader:
    """DataLoader for one split with the train or eval transforms of ``cfg``; with the image cache
    (``cfg.cache_images``, by default on for GPUs) images are decoded and resized once."""
    cache = cfg.cache_images if cfg.cache_images is not None else device.type in ("cuda", "mps")
    tf = create_transforms(train, cfg.image_size, cfg.hflip, cfg.rotate_degrees, (cfg.zoom_min, cfg.zoom_max), resize=not cache)
    ds = ImageDataset(index.split(split), index.classes, tf, index.options, create_resize(cfg.image_size) if cache else None)
    return torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=train, drop_last=_lone_last(len(ds), cfg.batch_size, train),
        num_workers=cfg.workers,
        persistent_workers=cache and cfg.workers > 0,  # each worker keeps its part of the cache
        generator=generator, pin_memory=device.type == "cuda",
    )


def _lone_last(n: int, batch_size: int, train: bool) -> bool:
    # Batch norm cannot train on a batch of one: a lone last sample waits for the next epoch's
    # shuffle instead. The cached-feature loaders drop it too, so both sources train alike.
    return train and n % batch_size == 1 and n > 1


def uses_feature_cache(cfg: TrainConfig, model: nn.Module) -> bool:
    """True when the backbone is wholly frozen (so its features never change) and caching is on."""
    return cfg.cache_features and not any(p.requires_grad for p in model.backbone.parameters())


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


def create_feature_loaders(model: nn.Module, index: DatasetIndex, cfg: TrainConfig, device: torch.device,
                           generator: torch.Generator, progress: bool = False):
    """Train and validation loaders over cached backbone features (``cfg.feature_views`` views of
    each training image, one plain view of each validation image), and a line saying so.

    Returns:
        (train loader, validation loader, summary).
    """
    t0 = time.perf_counter()
    loaders, notes = [], []
    digest = weights_digest(model.backbone.state_dict())
    for split, views, train in (("train", cfg.feature_views, True), ("valid", 1, False)):
        samples = index.split(split)
        feats, hit = cached_features(model.backbone, samples, cfg, views, device, digest, progress, f"{split} features")
        notes.append(f"{split} {len(samples)}x{views}{' (from disk)' if hit else ''}")
        ds = FeatureDataset(feats, [index.classes.index(s.label) for s in samples], cfg.seed)
        loaders.append(torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=train,
                                                   drop_last=_lone_last(len(ds), cfg.batch_size, train),
                                                   generator=generator if train else None))
    summary = (f"frozen backbone: features computed once ({', '.join(notes)} views) in "
               f"{time.perf_counter() - t0:.1f} s; the head trains from them")
    return loaders[0], loaders[1], summary


def create_batch_source(model: nn.Module, index: DatasetIndex, cfg: TrainConfig, device: torch.device,
                        progress: bool = False) -> BatchSource:
    """Cached features and the head when the backbone is frozen (``uses_feature_cache``), else
    images and the whole model."""
    gen = torch.Generator()
    if uses_feature_cache(cfg, model):
        train, valid, summary = create_feature_loaders(model, index, cfg, device, gen, progress)
        return BatchSource(model.head, train, valid, gen, summary)
    return BatchSource(model, create_loader(index, "train", cfg, True, device, gen),
                       create_loader(index, "valid", cfg, False, device), gen)
