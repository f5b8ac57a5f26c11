"""The one inference pipeline: read -> batch -> normalise -> engine and precision -> scores.

``evaluate``, ``predict``, ``explain``, ``serve`` and cross-validation all score images through
``score_batches``; training's validation and the feature cache run their loaders through the same
``runtime.forward.Forward``. A batch is read and resized with grey images kept as one channel
(a third of the work, and of what a worker process hands over), then moved to the device, made
three channels and normalised as ``create_transforms`` normalises in training.

A volume or series is explained (``explain``, ``serve``) through its highest-scoring slices:
``top_slices`` scores every slice of the study and keeps the decoded images of the best ``k``
meanwhile (never more than ``k`` plus a batch), so that no file is read twice and memory stays
bounded however many slices a study has.
"""

from __future__ import annotations

import heapq
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torchvision.transforms.v2.functional import normalize

from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import load_tensor
from bonetumor.data.studies import Sample
from bonetumor.data.transforms import create_resize
from bonetumor.errors import BadImageError, BonetumorError
from bonetumor.model.checkpoint import LoadedCheckpoint, load_checkpoint
from bonetumor.model.ood import flagged, inference_module
from bonetumor.progress import tracked
from bonetumor.runtime import distributed as ranks
from bonetumor.runtime.device import select_device, to_device
from bonetumor.runtime.engines import Engine
from bonetumor.runtime.forward import Forward
from bonetumor.task import Task

Batch = tuple[list[int], "torch.Tensor | None", list[dict]]  # (indices read, images, rows of unreadable files)
# (indices scored, logits, out-of-distribution distances, rows of unreadable files)
Scored = tuple[list[int], "torch.Tensor | None", "torch.Tensor | None", list[dict]]


@dataclass
class Predictions:
    """Model outputs over a loader, in its order: probs is P(positive) (N,) for a binary task,
    else (N, C); logits in the same shape."""

    task: Task
    probs: np.ndarray
    targets: np.ndarray
    indices: np.ndarray
    loss: float = float("nan")
    logits: np.ndarray | None = None
    distances: np.ndarray | None = None  # out-of-distribution distances (model/ood.py), when checked

    def accuracy(self, threshold: float = 0.5) -> float:
        pred = self.task.indices(self.probs, threshold)
        return float((pred == self.targets).mean()) if len(pred) else float("nan")


def open_model(path: str | Path, device: str = "auto", engine: str | Engine = Engine.TORCH,
               check: str = "now") -> tuple[LoadedCheckpoint, torch.device]:
    """(the model with its checkpoint's facts, the device it runs on) for ``engine``: torch (a
    .pt checkpoint), or onnx / openvino (an exported .onnx, or a checkpoint exported first, once,
    into the export cache), which run on the CPU. ``check``: as for ``load_checkpoint``."""
    engine = Engine.parse(engine)
    if Path(path).is_dir():  # a quantised model folder: it runs in OpenVINO alone
        from bonetumor.model.quantized import is_quantized, load_quantized

        if not is_quantized(path):
            raise BonetumorError(f"{path}: a folder, not a model; pass a checkpoint (.pt), an export (.onnx) or a "
                                 "folder written by bonetumor quantize")
        if engine is Engine.ONNX:
            raise BonetumorError(f"{path}: a quantised model runs in OpenVINO; pass --engine openvino (or auto)")
        return load_quantized(path), torch.device("cpu")
    if engine.exported:
        from bonetumor.model.export import cached_export, load_onnx, load_openvino

        load = load_onnx if engine is Engine.ONNX else load_openvino
        return load(path if str(path).lower().endswith(".onnx") else cached_export(path)), torch.device("cpu")
    if engine is not Engine.TORCH:
        raise BonetumorError("--engine auto is resolved before a model is opened")
    if str(path).lower().endswith(".onnx"):
        raise BonetumorError(f"{path}: an ONNX file; pass --engine onnx or --engine openvino")
    dev = ranks.local_device(select_device(device))  # under torchrun, this rank's GPU
    return load_checkpoint(path, dev, check), dev


def default_batch_size(device: torch.device) -> int:
    """Images per batch: 8 on a CPU (the fastest there), 64 on a GPU, where a small batch leaves
    it waiting for kernel launches (docs/performance.md)."""
    return 64 if device.type == "cuda" else 8


def default_workers(device: torch.device) -> int:
    """Worker processes decoding images: on a CUDA GPU up to 8, leaving two cores (one drives
    the GPU, one copies batches to it), as one core decodes far slower than a GPU predicts;
    none on a CPU, whose cores the model needs."""
    return max(1, min(8, (os.cpu_count() or 3) - 2)) if device.type == "cuda" else 0


