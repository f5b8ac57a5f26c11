"""Preprocessing and augmentation with torchvision.transforms.v2.

Input is a float tensor CxHxW in [0, 1], C = 1 (grey) or 3 (see ``load_tensor``). Resizing comes
first so that the augmentation works on the small image, which is cheaper and gives the same
result; a grey image stays one channel until normalisation, which needs three.
A lesion mask given beside the image as a ``tv_tensors.Mask`` (``transform(x, Mask(m))``) gets the
same resize, flip, rotation and zoom, with nearest-neighbour sampling, and no normalisation.
"""

from __future__ import annotations

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def create_resize(size: int) -> v2.Resize:
    """The deterministic first step of every transform: antialiased resize to size x size."""
    return v2.Resize((size, size), antialias=True)


def three_channels(x: torch.Tensor) -> torch.Tensor:
    """A grey image (1xHxW) repeated to the three channels an ImageNet backbone takes; a lesion
    mask passes unchanged (``v2.Lambda`` hands it every input)."""
    if isinstance(x, tv_tensors.Mask):
        return x
    return x.expand(3, -1, -1) if x.shape[-3] == 1 else x


def create_transforms(
    train: bool,
    size: int,
    hflip: bool = True,
    rotate_degrees: float = 15.0,
    zoom: tuple[float, float] = (0.9, 1.1),
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    resize: bool = True,
) -> v2.Compose:
    """Train: resize + horizontal flip + rotation ±degrees + zoom; eval: resize only. Both make
    three channels and normalise. ``resize=False`` leaves out the resize (for images already
    resized, see ``create_resize``)."""
    ops: list = [create_resize(size)] if resize else []
    if train:
        if hflip:
            ops.append(v2.RandomHorizontalFlip())
        if rotate_degrees > 0 or zoom != (1.0, 1.0):
            ops.append(v2.RandomAffine(degrees=rotate_degrees, scale=zoom))
    ops += [v2.Lambda(three_channels), v2.ToDtype(torch.float32), v2.Normalize(mean=list(mean), std=list(std))]
    return v2.Compose(ops)
