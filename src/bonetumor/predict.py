"""Prediction on files, folders, volumes and DICOM series with a trained checkpoint.

Every 2-D image gets a row; the slices of a volume or series also get one score per study,
aggregated as ``max``, ``mean`` or ``topk:K`` (mean of the K highest slice scores).
"""

from __future__ import annotations

import os
import warnings
from contextlib import nullcontext
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torchvision.transforms.v2.functional import normalize

from bonetumor.batchnorm import inference_folded
from bonetumor.checkpoint import checkpoint_config, load_checkpoint
from bonetumor.config import read_options
from bonetumor.data.datasets import load_tensor
from bonetumor.data.io import ReadOptions
from bonetumor.data.transforms import create_resize
from bonetumor.data.volumes import SliceRef, expand_inputs
from bonetumor.compiled import maybe_compiled
from bonetumor.errors import BadImageError, BonetumorError
from bonetumor.precision import check_precision
from bonetumor.utils import autocast_dtype, select_device

AGGREGATES = "max, mean or topk:K"
# --engine auto runs a checkpoint in OpenVINO on a CPU from this many images on, when installed:
# exporting costs about 7 s once (then cached), which OpenVINO's 1.35x speed over PyTorch pays
# back over about 1,000 images (benchmarks/onnx_inference.py).
AUTO_OPENVINO_MIN_IMAGES = 1000
DEFAULT_AGGREGATE = "topk:3"  # a study's score: the mean of its three highest slice scores
PRECISION_CHECK_IMAGES = 8


def parse_aggregate(text: str) -> tuple[str, int]:
    """'max' -> ('max', 1); 'mean' -> ('mean', 0); 'topk:3' -> ('topk', 3). Bad text: BonetumorError."""
    t = str(text).strip().lower()
    if t in ("max", "mean"):
        return t, 1 if t == "max" else 0
    if t.startswith("topk:"):
        try:
            k = int(t.split(":", 1)[1])
        except ValueError:
            k = 0
        if k >= 1:
            return "topk", k
    raise BonetumorError(f"--aggregate {text!r}: use {AGGREGATES}")


def aggregate_scores(scores: np.ndarray, aggregate: str) -> np.ndarray:
    """One study's slice scores (n,) or (n, classes) -> its score, by ``aggregate``."""
    kind, k = parse_aggregate(aggregate)
    s = np.asarray(scores, dtype=np.float64)
    if kind == "mean":
        return s.mean(axis=0)
    key = s if s.ndim == 1 else s.max(axis=1)  # multiclass: rank slices by their top probability
    top = np.argsort(-key, kind="stable")[: (1 if kind == "max" else k)]
    return s[top].mean(axis=0)


def predict(checkpoint: str | Path, paths: Sequence[str | Path], device: str = "auto", batch_size: int | None = None,
            window: str | None = None, skip_bad: bool = False, engine: str = "torch", precision: str = "fp32",
            compile_mode: str = "auto", workers: int | None = None) -> list[dict]:
    """Probability of the positive class and the label at the checkpoint's threshold, per image
    (per slice for volumes and series).

    Args:
        window: override the window the model was trained with (see ``ReadOptions``).
        skip_bad: give an unreadable file a row with its ``error`` instead of stopping.
        engine: ``torch``, ``onnx`` or ``openvino`` (run in ONNX Runtime (fp32) or OpenVINO (fp32
            or bf16) on the CPU: a ``.onnx`` file from ``export``, or a checkpoint exported first,
            once, into ``export.export_cache_dir()``), or ``auto`` (see ``auto_engine``).
        precision: ``fp32``, ``bf16``, ``fp16`` (CUDA) or ``auto``: with more than one batch
            of images, the device's native reduced precision if the probabilities of the first
            ``PRECISION_CHECK_IMAGES`` images stay within 0.01 of fp32's (see precision.py); a
            single batch stays fp32.
        compile_mode: ``auto`` (torch.compile from ``compiled.COMPILE_MIN_IMAGES`` images on),
            ``on`` or ``off`` (see compiled.py).
        batch_size: images per batch; None: ``default_batch_size`` of the device.
        workers: processes reading and preprocessing images ahead of the model; None:
            ``default_workers`` of the device.

    Returns:
        [{"path", "slice", "study", "probability", "label", "threshold"}] for binary models;
        multiclass models give "probabilities": {class: p} instead of "probability".

    Raises:
        BonetumorError: a missing or unreadable file (one line naming it), a bad checkpoint.
    """
    return predict_studies(checkpoint, paths, None, device, batch_size, window, skip_bad, engine, precision,
                           compile_mode, workers)[0]


