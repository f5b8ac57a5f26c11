"""ONNX export of a checkpoint, checked against PyTorch, and the cache of exports made on the way.

``export_onnx`` writes one self-contained ``.onnx`` file (weights inside, a dynamic batch axis)
whose metadata holds what prediction needs besides the graph: classes, threshold, image size,
normalisation and the run's config (window, slice axis). The temperature, if fitted, is part of
the graph. Every export is checked against PyTorch on a batch before it is kept.
``load_onnx`` and ``load_openvino`` return the same ``LoadedCheckpoint`` that ``load_checkpoint``
does, its model running in ONNX Runtime or OpenVINO (runtime/engines.py), so prediction shares
every other step with PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn

from bonetumor.config import config_from_dict, config_to_dict
from bonetumor.errors import BonetumorError
from bonetumor.files import atomic_path, refuse_existing_file
from bonetumor.model.checkpoint import LoadedCheckpoint, load_checkpoint
from bonetumor.model.ood import inference_module
from bonetumor.model.serialization import check_seal, file_seal
from bonetumor.runtime.engines import (
    META_KEY,
    Engine,
    OnnxRunner,
    load_runner,
    onnx_session,
    require_onnx,
)


def export_onnx(checkpoint: str | Path, out: str | Path, overwrite: bool = False, tolerance: float = 1e-4) -> dict:
    """Export a checkpoint to ``out`` (.onnx) and check ONNX Runtime against PyTorch.

    Returns:
        {"path", "max_abs_diff_probability", "max_abs_diff_logit", "bytes"}.

    Raises:
        BonetumorError: missing packages, an existing ``out`` without ``overwrite``, or an export
            whose probabilities differ from PyTorch's by more than ``tolerance``.
    """
    onnx, _ = require_onnx()
    out = Path(out)
    refuse_existing_file(out, overwrite, inputs=[checkpoint])
    ck = load_checkpoint(checkpoint, "cpu")
    model = ck.model.eval()
    size = ck.image_size
    example = torch.randn(2, 3, size, size)
    meta = {"format": "bonetumor-onnx", "classes": ck.classes, "threshold": ck.threshold, "image_size": size,
            "mean": list(ck.mean), "std": list(ck.std), "epoch": ck.epoch, "temperature": float(model.temperature),
            "config": config_to_dict(ck.config), "ood": ck.ood}
    # With the out-of-distribution check, the graph's second output is each image's distance.
    graph_model = inference_module(model).eval()
    outputs = ["logits", "ood_distance"] if graph_model is not model else ["logits"]
    with atomic_path(out) as tmp:
        staged = tmp.with_name(tmp.name + ".onnx")  # the exporter wants an .onnx name
        try:
            torch.onnx.export(graph_model, (example,), str(staged), input_names=["image"], output_names=outputs,
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                              external_data=False, verbose=False)
            graph = onnx.load(str(staged))
        finally:
            staged.unlink(missing_ok=True)
        entry = graph.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        onnx.save(graph, str(tmp))
        diff = _verify(graph_model, tmp, size)
        if diff["max_abs_diff_probability"] > tolerance:
            raise BonetumorError(f"{out}: ONNX Runtime differs from PyTorch by {diff['max_abs_diff_probability']:.2e} "
                                 f"in probability (limit {tolerance:g}); not written")
    return {"path": str(out), **diff, "bytes": out.stat().st_size}


EXPORT_FORMAT = 2  # part of the cache key: a change to what export writes makes new files
CACHE_KEEP = 5  # exports kept in the cache (about 95 MB each for ResNet50), the most recently used


def export_cache_dir() -> Path:
    """Where checkpoints exported on the way to an engine are kept: ``$BONETUMOR_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/bonetumor/exports`` (``~/.cache/bonetumor/exports``)."""
    if os.environ.get("BONETUMOR_CACHE_DIR"):
        return Path(os.environ["BONETUMOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bonetumor" / "exports"


def has_cached_export(checkpoint: str | Path) -> bool:
    """Whether ``checkpoint`` has an export in the cache; answered without reading it when the
    cache holds no export at all."""
    folder = export_cache_dir()
    if not folder.is_dir() or not any(folder.glob("*.onnx")):
        return False
    return cached_export_path(checkpoint).exists()


def cached_export_path(checkpoint: str | Path) -> Path:
    """Where ``cached_export`` keeps ``checkpoint``'s export (whether or not it is there yet)."""
    if not Path(checkpoint).is_file():
        raise BonetumorError(f"{checkpoint}: file not found")
    st = os.stat(checkpoint)
    return export_cache_dir() / f"{_digest(str(Path(checkpoint).resolve()), st.st_mtime_ns, st.st_size)}.onnx"


