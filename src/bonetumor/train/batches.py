"""The batch source of a training run: images through the whole model (``ImageDataset``), or,
with the backbone frozen, cached backbone features through the head alone (runtime/features.py).

Both give the loop the same things: the network to train and validate, a training loader
reshuffled and re-augmented from (seed, epoch), and a validation loader. A lesion-guided run
(``--lesion-masks``) always reads images: its training batches carry each image's lesion mask,
augmented with it, and its loss needs the last block's spatial map, which cached pooled
features do not have.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torchvision import tv_tensors

from bonetumor.config import TrainConfig
from bonetumor.data.layouts import DatasetIndex
from bonetumor.data.lesions import LesionSource, lesion_mask
from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import load_tensor
from bonetumor.data.studies import Sample
from bonetumor.data.transforms import create_resize, create_transforms
from bonetumor.model.checkpoint import weights_digest
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime.features import cached_features


class ImageDataset(torch.utils.data.Dataset):
    """Samples → (image tensor 3xHxW, target, index), and with ``lesions`` (one source or None per
    sample) a fourth item, the boolean HxW lesion mask after the same resize and augmentation
    (all False for an image without one).

    Grey images stay one channel through resizing and augmentation (a third of the work) and
    become three channels only for normalisation (``create_transforms``).
    With ``resize`` (the deterministic first step of the transform, kept apart from ``transform``)
    each image is decoded and resized once and kept in memory (a grey image as one channel, 200 KB
    at 224 px), up to ``cache_mb``; later epochs only augment, so decoding never bounds a fast
    device. The cache keeps float32: float16 rounding changes training measurably (docs/performance.md).
    """

    def __init__(self, samples: Sequence[Sample], classes: Sequence[str], transform: Callable | None = None,
                 options: ReadOptions | None = None, resize: Callable | None = None, cache_mb: float = 4096,
                 lesions: Sequence[LesionSource | None] | None = None):
        self.samples = list(samples)
        self.lesions = None if lesions is None else list(lesions)
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.transform = transform
        self.options = options
        self.resize = resize
        self._cache: dict[int, torch.Tensor] = {}
        self._masks: dict[int, torch.Tensor | None] = {}  # beside the cached images, for a guided run
        self._cache_left = cache_mb * 2**20

    def __len__(self) -> int:
        return len(self.samples)

    def _load(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image as read, and its lesion mask at the image's size (None without one)."""
        s = self.samples[i]
        x = load_tensor(s.path, s.frame, self.options, rgb=False)
        src = self.lesions[i] if self.lesions is not None else None
        if src is None:
            return x, None
        return x, tv_tensors.Mask(torch.from_numpy(lesion_mask(src, tuple(x.shape[-2:])))[None].to(torch.uint8))

    def _image(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.resize is None:
            return self._load(i)
        c = self._cache.get(i)
        if c is not None:
            return c, self._masks.get(i)
        x, m = self._load(i)
        x, m = (self.resize(x), None) if m is None else self.resize(x, m)
        # An RGB file of a grey image is cached as one channel too.
        grey = x.shape[0] == 1 or bool((x[0] == x[1]).all() and (x[1] == x[2]).all())
        c = (x[:1] if grey else x).contiguous()
        size = c.numel() * 4 + (0 if m is None else m.numel())
        if size <= self._cache_left:
            self._cache[i], self._masks[i] = c, m
            self._cache_left -= size
        return c, m

    def __getitem__(self, i: int):
        x, m = self._image(i)
        if self.transform is not None:
            x, m = (self.transform(x), None) if m is None else self.transform(x, m)
        if x.shape[0] == 1:
            x = x.expand(3, -1, -1).contiguous()
        y = self.class_to_idx[self.samples[i].label]
        if self.lesions is None:
            return x, y, i
        mask = torch.zeros(x.shape[-2:], dtype=torch.bool) if m is None else m[0].as_subclass(torch.Tensor) > 0
        return x, y, i, mask


@dataclass
class BatchSource:
    """What the loop trains (``net``: the model, or its head on cached features) and from what."""

    net: nn.Module
    train: torch.utils.data.DataLoader
    valid: torch.utils.data.DataLoader
    generator: torch.Generator
    summary: str | None = None  # a line saying how features were made, for the log
    trained: nn.Module | None = None  # what training steps call, when not ``net`` (its DistributedDataParallel)

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Reseed shuffling, augmentation and dropout from (seed, epoch), so that a resumed run
        draws exactly what an uninterrupted one would."""
        self.generator.manual_seed(seed * 100003 + epoch)
        # Each rank augments and drops out from its own stream (rank 0's is a lone process's).
        torch.manual_seed(seed * 100003 + epoch + 7919 * ranks.rank())
        if isinstance(self.train.sampler, torch.utils.data.DistributedSampler):
            self.train.sampler.set_epoch(epoch)
        if isinstance(self.train.dataset, FeatureDataset):
            self.train.dataset.set_epoch(epoch)


def create_loader(index: DatasetIndex, split: str, cfg: TrainConfig, train: bool, device: torch.device,
                  generator: torch.Generator | None = None,
                  lesions: dict[str, LesionSource] | None = None) -> torch.utils.data.DataLoader:
    """DataLoader for one split with the train or eval transforms of ``cfg``; with the image cache
    (``cfg.cache_images``, by default on for GPUs) images are decoded and resized once. With
    ``lesions`` (sources by sample ref) its batches carry lesion masks (``ImageDataset``)."""
    cache = cfg.cache_images if cfg.cache_images is not None else device.type in ("cuda", "mps")
    tf = create_transforms(train, cfg.image_size, cfg.hflip, cfg.rotate_degrees, (cfg.zoom_min, cfg.zoom_max), resize=not cache)
    samples = index.split(split)
    ds = ImageDataset(samples, index.classes, tf, index.options, create_resize(cfg.image_size) if cache else None,
                      lesions=None if lesions is None else [lesions.get(s.ref) for s in samples])
    ds, sampler = _for_this_rank(ds, train, cfg.seed)
    return torch.utils.data.DataLoader(
        ds, batch_size=cfg.batch_size, shuffle=train and sampler is None, sampler=sampler,
        drop_last=_lone_last(len(sampler or ds), cfg.batch_size, train), num_workers=cfg.workers,
        persistent_workers=cache and cfg.workers > 0,  # each worker keeps its part of the cache
        generator=generator, pin_memory=device.type == "cuda",
    )


def _for_this_rank(ds, train: bool, seed: int):
    """(dataset, sampler) of this rank under torchrun: its part of each epoch's permutation for
    training (permuted from seed and epoch), its share of the images, in order, for validation;
    (``ds``, None) in a process on its own."""
    if not ranks.active():
        return ds, None
    if train:
        return ds, ranks.shard_sampler(ds, seed * 100003)
    return torch.utils.data.Subset(ds, ranks.shard(len(ds))), None


def _lone_last(n: int, batch_size: int, train: bool) -> bool:
    # Batch norm cannot train on a batch of one: a lone last sample waits for the next epoch's
    # shuffle instead. The cached-feature loaders drop it too, so both sources train alike.
    return train and n % batch_size == 1 and n > 1


def uses_feature_cache(cfg: TrainConfig, model: nn.Module) -> bool:
    """True when the backbone is wholly frozen (so its features never change), caching is on and
    the run is not lesion-guided (its loss needs the last block's spatial map)."""
    return (cfg.cache_features and not cfg.lesion_masks
            and not any(p.requires_grad for p in model.backbone.parameters()))


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
        ds, sampler = _for_this_rank(FeatureDataset(feats, [index.classes.index(s.label) for s in samples], cfg.seed),
                                     train, cfg.seed)
        loaders.append(torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=train and sampler is None,
                                                   sampler=sampler, drop_last=_lone_last(len(sampler or ds), cfg.batch_size, train),
                                                   generator=generator if train else None))
    summary = (f"frozen backbone: features computed once ({', '.join(notes)} views) in "
               f"{time.perf_counter() - t0:.1f} s; the head trains from them")
    return loaders[0], loaders[1], summary


def create_batch_source(model: nn.Module, index: DatasetIndex, cfg: TrainConfig, device: torch.device,
                        progress: bool = False, lesions: dict[str, LesionSource] | None = None) -> BatchSource:
    """Cached features and the head when the backbone is frozen (``uses_feature_cache``), else
    images and the whole model; ``lesions`` (a guided run's training masks) go with the images."""
    gen = torch.Generator()
    if uses_feature_cache(cfg, model):
        train, valid, summary = create_feature_loaders(model, index, cfg, device, gen, progress)
        return BatchSource(model.head, train, valid, gen, summary)
    summary = None
    if lesions is not None:
        summary = (f"lesion guidance: {len(lesions)} of {len(index.split('train'))} training images have a lesion "
                   f"mask (weight {cfg.guidance_weight:g}); images through the whole model every epoch, as the "
                   "guidance needs the last block's map, which the feature cache does not keep")
    return BatchSource(model, create_loader(index, "train", cfg, True, device, gen, lesions),
                       create_loader(index, "valid", cfg, False, device), gen, summary)
