"""Prediction on files, folders, volumes and DICOM series with a trained checkpoint.

Every 2-D image gets a row; the slices of a volume or series also get one score per study,
aggregated as ``max``, ``mean`` or ``topk:K`` (mean of the K highest slice scores).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from bonetumor.data.readers import image_kind
from bonetumor.data.studies import expand_inputs
from bonetumor.errors import BonetumorError
from bonetumor.files import RunDir
from bonetumor.inference import (
    default_batch_size,
    default_workers,
    open_model,
    score_samples,
)
from bonetumor.model.checkpoint import checkpoint_config
from bonetumor.model.export import has_cached_export
from bonetumor.model.ood import OOD_FIELDS, inference_module
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime import engines
from bonetumor.runtime.device import select_device
from bonetumor.runtime.engines import Engine
from bonetumor.runtime.forward import CompiledInference, should_compile

AGGREGATES = "max, mean or topk:K"
DEFAULT_AGGREGATE = "topk:3"  # a study's score: the mean of its three highest slice scores


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
            window: str | None = None, skip_bad: bool = False, engine: str = "torch", precision: str = "model",
            compile_mode: str = "auto", workers: int | None = None) -> list[dict]:
    """Probability of the positive class and the label at the checkpoint's threshold, per image
    (per slice for volumes and series).

    Args:
        window: override the window the model was trained with (see ``ReadOptions``).
        skip_bad: give an unreadable file a row with its ``error`` instead of stopping.
        engine: ``torch``, ``onnx`` or ``openvino`` (run in ONNX Runtime (fp32) or OpenVINO (fp32
            or bf16) on the CPU: a ``.onnx`` file from ``export``, or a checkpoint exported first,
            once, into ``model.export.export_cache_dir()``), or ``auto`` (see
            ``runtime.engines.choose_engine``).
        precision: ``model`` (the precision chosen and checked at training, where this device runs
            it natively, else fp32: ``LoadedCheckpoint.precision_on``), or ``fp32``, ``bf16``,
            ``fp16`` (CUDA) to force one. Never chosen by the job's size, so that a file's
            probability does not depend on what else is in the job.
        compile_mode: ``auto`` (torch.compile from ``runtime.forward.COMPILE_MIN_IMAGES`` images
            on), ``on`` or ``off``.
        batch_size: images per batch; None: ``inference.default_batch_size`` of the device.
        workers: processes reading and preprocessing images ahead of the model; None:
            ``inference.default_workers`` of the device.

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
                    skip_bad: bool = False, engine: str = "torch", precision: str = "model",
                    compile_mode: str = "auto", workers: int | None = None) -> tuple[list[dict], list[dict]]:
    """``predict``'s rows and, for the volumes and series among ``paths``, one row per study
    (see ``study_scores``; none when ``aggregate`` is None)."""
    with ranks.together():  # every rank checks the options and inputs: bad input stops the job with one line
        if aggregate is not None:
            parse_aggregate(aggregate)
        if batch_size is not None and batch_size < 1 or workers is not None and workers < 0:
            raise BonetumorError(f"--batch-size must be 1 or more and --workers 0 or more, not {batch_size} and {workers}")
        engine, samples = Engine.parse(engine), None
        if precision == "int8" and not Path(checkpoint).is_dir():
            raise BonetumorError(f"--precision int8 needs a quantised model: run bonetumor quantize {checkpoint} "
                                 "--calibration DATA --out FOLDER, then pass FOLDER")
        auto = engine is Engine.AUTO
        if auto:
            engine, samples = _resolve_auto(checkpoint, paths, device, window)
    try:
        with ranks.main_first():  # under torchrun rank 0 exports a checkpoint once; the others find it cached
            ck, dev = open_model(checkpoint, device, engine, check="deferred")
    except BonetumorError as e:
        if not (auto and engine is Engine.OPENVINO and samples is not None):  # only auto's export of a checkpoint falls back
            raise
        # a model that does not export: PyTorch is as correct
        warnings.warn(f"--engine auto: running in PyTorch, as OpenVINO could not take the model ({e})",
                      RuntimeWarning, stacklevel=2)
        engine = Engine.TORCH
        ck, dev = open_model(checkpoint, device, engine, check="deferred")
    if ck.raw.get("fixed_precision"):
        engine = Engine.OPENVINO  # a quantised folder, whatever --engine said: it runs there alone
    batch_size = batch_size or default_batch_size(dev)
    workers = default_workers(dev) if workers is None else workers
    options = ck.read_options if window is None else replace(ck.read_options, window=window)
    if precision == "auto":  # the old name of the model's own
        precision = "model"
    with ranks.together():
        samples = expand_inputs(paths, options) if samples is None else samples
        fixed = ck.raw.get("fixed_precision")  # a quantised model's
        if fixed and precision not in ("model", "int8", fixed):
            raise BonetumorError(f"--precision {precision}: {checkpoint} is a quantised model ({fixed}); for "
                                 f"{precision}, pass the checkpoint it was made from")
        if not fixed and (precision not in ("model", "fp32", "bf16", "fp16")
                          or engine is Engine.OPENVINO and precision == "fp16"):
            raise BonetumorError(f"--precision must be model, fp32, bf16{'' if engine is Engine.OPENVINO else ' or fp16'} "
                                 f"with engine {engine.value}, not {precision!r}")
    if fixed:
        precision = fixed
    elif engine is Engine.ONNX:
        precision = "fp32"  # ONNX Runtime runs fp32
    elif precision == "model":
        precision = ck.precision_on(dev)
    run = None  # the model itself, eager (with its out-of-distribution check, if any)
    if not engine.exported and should_compile(compile_mode, len(samples), dev):
        run = CompiledInference(inference_module(ck.model), batch_size)
    rows = score_samples(ck, samples, dev, batch_size, precision, run, skip_bad, workers, prefetch=engine.exported,
                         options=options, what="predict")
    ck.verified()  # nothing is returned from weights whose checksum fails
    studies = study_scores(rows, aggregate, ck.label_for) if aggregate is not None else []
    return rows, studies