def predict_studies(checkpoint: str | Path, paths: Sequence[str | Path], aggregate: str | None = DEFAULT_AGGREGATE,
                    device: str = "auto", batch_size: int | None = None, window: str | None = None,
                    skip_bad: bool = False, engine: str = "torch", precision: str = "fp32",
                    compile_mode: str = "auto", workers: int | None = None) -> tuple[list[dict], list[dict]]:
    """``predict``'s rows and, for the volumes and series among ``paths``, one row per study
    (see ``study_scores``; none when ``aggregate`` is None)."""
    if aggregate is not None:
        parse_aggregate(aggregate)
    if batch_size is not None and batch_size < 1 or workers is not None and workers < 0:
        raise BonetumorError(f"--batch-size must be 1 or more and --workers 0 or more, not {batch_size} and {workers}")
    auto, refs = engine == "auto", None
    if auto:
        engine, refs = _resolve_auto(checkpoint, paths, device, window)
    try:
        ck, dev = load_model(checkpoint, device, engine)
    except BonetumorError as e:
        if not (auto and engine == "openvino" and refs is not None):  # only auto's export of a checkpoint falls back
            raise
        # a model that does not export: PyTorch is as correct
        warnings.warn(f"--engine auto: running in PyTorch, as OpenVINO could not take the model ({e})",
                      RuntimeWarning, stacklevel=2)
        engine = "torch"
        ck, dev = load_model(checkpoint, device, engine)
    batch_size = batch_size or default_batch_size(dev)
    workers = default_workers(dev) if workers is None else workers
    options = ck.read_options if window is None else replace(ck.read_options, window=window)
    refs = expand_inputs(paths, options) if refs is None else refs
    if engine == "onnx" or (precision == "auto" and len(refs) <= batch_size):
        precision = "fp32"  # ONNX Runtime runs fp32; one batch is not worth a second pass to check
    if precision not in ("auto", "fp32", "bf16", "fp16") or (engine == "openvino" and precision == "fp16"):
        raise BonetumorError(f"--precision must be auto, fp32, bf16{'' if engine == 'openvino' else ' or fp16'} "
                             f"with engine {engine}, not {precision!r}")
    run = ck.model if engine != "torch" else maybe_compiled(ck.model, compile_mode, len(refs), batch_size, dev)
    results = score_refs(ck, refs, options, dev, batch_size, precision, run, skip_bad, workers,
                         prefetch=engine != "torch")
    studies = study_scores(results, aggregate, ck.label_for) if aggregate is not None else []
    return results, studies


def _decode(refs: Sequence[SliceRef], resize, options: ReadOptions, skip_bad: bool):
    """One batch read and resized: (rows so far, the images stacked, or None, rows of unreadable
    files). Images stay in [0, 1] with one channel when all are grey (``_model_input`` makes
    the model's three normalised channels), so resizing and handing the batch over from a worker
    process cost a third: the handover bounded ``predict`` on a GPU (about 2,000 images/s of
    three-channel batches through DataLoader workers, measured on 16 cores)."""
    chunk, xs, bad = [], [], []
    for r in refs:
        base = {"path": r.path, "slice": r.frame, "study": r.study}
        try:
            xs.append(resize(load_tensor(r.path, r.frame, options, rgb=False)))
            chunk.append(base)
        except BadImageError as e:
            if not skip_bad:
                raise
            bad.append({**base, "error": e.problem})
    if not xs:
        return chunk, None, bad
    channels = max(x.shape[0] for x in xs)
    return chunk, torch.stack([x.expand(channels, -1, -1) for x in xs]), bad


def _model_input(x: torch.Tensor, device: torch.device, mean, std,
                 memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """A batch from ``_decode`` on ``device``, three channels, normalised as ``create_transforms``
    normalises in training, in ``memory_format`` (channels_last for PyTorch's convolutions; the
    exported-model engines take plain NCHW, which spares them converting it back)."""
    x = x.to(device, non_blocking=True)
    x = normalize(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, list(mean), list(std))
    return x.contiguous(memory_format=memory_format)


def default_batch_size(device: torch.device) -> int:
    """Images per batch: 8 on a CPU (fastest on 2 cores: 34 vs 30 images/s at 32), 64 on a
    GPU, where a small batch leaves it waiting for kernel launches (see benchmarks/gpu.py)."""
    return 64 if device.type == "cuda" else 8


def default_workers(device: torch.device) -> int:
    """Worker processes decoding images: on a CUDA GPU up to 8, leaving two cores (one drives
    the GPU, one copies batches to it), as decoding on one core is 20-40x slower than the model
    there; none on a CPU, whose cores the model needs. On 16 cores (benchmarks/gpu.py) 8 workers
    decoded 2,520 images/s and 14 workers 2,190."""
    return max(1, min(8, (os.cpu_count() or 3) - 2)) if device.type == "cuda" else 0


class _Chunks(torch.utils.data.Dataset):
    """Batches of slices as items, so DataLoader workers each decode whole batches."""

    def __init__(self, chunks: list, resize, options: ReadOptions):
        self.chunks, self.resize, self.options = chunks, resize, options

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int):
        # Unreadable files come back as rows: the caller raises for the first, or keeps them.
        return _decode(self.chunks[i], self.resize, self.options, True)