def _decode(samples: Sequence[Sample], indices: Sequence[int], resize, options: ReadOptions, skip_bad: bool) -> Batch:
    """One batch read and resized: (indices read, the images stacked in [0, 1] with one channel
    when all are grey, or None, rows of unreadable files)."""
    done, xs, bad = [], [], []
    for i in indices:
        s = samples[i]
        try:
            xs.append(resize(load_tensor(s.path, s.frame, options, rgb=False)))
            done.append(i)
        except BadImageError as e:
            if not skip_bad:
                raise
            bad.append({"path": s.path, "slice": s.frame, "study": s.study, "error": e.problem})
    return done, stack_images(xs) if xs else None, bad


def stack_images(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Resized images as one batch, with one channel when all are grey."""
    channels = max(x.shape[0] for x in xs)
    return torch.stack([x.expand(channels, -1, -1) for x in xs])


class _Chunks(torch.utils.data.Dataset):
    """Batches as items, so DataLoader workers each decode whole batches."""

    def __init__(self, samples: Sequence[Sample], chunks: list, resize, options: ReadOptions):
        self.samples, self.chunks, self.resize, self.options = samples, chunks, resize, options

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, i: int) -> Batch:
        # Unreadable files come back as rows: the caller raises for the first, or keeps them.
        return _decode(self.samples, self.chunks[i], self.resize, self.options, True)


def read_batches(samples: Sequence[Sample], batch_size: int, image_size: int, options: ReadOptions,
                 skip_bad: bool = False, workers: int = 0, prefetch: bool = False,
                 pin_memory: bool = False) -> Iterator[Batch]:
    """``samples`` read, resized and stacked, a batch at a time, in order. ``workers`` > 0:
    decoded in that many processes (a DataLoader, batches in order); else, with ``prefetch``,
    the next batch is read in a background thread while the caller runs the model on this one.
    On a CPU only the exported-model engines prefetch: PyTorch's own threads lose more to a
    third thread taking a core than the overlap gains (docs/performance.md)."""
    resize = create_resize(image_size)
    chunks = [list(range(start, min(start + batch_size, len(samples)))) for start in range(0, len(samples), batch_size)]
    if workers > 0 and len(chunks) > 1:
        loader = torch.utils.data.DataLoader(_Chunks(samples, chunks, resize, options), batch_size=None, shuffle=False,
                                             num_workers=min(workers, len(chunks)), pin_memory=pin_memory)
        for done, x, bad in loader:
            if bad and not skip_bad:
                raise BadImageError(bad[0]["path"], bad[0]["error"])
            yield done, x, bad
        return
    if not prefetch or len(chunks) < 2:
        for chunk in chunks:
            yield _decode(samples, chunk, resize, options, skip_bad)
        return
    # One batch ahead only (Executor.map would read them all at once).
    with ThreadPoolExecutor(1, thread_name_prefix="bonetumor-decode") as pool:
        pending = pool.submit(_decode, samples, chunks[0], resize, options, skip_bad)
        for following in chunks[1:] + [None]:
            batch = pending.result()
            if following is not None:
                pending = pool.submit(_decode, samples, following, resize, options, skip_bad)
            yield batch


def model_input(x: torch.Tensor, device: torch.device, mean, std,
                memory_format: torch.memory_format = torch.channels_last) -> torch.Tensor:
    """A batch from ``read_batches`` on ``device``, three channels, normalised as
    ``create_transforms`` normalises in training, in ``memory_format`` (channels_last for
    PyTorch's convolutions; the exported-model engines take plain NCHW)."""
    x = x.to(device, non_blocking=True)
    x = normalize(x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x, list(mean), list(std))
    return x.contiguous(memory_format=memory_format)


def score_batches(ck: LoadedCheckpoint, samples: Sequence[Sample], device: torch.device, batch_size: int = 8,
                  precision: str | None = None, run: Callable | None = None, skip_bad: bool = False, workers: int = 0,
                  prefetch: bool = False, options: ReadOptions | None = None,
                  what: str | None = None) -> Iterator[Scored]:
    """The model's logits for ``samples``, a batch at a time: (indices scored, their logits
    (N, outputs) on the CPU, or None, their out-of-distribution distances (N,) or None for a
    model without the check, rows of unreadable files). ``precision``: None (the
    model's own on this device, ``LoadedCheckpoint.precision_on``) or one to force; ``run``: the
    model's compiled form, if any; ``options``: how to read the files (default: as the model's
    training read its own); ``what``: the label of a progress line (none without)."""
    memory_format = getattr(ck.model, "input_memory_format", torch.channels_last)
    batches = read_batches(samples, batch_size, ck.image_size, options or ck.read_options, skip_bad, workers, prefetch,
                           pin_memory=device.type == "cuda")
    batches = tracked(batches, len(samples), what or "", size=lambda b: len(b[0]) + len(b[2]), enabled=bool(what))
    pending: deque = deque()  # one batch ahead: an engine that runs it meanwhile does (``Forward.submit``)
    with Forward(ck.model, device, precision or ck.precision_on(device), run or inference_module(ck.model),
                 ck.task.probabilities, wrapped=run is None) as forward:
        for done, x, bad in batches:
            pending.append((done, None if x is None else forward.submit(model_input(x, device, ck.mean, ck.std,
                                                                                      memory_format)), bad))
            if len(pending) > 1:
                yield _finished(*pending.popleft(), bool(ck.ood))
        while pending:
            yield _finished(*pending.popleft(), bool(ck.ood))


def _finished(done: list[int], outputs: Callable | None, bad: list[dict], ood: bool) -> Scored:
    if outputs is None:
        return done, None, None, bad
    logits, distances = outputs()
    return done, logits.cpu(), distances.cpu() if distances is not None and ood else None, bad


def prediction_rows(ck: LoadedCheckpoint, samples: Sequence[Sample], probs: torch.Tensor,
                    distances: torch.Tensor | None = None) -> list[dict]:
    """A row per sample: path, slice, study, its probability (or class probabilities) and label;
    with the model's out-of-distribution check, its distance and whether it is unlike the
    training data."""
    rows = []
    far = flagged(distances.numpy() if distances is not None else None, ck.ood)
    for i, (s, p) in enumerate(zip(samples, probs.tolist())):
        row = {"path": s.path, "slice": s.frame, "study": s.study, **ck.task.probability_fields(p, digits=6),
               "label": ck.label_for(p)}
        if ck.task.binary:
            row["threshold"] = ck.threshold
        if far is not None:
            row["ood_distance"] = round(float(distances[i]), 3)
            row["unlike_training"] = bool(far[i])
        rows.append(row)
    return rows


def score_samples(ck: LoadedCheckpoint, samples: Sequence[Sample], device: torch.device, batch_size: int = 8,
                  precision: str | None = None, run: Callable | None = None, skip_bad: bool = False, workers: int = 0,
                  prefetch: bool = False, options: ReadOptions | None = None,
                  what: str | None = None) -> list[dict]:
    """``prediction_rows`` for ``samples`` in their order, with a row naming each unreadable
    file (``skip_bad``) where it stood (see ``score_batches`` for the arguments). Under
    torchrun each rank scores its share (``rank::world``) and every rank gets all the rows."""
    ids = list(ranks.shard(len(samples)))
    mine = samples if len(ids) == len(samples) else [samples[i] for i in ids]
    rows: list[dict | None] = [None] * len(mine)
    start = 0  # batches cover consecutive samples: the unreadable ones are those not scored
    with ranks.together():  # an unreadable file on one rank stops them all, with its line once
        for done, logits, distances, bad in score_batches(ck, mine, device, batch_size, precision, run, skip_bad,
                                                          workers, prefetch, options, what):
            end = start + len(done) + len(bad)
            scored = set(done)
            for i, row in zip((i for i in range(start, end) if i not in scored), bad):
                rows[i] = row
            if logits is not None:
                for i, row in zip(done, prediction_rows(ck, [mine[i] for i in done], ck.task.probabilities(logits),
                                                        distances)):
                    rows[i] = row
            start = end
    return ranks.gather_in_order(ids, rows) if ranks.world_size() > 1 else rows


def predict_samples(ck: LoadedCheckpoint, samples: Sequence[Sample], device: torch.device, batch_size: int,
                    workers: int = 0, what: str | None = None) -> Predictions:
    """The model's probabilities (at its own precision) for labelled ``samples``, in their order,
    with their targets."""
    index = {c: i for i, c in enumerate(ck.classes)}
    if ranks.world_size() > 1:  # under torchrun: each rank its share, every rank all of them, in order
        ids = list(ranks.shard(len(samples)))
        with ranks.together():
            part = list(score_batches(ck, [samples[i] for i in ids], device, batch_size, workers=workers,
                                      what=what if ranks.is_main() else None))
        mine = [(x[k:k + 1], None if d is None else d[k:k + 1]) for _, x, d, _ in part for k in range(len(x))]
        scored = [([], x, d, []) for x, d in ranks.gather_in_order(ids, mine)]
    else:
        scored = list(score_batches(ck, samples, device, batch_size, workers=workers, what=what))
    out = torch.cat([x for _, x, _, _ in scored]) if scored else torch.zeros(0, ck.task.n_outputs)
    distances = [d for _, _, d, _ in scored]
    return Predictions(ck.task, ck.task.probabilities(out).numpy(), np.array([index[s.label] for s in samples], dtype=int),
                       np.arange(len(samples)), logits=ck.task.scores(out).numpy(),
                       distances=torch.cat(distances).numpy() if scored and distances[0] is not None else None)


@torch.inference_mode()
def score_loader(forward: Forward, loader, task: Task, loss_fn=None) -> Predictions:
    """``forward`` over every (inputs, targets, indices) batch of ``loader`` (already
    transformed images, or cached features); the mean loss too, when ``loss_fn`` is given."""
    probs, targets, indices, raw, total = [], [], [], [], 0.0
    for x, y, idx in loader:
        logits = forward(to_device(x, forward.device))
        if loss_fn is not None:
            total += loss_fn(logits, task.loss_target(logits, y.to(forward.device))).item() * len(y)
        probs.append(task.probabilities(logits).cpu().numpy())
        raw.append(task.scores(logits).cpu().numpy())
        targets.append(y.numpy())
        indices.append(np.asarray(idx))
    n = sum(len(t) for t in targets)
    cat = (lambda a: np.concatenate(a) if a else np.zeros(0))  # noqa: E731
    return Predictions(task, cat(probs), cat(targets).astype(int), cat(indices).astype(int),
                       total / n if n else float("nan"), cat(raw))


Decoded = tuple[Sample, torch.Tensor]  # a slice and its image as read (C x H x W, C = 1 or 3)


def model_batch(ck: LoadedCheckpoint, images: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    """Decoded images (any size, one or three channels) as the model's input batch on ``device``:
    resized, three channels, normalised."""
    resize = create_resize(ck.image_size)
    return model_input(stack_images([resize(im) for im in images]), device, ck.mean, ck.std)


def explained_batches(ck: LoadedCheckpoint, samples: Sequence[Sample], k: int, device: torch.device,
                      batch_size: int) -> Iterator[tuple[int, list[Decoded], torch.Tensor]]:
    """``explained_images`` a batch at a time: (index of its first image, the images with their
    slices, the model's input batch)."""
    chunk, start = [], 0
    for item in explained_images(ck, samples, k, device, batch_size):
        chunk.append(item)
        if len(chunk) == batch_size:
            yield start, chunk, model_batch(ck, [image for _, image in chunk], device)
            start, chunk = start + batch_size, []
    if chunk:
        yield start, chunk, model_batch(ck, [image for _, image in chunk], device)


def explained_images(ck: LoadedCheckpoint, samples: Sequence[Sample], k: int, device: torch.device,
                     batch_size: int) -> Iterator[Decoded]:
    """Every 2-D image of ``samples`` and, of each study with more than ``k`` slices, its ``k``
    highest-scoring slices, in the order of ``samples``, each with its decoded image."""
    for unit in image_units(samples):
        if unit[0].study is None or len(unit) <= k:
            for s in unit:
                yield s, load_tensor(s.path, s.frame, ck.read_options, rgb=False)
        else:
            yield from top_slices(ck, unit, k, device, batch_size)[0]


def image_units(samples: Sequence[Sample]) -> list[list[Sample]]:
    """``samples`` as ``explained_images`` takes them: each 2-D image alone, and each volume or
    series (its consecutive slices) whole."""
    units: list[list[Sample]] = []
    for study, group in groupby(samples, key=lambda s: s.study):
        units += [[s] for s in group] if study is None else [list(group)]
    return units


def top_slices(ck: LoadedCheckpoint, slices: Sequence[Sample], k: int, device: torch.device,
               batch_size: int, before_batch: Callable[[], None] | None = None
               ) -> tuple[list[Decoded], torch.Tensor, torch.Tensor | None]:
    """(the ``k`` highest-scoring of one study's ``slices``, in slice order, with their decoded
    images; the probabilities of every slice; their out-of-distribution distances, or None for
    a model without the check). Ties keep the earlier slice. ``before_batch`` may raise to stop
    the work (the server's time limit)."""
    best: list[tuple[float, int, torch.Tensor]] = []  # a heap of (score, -position, image): the worst on top
    probs: list[torch.Tensor] = []
    distances: list[torch.Tensor] = []
    with Forward(ck.model, device, ck.precision_on(device), inference_module(ck.model), wrapped=True) as forward:
        for start in range(0, len(slices), batch_size):
            if before_batch is not None:
                before_batch()
            images = [load_tensor(s.path, s.frame, ck.read_options, rgb=False) for s in slices[start:start + batch_size]]
            probs.append(ck.task.probabilities(forward(model_batch(ck, images, device))).cpu())
            if forward.distances is not None:
                distances.append(forward.distances.cpu())
            for j, (image, p) in enumerate(zip(images, probs[-1])):
                heapq.heappush(best, (ck.task.ranking_score(p), -(start + j), image))
                if len(best) > k:
                    heapq.heappop(best)
    kept = sorted(best, key=lambda item: -item[1])
    return ([(slices[-position], image) for _, position, image in kept], torch.cat(probs),
            torch.cat(distances) if distances else None)