@functools.lru_cache(maxsize=8)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """A hash of what the export is made of, once per file version: the checksum a checkpoint
    carries (of all its bytes), else the whole file's bytes."""
    digest = hashlib.sha256(f"bonetumor-onnx-{EXPORT_FORMAT}".encode())
    seal = file_seal(path)
    if seal is not None:
        check_seal(path, seal)  # an altered checkpoint must not reach a cached export of the original
        digest.update(seal.encode())
    else:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:32]


def cached_export(checkpoint: str | Path) -> Path:
    """``checkpoint`` exported to ONNX once (``export_onnx``, seconds for ResNet50), kept in
    ``export_cache_dir()`` under a hash of its bytes, and reused by later calls; only the
    ``CACHE_KEEP`` most recently used exports are kept."""
    path = cached_export_path(checkpoint)
    folder = path.parent
    if path.exists():
        path.touch()  # most recently used
        return path
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BonetumorError(f"{folder}: cannot create the export cache ({e.strerror}); set BONETUMOR_CACHE_DIR "
                             "to a writable folder") from None
    export_onnx(checkpoint, path, overwrite=True)  # atomic: another process may have written it meanwhile
    old = sorted(folder.glob("*.onnx"), key=lambda q: q.stat().st_mtime, reverse=True)[CACHE_KEEP:]
    for q in old:
        q.unlink(missing_ok=True)
    return path



@torch.inference_mode()
def _verify(model: nn.Module, path: Path, size: int) -> dict:
    """Largest logit and probability differences (and relative difference of the
    out-of-distribution distances), PyTorch vs ONNX Runtime, on 4 random images."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref, got = model(x), OnnxRunner(onnx_session(path))(x)
    diff = {}
    if isinstance(ref, tuple):
        diff["max_rel_diff_ood_distance"] = float(((ref[1] - got[1]).abs() / ref[1].abs().clamp_min(1e-6)).max())
        ref, got = ref[0], got[0]
    ref = ref.float()
    prob = (lambda t: torch.sigmoid(t) if t.shape[1] == 1 else torch.softmax(t, 1))  # noqa: E731
    return {"max_abs_diff_logit": float((ref - got).abs().max()),
            "max_abs_diff_probability": float((prob(ref) - prob(got)).abs().max()), **diff}


def loaded_checkpoint(runner: nn.Module, meta: dict) -> LoadedCheckpoint:
    """An engine's runner with the facts of its metadata (an export's or a quantised folder's)."""
    return LoadedCheckpoint(runner, config_from_dict(meta["config"]), list(meta["classes"]), int(meta["image_size"]),
                            tuple(meta["mean"]), tuple(meta["std"]), float(meta["threshold"]), int(meta.get("epoch", 0)),
                            meta)


def load_onnx(path: str | Path, threads: int | None = None) -> LoadedCheckpoint:
    """An exported model for inference in ONNX Runtime (CPU), as a LoadedCheckpoint.

    Raises:
        BonetumorError: missing packages, a missing file, or an ONNX file bonetumor did not write.
    """
    return loaded_checkpoint(*load_runner(path, Engine.ONNX, threads))


def load_openvino(path: str | Path, threads: int | None = None) -> LoadedCheckpoint:
    """An exported ``.onnx`` model for inference in OpenVINO (CPU), as a LoadedCheckpoint.

    Raises:
        BonetumorError: missing packages, a missing file, or an ONNX file bonetumor did not write.
    """
    return loaded_checkpoint(*load_runner(path, Engine.OPENVINO, threads))