def _batches(refs: Sequence[SliceRef], batch_size: int, resize, options: ReadOptions, skip_bad: bool,
             workers: int = 0, prefetch: bool = False, pin_memory: bool = False):
    """``_decode``'s batches in order. ``workers`` > 0: decoded in that many processes (a
    DataLoader, batches in order); else, with ``prefetch``, the next batch is read in a
    background thread while the caller runs the model on the current one.

    Measured on 2 cores over 180 PNGs: OpenVINO 1.04x faster with the thread, PyTorch 0.91x (its
    OpenMP threads wait for each other when a third thread takes a core), so on a CPU only the
    exported-model engines prefetch.
    """
    chunks = [refs[start : start + batch_size] for start in range(0, len(refs), batch_size)]
    if workers > 0 and len(chunks) > 1:
        loader = torch.utils.data.DataLoader(_Chunks(chunks, resize, options), batch_size=None, shuffle=False,
                                             num_workers=min(workers, len(chunks)), pin_memory=pin_memory)
        for chunk, x, bad in loader:
            if bad and not skip_bad:
                raise BadImageError(bad[0]["path"], bad[0]["error"])
            yield chunk, x, bad
        return
    if not prefetch or len(chunks) < 2:
        for chunk in chunks:
            yield _decode(chunk, resize, options, skip_bad)
        return
    from concurrent.futures import ThreadPoolExecutor

    # One batch ahead only (Executor.map would read them all at once).
    with ThreadPoolExecutor(1, thread_name_prefix="bonetumor-decode") as pool:
        pending = pool.submit(_decode, chunks[0], resize, options, skip_bad)
        for following in chunks[1:] + [None]:
            batch = pending.result()
            if following is not None:
                pending = pool.submit(_decode, following, resize, options, skip_bad)
            yield batch


def score_refs(ck, refs: Sequence[SliceRef], options: ReadOptions, device: torch.device, batch_size: int = 8,
               precision: str = "fp32", run: Callable | None = None, skip_bad: bool = False,
               workers: int = 0, prefetch: bool = False) -> list[dict]:
    """``predict``'s rows for slices ``refs`` with a model already loaded (``ck``; ``run``, its
    compiled form, if any). ``precision`` auto is resolved on the first batch's first images;
    ``workers`` processes, or with ``prefetch`` a thread, read batches ahead while the model
    runs (see ``_batches``)."""
    run = run or ck.model
    resize = create_resize(ck.image_size)
    memory_format = getattr(ck.model, "input_memory_format", torch.channels_last)
    results = []
    # Eager, BatchNorms fold into their convolutions (the precision check below runs folded too,
    # as the model it checks for); a compiled model has them folded already.
    with torch.inference_mode(), inference_folded(ck.model) if run is ck.model else nullcontext():
        for chunk, x, bad in _batches(refs, batch_size, resize, options, skip_bad, workers, prefetch,
                                      pin_memory=device.type == "cuda"):
            results += bad
            if x is None:
                continue
            x = _model_input(x, device, ck.mean, ck.std, memory_format)
            probs = None
            if precision == "auto":
                # Checked on a few images: the check's fp32 pass costs as much as predicting them.
                # A batch no larger than the check already has its probabilities from it.
                found, checked = check_precision("auto", ck.model, x[:PRECISION_CHECK_IMAGES], device)
                precision = found["chosen"]
                probs = checked if checked is not None and len(x) <= PRECISION_CHECK_IMAGES else None
            if probs is None:
                dtype = autocast_dtype(precision, device)
                with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    logits = run(x).float()
                probs = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, 1)
            results += prediction_rows(ck, chunk, probs[:, 0] if probs.shape[1] == 1 else probs)
    return results


def slice_score(row: dict) -> float:
    """The number a slice is ranked by: P(positive), or a multiclass model's top probability."""
    return row["probability"] if "probability" in row else max(row["probabilities"].values())