def _resolve_auto(checkpoint: str | Path, paths: Sequence[str | Path], device: str, window: str | None):
    """(engine, the slices to predict or None) for ``--engine auto``: an exported file in
    OpenVINO (else ONNX Runtime); a checkpoint as ``choose_engine`` says, its slices counted with
    the checkpoint's read options, read without building the PyTorch model the choice may not need."""
    if Path(checkpoint).is_dir():  # a quantised model folder (else open_model says what it is not)
        return Engine.OPENVINO, None
    if str(checkpoint).lower().endswith(".onnx"):
        return (Engine.OPENVINO if find_spec("openvino") is not None else Engine.ONNX), None
    if engines.choose_engine(select_device(device), engines.AUTO_OPENVINO_MIN_IMAGES) is Engine.TORCH:
        return Engine.TORCH, None  # whatever the job's size: a GPU, or no OpenVINO
    few = len(paths) < engines.AUTO_OPENVINO_MIN_IMAGES
    if few and all(Path(p).is_file() and image_kind(p) == "image" for p in paths) and not has_cached_export(checkpoint):
        return Engine.TORCH, None  # a few 2-D files: counted without reading the checkpoint
    options = checkpoint_config(checkpoint).read_options
    samples = expand_inputs(paths, options if window is None else replace(options, window=window))
    return engines.choose_engine(torch.device("cpu"), len(samples), has_cached_export(checkpoint)), samples


def write_predictions(run: RunDir, rows: Sequence[dict], studies: Sequence[dict]) -> None:
    """``predictions.csv`` (and ``studies.csv`` for volumes and series) in ``run``; a multiclass
    model's class probabilities as one JSON column."""
    flat = [{**r, "probabilities": json.dumps(r["probabilities"])} if "probabilities" in r else r for r in rows]
    run.write_csv(RunDir.PREDICTIONS, ["path", "slice", "study", "probability", "probabilities", "label", "threshold",
                                       *OOD_FIELDS, "error"], flat)
    if studies:
        run.write_csv(RunDir.STUDIES, ["study", "n_slices", "aggregate", "probability", "probabilities", "label",
                                       "top_slices", "unlike_training_slices"],
                      [{**s, "top_slices": " ".join(map(str, s["top_slices"])),
                        **({"probabilities": json.dumps(s["probabilities"])} if "probabilities" in s else {})}
                       for s in studies])


def slice_score(row: dict) -> float:
    """The number a slice is ranked by: P(positive), or a multiclass model's top probability."""
    return row["probability"] if "probability" in row else max(row["probabilities"].values())


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
        if "unlike_training" in rs[0]:
            row["unlike_training_slices"] = sum(bool(r["unlike_training"]) for r in rs)
        if binary:
            row.update(probability=round(float(agg), 6), label=label_for(float(agg)))
        else:
            probs = dict(zip(rs[0]["probabilities"], map(float, agg)))
            row.update(probabilities=probs, label=label_for(list(probs.values())))
        out.append(row)
    return out
