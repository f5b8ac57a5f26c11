"""Lesion masks: where each image's lesion is, from one of three sources.

- a manifest's ``mask_path`` column (paths relative to the manifest's folder, as ``synth`` writes them);
- a folder of mask images named like the images (the same relative path, or the same file name or stem);
- a CSV of boxes ``path,x0,y0,x1,y1`` in pixels of the original image (several rows per image are united).

``explain`` scores heatmaps against these masks and ``train --lesion-masks`` guides the model with
them, so both read them alike: a mask is its file's first channel above one half, and a mask whose
size differs from its image's is resized to it with nearest-neighbour sampling (masks drawn at
another resolution are common; the same geometry at another size is still the same lesion).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from bonetumor.data.layouts import read_manifest
from bonetumor.data.readers import read_image
from bonetumor.data.studies import Sample
from bonetumor.errors import BonetumorError

Box = tuple[float, float, float, float]
# Where one image's lesion is: a mask file, or boxes in its pixels.
LesionSource = Union[Path, list[Box]]
MASK_SUFFIXES = (".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg")


def load_mask(path: Path, shape: tuple[int, int] | None = None) -> np.ndarray:
    """A mask file as a boolean (H, W) array, resized (nearest) to ``shape`` when given and different.

    Raises:
        BadImageError: the file cannot be read as an image (one line naming it).
    """
    m = read_image(path)[..., 0] > 0.5
    if shape is not None and m.shape != tuple(shape):
        t = torch.from_numpy(m.astype(np.float32))[None, None]
        m = F.interpolate(t, size=tuple(shape), mode="nearest")[0, 0].numpy() > 0.5
    return m


def boxes_mask(boxes: Sequence[Box], shape: tuple[int, int]) -> np.ndarray:
    """The union of pixel boxes ``(x0, y0, x1, y1)`` as a boolean (H, W) array."""
    m = np.zeros(shape, dtype=bool)
    for x0, y0, x1, y1 in boxes:
        m[max(0, int(y0)):int(np.ceil(y1)), max(0, int(x0)):int(np.ceil(x1))] = True
    return m


def lesion_mask(source: LesionSource, shape: tuple[int, int]) -> np.ndarray:
    """One image's boolean (H, W) lesion mask from its mask file or its boxes."""
    return load_mask(source, shape) if isinstance(source, Path) else boxes_mask(source, shape)


