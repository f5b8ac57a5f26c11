"""What the audit knows about each image, read once: hashes, a thumbnail, size and format facts,
and the style features (data/style.py). Splitting by copies (``--split-by cluster``) and the
audit read the same scan."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import imagehash
import numpy as np
from PIL import Image

from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import read_image
from bonetumor.data.studies import Sample
from bonetumor.data.style import style_vector
from bonetumor.errors import BadImageError
from bonetumor.progress import tracked

THUMB = 32


@dataclass
class ImageFacts:
    """What the audit needs to know about one file, read once."""

    sha256: str
    phash: int = 0
    thumb: np.ndarray | None = None  # THUMB x THUMB grey levels, uint8, flattened
    width: int = 0
    height: int = 0
    colour: bool = False
    mean: float = 0.0
    fmt: str = ""
    mode: str = ""
    metadata: str = ""
    style: np.ndarray | None = None  # data/style.py's STYLE_FEATURES
    error: str | None = None


def scan_file(path: str | Path, frame: int | None = None, options: ReadOptions | None = None) -> ImageFacts:
    """Hash, thumbnail and describe one image file or volume slice (errors are recorded, not raised)."""
    p = Path(path)
    try:  # the same reader, and so the same one-line problems, as training's bad-file check
        arr = read_image(p, frame, options)
    except BadImageError as e:
        return ImageFacts(sha256="", error=e.problem)
    # A slice's identity is its pixels (its file holds the whole volume); a 2-D file's, its bytes.
    digest = hashlib.sha256(p.read_bytes() if frame is None else arr.tobytes()).hexdigest()
    facts, quantization = ImageFacts(sha256=digest, fmt=p.suffix.lower().lstrip(".")), None
    try:  # container facts (format, mode, metadata keys, JPEG tables) where Pillow reads the file
        with Image.open(p) as im:
            facts.fmt, facts.mode = (im.format or facts.fmt).lower(), im.mode
            facts.metadata = ",".join(sorted(k for k in im.info if isinstance(k, str)))
            quantization = getattr(im, "quantization", None)
    except Exception:  # noqa: BLE001 - formats Pillow does not open still get pixel facts
        pass
    facts.height, facts.width = arr.shape[:2]
    facts.colour = bool(arr.shape[2] == 3 and np.abs(arr - arr.mean(axis=2, keepdims=True)).max() > 2 / 255)
    grey = arr.mean(axis=2)
    facts.mean = float(grey.mean())
    facts.style = style_vector(grey, facts.colour, quantization)
    pil = Image.fromarray(np.round(grey * 255).astype(np.uint8))
    facts.phash = int(str(imagehash.phash(pil)), 16)
    # Kept as the 8-bit grey levels Pillow resizes to (a quarter of float32's memory: 100 MB per
    # 100,000 images); near-copy correlations and the look-up baseline are scale-free.
    facts.thumb = np.asarray(pil.resize((THUMB, THUMB), Image.Resampling.BOX), dtype=np.uint8).reshape(-1)
    return facts


def scan(samples: Sequence[Sample], workers: int | None = None, options: ReadOptions | None = None,
         verbose: bool = True) -> list[ImageFacts]:
    """``scan_file`` over all samples, in threads (decoding releases the GIL)."""
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 2)) as ex:
        facts = ex.map(lambda s: scan_file(s.path, s.frame, options), samples)
        return list(tracked(facts, len(samples), "reading images (audit)", enabled=verbose))
