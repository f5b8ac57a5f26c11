"""Heatmap pictures: a map coloured for overlay, and the image | heatmap | overlay panel."""

from __future__ import annotations

import matplotlib
import numpy as np


def to_rgb8(img: np.ndarray) -> np.ndarray:
    """An image (H, W), (H, W, 1) or (H, W, 3) in [0, 1] as 8-bit RGB."""
    img = np.asarray(img, dtype=np.float32)
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8)


def heatmap_rgba(cam: np.ndarray) -> np.ndarray:
    """A map in [0, 1] coloured with matplotlib's jet, its own value (x1.2, capped) as opacity, so
    it can be laid over the image at any strength: 8-bit RGBA."""
    cam = np.clip(cam, 0, 1)
    rgba = (matplotlib.colormaps["jet"](cam) * 255).astype(np.uint8)
    rgba[..., 3] = (np.clip(cam * 1.2, 0, 1) * 255).round().astype(np.uint8)
    return rgba


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:] &= mask[:-1]
    inner[:-1] &= mask[1:]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def cam_panel(image: np.ndarray, cam: np.ndarray, title: str, mask: np.ndarray | None = None,
              max_side: int = 384, alpha: float = 0.45):
    """Image | heatmap | overlay side by side with a title line; the lesion outline in green
    (a PIL image).

    Drawn with Pillow rather than a matplotlib figure, which is many times slower per panel:
    that matters when explaining thousands of images.
    """
    from PIL import Image, ImageDraw, ImageFont

    base = to_rgb8(image)
    heat = heatmap_rgba(cam)[..., :3].copy()
    over = (base * (1 - alpha) + heat * alpha).round().astype(np.uint8)
    if mask is not None:
        edge = _outline(mask.astype(bool))
        over[edge] = (0, 255, 0)
        heat[edge] = (255, 255, 255)
    h, w = base.shape[:2]
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size[0] < 160:  # small images are enlarged so the panel stays readable
        size = (160, round(160 * h / w))
    panes = [Image.fromarray(a).resize(size, Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.BILINEAR)
             for a in (base, heat, over)]
    pad, top = 6, 22
    canvas = Image.new("RGB", (3 * size[0] + 4 * pad, size[1] + top + pad), "white")
    for i, p in enumerate(panes):
        canvas.paste(p, (pad + i * (size[0] + pad), top))
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, 4), title, fill="black", font=ImageFont.load_default(size=13))
    return canvas