def read_boxes(path: str | Path) -> dict[str, list[Box]]:
    """A boxes CSV as {path as written: boxes}; a bad row is refused naming its line."""
    table: dict[str, list[Box]] = {}
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            for i, r in enumerate(csv.DictReader(f), start=2):
                try:
                    box = tuple(float(r[k]) for k in ("x0", "y0", "x1", "y1"))
                    table.setdefault(r["path"].strip(), []).append(box)
                except (KeyError, TypeError, ValueError, AttributeError):
                    raise BonetumorError(f"{path}, line {i}: expected path,x0,y0,x1,y1 with numbers") from None
    except FileNotFoundError:
        raise BonetumorError(f"{path}: boxes file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise BonetumorError(f"{path}: not a CSV of boxes ({type(e).__name__})") from None
    return table


def _by_name(table: dict[str, list[Box]]) -> dict[str, list[Box]]:
    out: dict[str, list[Box]] = {}
    for p, boxes in table.items():
        out.setdefault(Path(p).name, []).extend(boxes)
    return out


def mask_lookup(masks: str | Path | None = None, boxes: str | Path | None = None,
                manifest: str | Path | None = None,
                listed: Sequence[Sample] | None = None) -> Callable[[Path, tuple[int, int]], np.ndarray | None]:
    """A function (image path, (H, W)) -> boolean lesion mask or None, from one ground-truth source.

    masks: a folder of mask images named like the images; boxes: CSV ``path,x0,y0,x1,y1`` in
    pixels (several rows per image are united); manifest: its ``mask_path`` column (``listed``:
    its samples, when the caller has read it already).
    """
    given = [m for m in (masks, boxes, manifest) if m]
    if len(given) > 1:
        raise BonetumorError("give only one of --masks, --boxes and --manifest")
    if masks:
        root = Path(masks)
        if not root.is_dir():
            raise BonetumorError(f"--masks {root}: folder not found")
        return lambda p, shape: _load_mask_at(_in_folder(root, p.name), shape)
    if boxes:
        table = _by_name(read_boxes(boxes))
        return lambda p, shape: boxes_mask(table[p.name], shape) if p.name in table else None
    if manifest:
        listed = read_manifest(Path(manifest)) if listed is None else listed
        by_path = {str(Path(s.path).resolve()): Path(s.mask_path) for s in listed if s.mask_path}
        return lambda p, shape: _load_mask_at(by_path.get(str(p.resolve())), shape)
    return lambda p, shape: None


def _load_mask_at(path: Path | None, shape: tuple[int, int]) -> np.ndarray | None:
    return None if path is None else load_mask(path, shape)


def _in_folder(root: Path, relative: str) -> Path | None:
    """The mask in ``root`` for an image at ``relative``: the same path, else the same stem with a
    mask suffix, else the same file name or stem at the folder's top."""
    rel = Path(relative)
    for folder in dict.fromkeys([(root / rel).parent, root]):
        for name in (rel.name, *(rel.stem + s for s in MASK_SUFFIXES)):
            if (folder / name).is_file():
                return folder / name
    return None


def training_lesions(spec: str, samples: Sequence[Sample], root: str | None) -> list[LesionSource | None]:
    """Each sample's lesion source for ``train --lesion-masks spec`` (``manifest``, a folder of
    masks or a boxes CSV), or None where it has none; ``root``: the data folder, which image
    paths in a folder or CSV are relative to (a file name alone matches too)."""
    base = Path(root) if root else None

    def rel(s: Sample) -> str:
        p = Path(s.path)
        try:
            return p.resolve().relative_to(base.resolve()).as_posix() if base else p.name
        except ValueError:
            return p.name
    if spec == "manifest":
        if not any(s.mask_path for s in samples):
            raise BonetumorError("--lesion-masks manifest: the data's manifest has no mask_path values")
        return [Path(s.mask_path) if s.mask_path and s.frame is None else None for s in samples]
    path = Path(spec)
    if path.is_dir():
        return [_in_folder(path, rel(s)) if s.frame is None else None for s in samples]
    if path.is_file():
        return _boxes_of(read_boxes(path), path.parent, samples, rel)
    raise BonetumorError(f"--lesion-masks {spec}: use manifest, a folder of mask images or a CSV of boxes "
                         "(no such file or folder)")


def _boxes_of(table: dict[str, list[Box]], folder: Path, samples: Sequence[Sample],
              rel: Callable[[Sample], str]) -> list[list[Box] | None]:
    """Each sample's boxes: a CSV path may be relative to the data folder or to the CSV's own,
    absolute, or a bare file name (only a bare name matches by name alone, so that two classes'
    images of the same name never share boxes)."""
    placed = {str((folder / p).resolve()): b for p, b in table.items()}
    bare = {p: b for p, b in table.items() if Path(p).name == p}
    return [None if s.frame is not None else
            table.get(rel(s)) or placed.get(str(Path(s.path).resolve())) or bare.get(Path(s.path).name)
            for s in samples]


def check_lesions(sources: Sequence[LesionSource | None]) -> int:
    """Read every mask file once, so that a bad one stops the run before training (one line
    naming it); returns how many sources mark a lesion (an all-empty mask guides nothing)."""
    marked = 0
    for src in sources:
        if isinstance(src, Path):
            if not src.is_file():
                raise BonetumorError(f"{src}: lesion mask not found")
            marked += bool(load_mask(src).any())
        elif src:
            marked += any(x1 > x0 and y1 > y0 for x0, y0, x1, y1 in src)
    return marked
