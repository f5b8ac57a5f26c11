"""Which images to explain, each decoded once: every 2-D image, and each study's best slices.

A volume or series is explained through its ``k`` highest-scoring slices. They are found by
scoring every slice of the study through the inference pipeline; the decoded images of the
current best ``k`` are kept meanwhile (never more than ``k`` plus a batch), so that no file is
read twice and memory stays bounded however many slices a study has.
"""

from __future__ import annotations

import heapq
from itertools import groupby
from typing import Iterator, Sequence

import torch

from bonetumor.data.readers import load_tensor
from bonetumor.data.samples import Sample
from bonetumor.data.transforms import create_resize
from bonetumor.inference import model_input, prediction_rows, stack_images
from bonetumor.model.checkpoint import LoadedCheckpoint
from bonetumor.runtime.forward import Forward

Decoded = tuple[Sample, torch.Tensor]  # a slice and its image as read (C x H x W, C = 1 or 3)


def explained_images(ck: LoadedCheckpoint, samples: Sequence[Sample], k: int, device: torch.device,
                     batch_size: int) -> Iterator[Decoded]:
    """Every 2-D image of ``samples`` and, of each study with more than ``k`` slices, its ``k``
    highest-scoring slices, in the order of ``samples``, each with its decoded image."""
    for study, run in groupby(samples, key=lambda s: s.study):
        group = list(run)
        if study is None or len(group) <= k:
            for s in group:
                yield s, load_tensor(s.path, s.frame, ck.read_options, rgb=False)
        else:
            yield from top_slices(ck, group, k, device, batch_size)[0]


def top_slices(ck: LoadedCheckpoint, slices: Sequence[Sample], k: int, device: torch.device,
               batch_size: int) -> tuple[list[Decoded], list[dict]]:
    """(the ``k`` highest-scoring of one study's ``slices``, in slice order, with their decoded
    images; every slice's prediction row). Ties keep the earlier slice."""
    resize = create_resize(ck.image_size)
    best: list[tuple[float, int, torch.Tensor]] = []  # a heap of (score, -position, image): the worst on top
    rows: list[dict] = []
    with Forward(ck.model, device, "fp32") as forward:
        for start in range(0, len(slices), batch_size):
            chunk = slices[start:start + batch_size]
            images = [load_tensor(s.path, s.frame, ck.read_options, rgb=False) for s in chunk]
            x = model_input(stack_images([resize(im) for im in images]), device, ck.mean, ck.std)
            probs = ck.task.probabilities(forward(x)).cpu()
            rows += prediction_rows(ck, chunk, probs)
            for j, (image, p) in enumerate(zip(images, probs)):
                heapq.heappush(best, (ck.task.ranking_score(p), -(start + j), image))
                if len(best) > k:
                    heapq.heappop(best)
    kept = sorted(best, key=lambda item: -item[1])
    return [(slices[-position], image) for _, position, image in kept], rows
