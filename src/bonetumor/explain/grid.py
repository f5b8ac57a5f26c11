"""Is a heatmap fine enough to localise anything? The explained layer's grid, and advice when not.

A Grad-CAM map has one value per cell of the explained layer's feature map: ResNet50's last
block at 64 px gives 2x2 cells, each covering a quarter of the image, so "where" can only mean
"which quarter". Below ``MIN_GRID`` cells a side the maps are flagged, with the options that give a
finer grid (a larger input, or for ResNet50 a smaller output stride).
"""

from __future__ import annotations

import torch
from torch import nn

from bonetumor.explain.cam import resolve_layer

MIN_GRID = 7  # ResNet50's own grid at its ImageNet input size (224 px / 32)


@torch.inference_mode()
def cam_grid(model: nn.Module, layer: str, image_size: int) -> tuple[int, int]:
    """(rows, columns) of the map of ``layer`` for a square ``image_size`` input: one forward
    pass of a blank image, as the arithmetic differs between backbones."""
    store: dict = {}

    def record(_module, _inputs, out) -> None:  # returns None: the output passes unchanged
        store["shape"] = out.shape

    handle = resolve_layer(model, layer).register_forward_hook(record)
    was_training = model.training
    param = next(model.parameters())
    try:
        model.eval()
        model(torch.zeros(1, 3, image_size, image_size, device=param.device, dtype=param.dtype))
    finally:
        handle.remove()
        model.train(was_training)
    return int(store["shape"][-2]), int(store["shape"][-1])


def coarse_grid_warning(grid: tuple[int, int], layer: str, image_size: int, backbone: str,
                        output_stride: int = 32) -> str | None:
    """One line saying that the maps cannot localise, and how to train a model whose maps can;
    None when the grid has ``MIN_GRID`` cells a side or more."""
    if min(grid) >= MIN_GRID:
        return None
    options = [f"--image-size {MIN_GRID * output_stride} or more"]
    if backbone == "resnet50":
        options += [f"--output-stride {s} with --image-size {MIN_GRID * s} or more" for s in (16, 8) if s < output_stride]
    return (f"the heatmaps are a {grid[0]}x{grid[1]} grid ({layer} at {image_size} px), too coarse to localise "
            f"anything ({MIN_GRID}x{MIN_GRID} or finer is needed); train with " + ", or ".join(options))


def model_grid(ck, layer: str) -> tuple[tuple[int, int], str | None]:
    """A loaded checkpoint's grid at ``layer`` for its own input size, and the warning for it."""
    grid = cam_grid(ck.model, layer, ck.image_size)
    return grid, coarse_grid_warning(grid, layer, ck.image_size, ck.config.backbone, ck.config.output_stride)
