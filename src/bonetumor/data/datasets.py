"""torch ``Dataset`` over found samples (finding them is layouts.py's job)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import load_tensor
from bonetumor.data.samples import Sample


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
