"""Synthetic bone images with ground-truth tumour masks.

The built-in data set lets anyone run the whole pipeline without patient data, and gives
Grad-CAM a ground truth to be scored against. It is made to be *not* trivially separable:
tumour size and contrast vary (some small and faint), normal images carry benign look-alikes
(vessels, bright spots, artefacts), and every image gets a random pose, scale, intensity
bias field, gain/gamma and noise, so the grey-level histogram alone says little. A model must
look at *where* the abnormal intensity lies (inside the bone, not in soft tissue).

No library draws anatomy like this, so the shapes are written here with plain numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from bonetumor.data.writers import write_png
from bonetumor.errors import BonetumorError
from bonetumor.files import atomic_write_csv

MODALITIES = {"mri": "axial limb slices, T1-like", "stir": "the same, fat-suppressed: marrow lesions bright",
              "xray": "long-bone projections"}
FORMATS = {"png": "a file per slice, with lesion masks", "dicom": "a series folder per patient",
           "nifti": "a volume per patient"}
SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class SynthResult:
    """Where a synthetic data set was written and how many images it holds."""

    root: Path
    manifest: Path
    n_images: int
    n_patients: int


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]."""
    c = (np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(c, c)  # x varies along columns, y along rows


def _pose(x: np.ndarray, y: np.ndarray, rng: np.random.Generator, zoom: float = 1.0,
          centre: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """Apply a random rotation, scale and shift to the coordinate grid.

    ``zoom`` > 1 narrows the field of view onto ``centre`` (the bone), as a tighter scan would.
    """
    ang = rng.uniform(-np.pi, np.pi)
    scale = rng.uniform(0.85, 1.15) * zoom
    tx, ty = rng.uniform(-0.08, 0.08, size=2)
    ca, sa = np.cos(ang), np.sin(ang)
    shift = 1.0 - 1.0 / zoom
    # A zoomed view is aimed near the bone, not exactly at it, so lesions do not sit in the middle.
    cx, cy = centre[0] * shift + rng.uniform(-0.3, 0.3) * shift, centre[1] * shift + rng.uniform(-0.3, 0.3) * shift
    xr = (ca * (x - tx) + sa * (y - ty)) / scale + cx
    yr = (-sa * (x - tx) + ca * (y - ty)) / scale + cy
    return xr, yr


def _soft(d: np.ndarray, edge: float) -> np.ndarray:
    """Soft inside-indicator from a signed distance (positive inside)."""
    return 1.0 / (1.0 + np.exp(-np.clip(d / edge, -40, 40)))


def _blob(x, y, cx, cy, r, rng, irregular=0.25, edge=0.01) -> np.ndarray:
    """An irregular round region (soft mask in [0,1]) with a wavy border."""
    dx, dy = x - cx, y - cy
    rho = np.hypot(dx, dy)
    th = np.arctan2(dy, dx)
    rad = np.ones_like(th)
    for k in range(2, 6):
        rad += irregular / k * rng.uniform(-1, 1) * np.cos(k * th + rng.uniform(0, 2 * np.pi))
    return _soft(r * rad - rho, edge)


def _ellipse(x, y, cx, cy, a, b, edge=0.01) -> np.ndarray:
    d = 1.0 - np.sqrt(((x - cx) / a) ** 2 + ((y - cy) / b) ** 2)
    return _soft(d * min(a, b), edge)


def _bias_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth multiplicative intensity inhomogeneity (as from a coil or the heel effect)."""
    x, y = _grid(size)
    field = np.zeros_like(x)
    for px, py in [(1, 0), (0, 1), (1, 1), (2, 0), (0, 2)]:
        field += rng.normal(0, 0.12) * x**px * y**py
    return np.exp(field)


def _look_alikes(x, y, img, allowed, rng, n_max: int, value_range: tuple[float, float]) -> None:
    """Benign distractors: small round spots and thin curved vessels where ``allowed`` > 0.5."""
    for _ in range(int(rng.integers(0, n_max + 1))):
        kind = rng.random()
        ys, xs = np.nonzero(allowed > 0.5)
        if len(xs) == 0:
            return
        i = rng.integers(len(xs))
        size = img.shape[0]
        cx, cy = (xs[i] + 0.5) / size * 2 - 1, (ys[i] + 0.5) / size * 2 - 1
        val = rng.uniform(*value_range)
        if kind < 0.6:  # a spot
            m = _blob(x, y, cx, cy, rng.uniform(0.02, 0.07), rng, 0.15, 0.008)
        else:  # a vessel: a thin band along a random arc
            ang = rng.uniform(0, np.pi)
            d = np.abs(np.cos(ang) * (y - cy) - np.sin(ang) * (x - cx) - 0.6 * ((x - cx) ** 2))
            along = np.abs(np.sin(ang) * (y - cy) + np.cos(ang) * (x - cx))
            m = _soft(rng.uniform(0.008, 0.02) - d, 0.004) * _soft(rng.uniform(0.15, 0.4) - along, 0.02)
        m = m * allowed
        img[:] = img * (1 - m) + val * m


def _mri_slice(size, anat, tumour, rng, zoom=1.0, stir=False) -> tuple[np.ndarray, np.ndarray]:
    """Axial limb slice: skin/fat ring, muscle, dark cortical ring and marrow.

    T1-like (fatty marrow bright, tumour darker) or, with ``stir``, fat-suppressed and
    fluid-sensitive (fat and marrow dark, tumour and vessels bright), as STIR shows marrow lesions.
    """
    x, y = _pose(*_grid(size), rng, zoom, (anat["bx"], anat["by"]))
    limb = _ellipse(x, y, 0, 0, anat["la"], anat["lb"])
    muscle = _ellipse(x, y, 0, 0, anat["la"] - anat["fat"], anat["lb"] - anat["fat"])
    bx, by, br = anat["bx"], anat["by"], anat["br"]
    bone = _ellipse(x, y, bx, by, br, br * anat["bratio"])
    marrow = _ellipse(x, y, bx, by, br - anat["cortex"], (br - anat["cortex"]) * anat["bratio"], 0.006)
    # Muscle texture: faint fascial planes.
    tex = 0.03 * np.sin(rng.uniform(8, 16) * x + rng.uniform(0, 6)) * np.sin(rng.uniform(8, 16) * y)
    img = 0.02 + limb * (anat["fat_i"] - 0.02)
    img = img * (1 - muscle) + muscle * (anat["muscle_i"] + tex)
    img = img * (1 - bone) + bone * anat["cortex_i"]
    img = img * (1 - marrow) + marrow * anat["marrow_i"]
    soft_tissue = muscle * (1 - _ellipse(x, y, bx, by, br + 0.05, (br + 0.05) * anat["bratio"]))
    _look_alikes(x, y, img, soft_tissue, rng, 4, (0.4, 0.95) if stir else (0.05, 0.95))
    mask = np.zeros_like(img)
    if tumour is not None:
        r = tumour["r"] * (br - anat["cortex"])
        ang = tumour["ang"]
        off = tumour["off"] * max(br - anat["cortex"] - r, 0.0)
        cx, cy = bx + off * np.cos(ang), by + off * np.sin(ang) * anat["bratio"]
        region = _blob(x, y, cx, cy, r, rng, 0.35, 0.012)
        if tumour["breakout"]:
            # The tumour breaks through the cortex into muscle as a soft-tissue mass.
            ox, oy = bx + (br + 0.02) * np.cos(ang), by + (br + 0.02) * np.sin(ang) * anat["bratio"]
            region = np.maximum(region * marrow, _blob(x, y, ox, oy, r * 0.9 + 0.04, rng, 0.4, 0.012) * muscle)
        else:
            region = region * marrow
        t_int = anat["marrow_i"] + 1.6 * tumour["contrast"] if stir else anat["marrow_i"] - tumour["contrast"]
        mottled = t_int + 0.04 * rng.standard_normal(img.shape)
        img = img * (1 - region) + region * mottled
        mask = region
    else:
        # A small sharp benign spot inside marrow now and then (a bone island look-alike).
        if rng.random() < 0.3:
            r = rng.uniform(0.08, 0.16) * (br - anat["cortex"])
            spot = _blob(x, y, bx + rng.uniform(-0.3, 0.3) * br, by + rng.uniform(-0.3, 0.3) * br, r, rng, 0.05, 0.004)
            val = rng.uniform(0.45, 0.8) if stir else rng.uniform(0.1, 0.3)
            img = img * (1 - spot * marrow) + spot * marrow * val
    return img, mask


def _xray_slice(size, anat, tumour, rng, zoom=1.0) -> tuple[np.ndarray, np.ndarray]:
    """Long-bone projection: soft-tissue band, tubular bone with bright cortices and dimmer canal."""
    x, y = _pose(*_grid(size), rng, zoom, (anat["bx"] * 0.3, 0.0))
    soft = _soft(anat["la"] - np.abs(x), 0.03)
    img = 0.04 + soft * anat["fat_i"] * 0.45 * (1 - 0.3 * x**2)
    R = anat["br"] * (1 + 0.35 * _soft(y - 0.55, 0.08))  # metaphyseal flare at one end
    r = R - anat["cortex"]
    xb = x - anat["bx"] * 0.3
    outer = np.sqrt(np.clip(R**2 - xb**2, 0, None))
    inner = np.sqrt(np.clip(r**2 - xb**2, 0, None))
    cortical_path, canal_path = 2 * (outer - inner), 2 * inner
    bone = anat["cortex_i"] * 2.2 * cortical_path + anat["marrow_i"] * 0.9 * canal_path
    inside_bone = _soft(R - np.abs(xb), 0.01)
    img = img + bone
    _look_alikes(x, y, img, soft * (1 - _soft(R + 0.04 - np.abs(xb), 0.01)), rng, 4, (0.2, 0.9))
    mask = np.zeros_like(img)
    if tumour is not None:
        cy = rng.uniform(-0.6, 0.5)
        rr = tumour["r"] * anat["br"] * 1.1
        region = _blob(x, y, anat["bx"] * 0.3 + tumour["off"] * 0.5 * anat["br"], cy, rr, rng, 0.4, 0.01)
        region = region * inside_bone
        lytic = rng.random() < 0.65
        delta = -tumour["contrast"] if lytic else tumour["contrast"] * 0.8
        moth = 1 + 0.3 * rng.standard_normal(img.shape)
        img = img + region * delta * moth * bone.clip(0.2, None) / max(bone.max(), 1e-6)
        if tumour["breakout"]:
            # Periosteal reaction: spiculated bright lines perpendicular to the cortex.
            spic = (np.sin(180 * y) > 0.6) * _soft(rr - np.abs(y - cy), 0.02)
            band = _soft(0.08 - np.abs(np.abs(xb) - R - 0.05), 0.01)
            img = img + 0.12 * spic * band
            region = np.maximum(region, band * _soft(rr - np.abs(y - cy), 0.02))
        mask = region
    return img, mask


def _patient_anatomy(rng: np.random.Generator) -> dict:
    la = rng.uniform(0.6, 0.85)
    return {
        "la": la,
        "lb": la * rng.uniform(0.75, 1.0),
        "fat": rng.uniform(0.04, 0.16),
        "br": rng.uniform(0.22, 0.36),
        "bratio": rng.uniform(0.8, 1.0),
        "bx": rng.uniform(-0.15, 0.15),
        "by": rng.uniform(-0.15, 0.15),
        "cortex": rng.uniform(0.03, 0.06),
        "fat_i": rng.uniform(0.7, 0.9),
        "muscle_i": rng.uniform(0.3, 0.45),
        "cortex_i": rng.uniform(0.04, 0.12),
        "marrow_i": rng.uniform(0.6, 0.8),
    }


def _finish(img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Bias field, noise, and a random gain/gamma so absolute grey levels carry little."""
    size = img.shape[0]
    img = img * _bias_field(size, rng)
    img = img + rng.normal(0, rng.uniform(0.015, 0.05), img.shape)
    img = np.clip(img, 0, None)
    img = img / max(np.percentile(img, 99.5), 1e-6) * rng.uniform(0.8, 1.0)
    img = np.clip(img, 0, 1) ** rng.uniform(0.75, 1.35)
    return img


def make_patient(modality: str, size: int, cancer: bool, n_slices: int, rng: np.random.Generator, zoom: float = 1.0):
    """Images and masks (float arrays in [0,1]) for the slices of one synthetic patient."""
    anat = _patient_anatomy(rng)
    if modality == "stir":
        # Fat suppressed: subcutaneous fat and fatty marrow dark, muscle intermediate.
        anat.update(fat_i=rng.uniform(0.08, 0.18), muscle_i=rng.uniform(0.25, 0.4),
                    cortex_i=rng.uniform(0.03, 0.08), marrow_i=rng.uniform(0.1, 0.22))
    tumour0 = None
    if cancer:
        faint = rng.random() < 0.35
        tumour0 = {
            "r": rng.uniform(0.25, 0.5) if faint else rng.uniform(0.4, 0.9),
            "contrast": rng.uniform(0.12, 0.22) if faint else rng.uniform(0.2, 0.45),
            "off": rng.uniform(0, 1),
            "ang": rng.uniform(0, 2 * np.pi),
            "breakout": bool(rng.random() < 0.3),
        }
    draw = _xray_slice if modality == "xray" else partial(_mri_slice, stir=modality == "stir")
    out = []
    for k in range(n_slices):
        t = None
        if tumour0 is not None:
            # Neighbouring slices cut the tumour at different sizes.
            t = dict(tumour0, r=tumour0["r"] * rng.uniform(0.75, 1.1))
        img, mask = draw(size, anat, t, rng, zoom)
        out.append((_finish(img, rng), (mask > 0.5).astype(np.uint8)))
    return out


def _assign_splits(n_patients: int, rng: np.random.Generator) -> list[tuple[str, bool]]:
    """Half the patients have cancer; 70/15/15 train/valid/test by patient, stratified by label."""
    labels = np.array([i % 2 == 0 for i in range(n_patients)])
    splits = np.empty(n_patients, dtype=object)
    for lab in (True, False):
        idx = rng.permutation(np.nonzero(labels == lab)[0])
        n = len(idx)
        n_test = max(1, round(0.15 * n)) if n >= 3 else 0
        n_val = max(1, round(0.15 * n)) if n >= 3 else 0
        splits[idx[:n_test]] = "test"
        splits[idx[n_test : n_test + n_val]] = "valid"
        splits[idx[n_test + n_val :]] = "train"
    return [(str(s), bool(lab)) for s, lab in zip(splits, labels)]


def _write_volume(root: Path, rel: Path, images: list[np.ndarray], fmt: str, pid: str) -> Path:
    """One patient's slices as a DICOM series folder or a NIfTI volume; returns its relative path."""
    from bonetumor.data.writers import write_dicom, write_nifti

    if fmt == "nifti":
        write_nifti(root / rel.with_name(rel.name + ".nii.gz"), images, empty_ends=1)
        return rel.with_name(rel.name + ".nii.gz")
    from pydicom.uid import generate_uid

    series = generate_uid(entropy_srcs=[str(rel)])  # deterministic: same seed, same files
    # Written in reverse position order, so that readers must sort by position, not by name.
    for k, img in enumerate(images):
        write_dicom(root / rel / f"IM{len(images) - k:04d}.dcm", img, series_uid=series, instance=k + 1,
                    position=2.5 * k, patient_id=pid, slope=1.0, intercept=-1024.0, window=(1023.5, 4096.0),
                    uid_seed=f"{rel}/{k}")
    return rel


def _check_arguments(n_patients: int, size: int, modality: str, bit_depth: int, zoom: float, fmt: str) -> None:
    if modality not in MODALITIES:
        raise BonetumorError(f"unknown modality {modality!r}; choose one of {', '.join(MODALITIES)}")
    if bit_depth not in (8, 16):
        raise BonetumorError(f"--bit-depth must be 8 or 16, not {bit_depth}")
    if n_patients < 6:
        raise BonetumorError(f"--n-patients must be at least 6 (one per class and split), not {n_patients}")
    if not 0.5 <= zoom <= 4:
        raise BonetumorError(f"--zoom must be between 0.5 and 4, not {zoom}")
    if fmt not in FORMATS:
        raise BonetumorError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if size < 32:
        raise BonetumorError(f"--size must be at least 32 pixels, not {size}")


def _write_slices(root: Path, folder: Path, pid: str, slices, label: str, split: str, bit_depth: int) -> list[dict]:
    """A patient's slices as PNG files (and a cancer's lesion masks); their manifest rows."""
    rows = []
    for k, (img, mask) in enumerate(slices):
        rel = folder / f"{pid}_s{k}.png"
        write_png(root / rel, img, bit_depth)
        mask_rel = ""
        if label == "cancer":
            mask_rel = str(Path("masks") / f"{pid}_s{k}.png")
            write_png(root / mask_rel, mask.astype(np.float64), 8)
        rows.append({"path": rel.as_posix(), "label": label, "patient_id": pid, "split": split,
                     "mask_path": Path(mask_rel).as_posix() if mask_rel else ""})
    return rows


def create_synthetic_dataset(
    out: str | Path,
    n_patients: int = 100,
    size: int = 128,
    seed: int = 0,
    modality: str = "mri",
    slices_per_patient: int = 4,
    bit_depth: int = 8,
    zoom: float = 1.0,
    fmt: str = "png",
) -> SynthResult:
    """Write a synthetic data set to ``out`` in the ``{split}/{class}/`` layout plus ``manifest.csv``.

    Args:
        out: folder to create (must not hold a previous data set).
        n_patients: number of synthetic patients (half with cancer), split 70/15/15 by patient.
        size: image side in pixels.
        seed: the same seed gives the same bytes.
        modality: ``mri`` (T1-like axial limb slices), ``stir`` (fat-suppressed axial slices)
            or ``xray`` (long-bone projections).
        slices_per_patient: images per patient.
        bit_depth: 8 or 16 (PNG).
        zoom: field of view narrowed onto the bone by this factor (1 = whole limb).
        fmt: ``png`` (one file per slice, with lesion masks), ``dicom`` (a series folder per
            patient, 12-bit with rescale and window) or ``nifti`` (a ``.nii.gz`` volume per
            patient, with an empty slice at each end). The manifest lists series and volumes.

    Raises:
        BonetumorError: on bad arguments or an existing non-empty ``out``.
    """
    _check_arguments(n_patients, size, modality, bit_depth, zoom, fmt)
    root = Path(out)
    if root.exists() and any(root.iterdir()):
        raise BonetumorError(f"{root} exists and is not empty; choose a new folder")
    rng = np.random.default_rng(seed)
    assignment = _assign_splits(n_patients, rng)
    seeds = np.random.SeedSequence(seed).spawn(n_patients)
    rows = []
    for p, ((split, cancer), ss) in enumerate(zip(assignment, seeds)):
        pid = f"P{p:04d}"
        label = "cancer" if cancer else "normal"
        slices = make_patient(modality, size, cancer, slices_per_patient, np.random.default_rng(ss), zoom)
        if fmt != "png":
            rel = _write_volume(root, Path(split) / label / pid, [img for img, _ in slices], fmt, pid)
            rows.append({"path": rel.as_posix(), "label": label, "patient_id": pid, "split": split, "mask_path": ""})
            continue
        rows += _write_slices(root, Path(split) / label, pid, slices, label, split, bit_depth)
    manifest = root / "manifest.csv"
    atomic_write_csv(manifest, ["path", "label", "patient_id", "split", "mask_path"], rows)
    n_images = len(rows) if fmt == "png" else len(rows) * slices_per_patient
    return SynthResult(root=root, manifest=manifest, n_images=n_images, n_patients=n_patients)


def create_brightness_dataset(root: str | Path, n_train: int = 32, n_valid: int = 8, size: int = 32,
                              seed: int = 0) -> Path:
    """A problem a CNN learns from random init within a few steps: grey images in
    ``{train,valid}/{cancer,normal}/``, cancer brighter (level 150 vs 100, noise sd 40); ``n_*``
    images per class. For checking what learns, not a model of anything (``lr-find``'s tests)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("valid", n_valid)):
        for label, level in (("cancer", 150), ("normal", 100)):
            (root / split / label).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                im = np.clip(rng.normal(level, 40, (size, size)), 0, 255).astype(np.uint8)
                write_png(root / split / label / f"{label}_{i}.png", im / 255.0)
    return root