def prediction_rows(ck, bases: Sequence[dict], probs: torch.Tensor) -> list[dict]:
    """``bases`` (path, slice, study) completed with their probabilities and labels: ``probs`` is
    (N,) P(positive) for a binary model, else (N, C)."""
    if probs.ndim == 1:
        return [{**b, "probability": round(p, 6), "label": ck.label_for(p), "threshold": ck.threshold}
                for b, p in zip(bases, probs.tolist())]
    return [{**b, "probabilities": dict(zip(ck.classes, p)), "label": ck.label_for(p)}
            for b, p in zip(bases, probs.tolist())]


def auto_engine(device: torch.device, n_images: int, exported: bool = False) -> str:
    """``--engine auto``'s choice for a checkpoint: OpenVINO on a CPU when it is installed
    (``bonetumor[openvino]``; 1.35x PyTorch's speed here, within 0.01 in bf16 as ``--precision
    auto`` checks) for ``AUTO_OPENVINO_MIN_IMAGES`` images or more, where exporting pays for
    itself, or for any number when the checkpoint is ``exported`` already (in the export cache);
    else PyTorch."""
    from bonetumor.export import openvino_available

    worth = n_images >= AUTO_OPENVINO_MIN_IMAGES or exported
    return "openvino" if device.type == "cpu" and worth and openvino_available() else "torch"


def _resolve_auto(checkpoint: str | Path, paths: Sequence[str | Path], device: str, window: str | None):
    """(engine, the slices to predict or None) for ``--engine auto``: an exported file in
    OpenVINO (else ONNX Runtime); a checkpoint as ``auto_engine`` says, its slices counted with
    the checkpoint's read options, read without building the PyTorch model the choice may not need."""
    if str(checkpoint).lower().endswith(".onnx"):
        return ("openvino" if find_spec("openvino") is not None else "onnx"), None
    if auto_engine(select_device(device), AUTO_OPENVINO_MIN_IMAGES) == "torch":
        return "torch", None  # whatever the job's size: a GPU, or no OpenVINO
    from bonetumor.export import cached_export_path

    refs = expand_inputs(paths, read_options(checkpoint_config(checkpoint), window))
    return auto_engine(torch.device("cpu"), len(refs), cached_export_path(checkpoint).exists()), refs


def load_model(path: str | Path, device: str = "auto", engine: str = "torch"):
    """(LoadedCheckpoint, device) for ``engine`` torch (a .pt checkpoint), onnx or openvino (an
    exported .onnx, run in ONNX Runtime or OpenVINO on the CPU)."""
    if engine in ("onnx", "openvino"):
        from bonetumor.export import cached_export, load_onnx, load_openvino

        load = load_onnx if engine == "onnx" else load_openvino
        if str(path).lower().endswith(".onnx"):
            return load(path), torch.device("cpu")
        # A checkpoint: exported first (with export's check; about 7 s for ResNet50), once.
        return load(cached_export(path)), torch.device("cpu")
    if engine != "torch":
        raise BonetumorError(f"--engine must be auto, torch, onnx or openvino, not {engine!r}")
    if str(path).lower().endswith(".onnx"):
        raise BonetumorError(f"{path}: an ONNX file; pass --engine onnx or --engine openvino")
    dev = select_device(device)
    return load_checkpoint(path, dev), dev


def study_scores(rows: Sequence[dict], aggregate: str, label_for: Callable) -> list[dict]:
    """One row per study (volume or series) from ``predict``'s slice rows; ``label_for`` turns
    a score into a label (the checkpoint's threshold). 2-D images outside a study are left out.

    Returns:
        [{"study", "n_slices", "aggregate", "probability" (or "probabilities"), "label",
          "top_slices": the five highest-scoring slices (numbers, or file names in a series)}]
    """
    parse_aggregate(aggregate)
    by_study: dict[str, list[dict]] = {}
    for r in rows:
        if r.get("study") and "error" not in r:
            by_study.setdefault(r["study"], []).append(r)
    out = []
    for study, rs in by_study.items():
        binary = "probability" in rs[0]
        scores = np.array([r["probability"] if binary else list(r["probabilities"].values()) for r in rs])
        agg = aggregate_scores(scores, aggregate)
        order = np.argsort(-(scores if binary else scores.max(axis=1)), kind="stable")
        top = [rs[i]["slice"] if rs[i]["slice"] is not None else Path(rs[i]["path"]).name for i in order[:5]]
        row = {"study": study, "n_slices": len(rs), "aggregate": aggregate, "top_slices": top}
        if binary:
            row.update(probability=round(float(agg), 6), label=label_for(float(agg)))
        else:
            probs = dict(zip(rs[0]["probabilities"], map(float, agg)))
            row.update(probabilities=probs, label=label_for(list(probs.values())))
        out.append(row)
    return out
