"""ONNX export, and inference on the exported file in ONNX Runtime or OpenVINO.

``export_onnx`` writes one self-contained ``.onnx`` file (weights inside, a dynamic batch axis)
whose metadata holds what prediction needs besides the graph: classes, threshold, image size,
normalisation and the run's config (window, slice axis). The temperature, if fitted, is part of
the graph. Every export is checked against PyTorch on a batch before it is kept.
``load_onnx`` returns the same ``LoadedCheckpoint`` that ``load_checkpoint`` does, its model
running in ONNX Runtime, so ``predict --engine onnx`` shares every other step with PyTorch;
``load_openvino`` the same with OpenVINO (``predict --engine openvino``), which on a 2-core
Zen 4 CPU ran ResNet50 at about the hardware's limit in fp32 and bf16 (benchmarks/onnx_inference.py),
where PyTorch reaches 70-90% of it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch
from torch import nn

from bonetumor.checkpoint import LoadedCheckpoint, load_checkpoint
from bonetumor.config import config_from_dict, config_to_dict
from bonetumor.errors import BonetumorError, first_line
from bonetumor.utils import atomic_path

META_KEY = "bonetumor"
INSTALL_HINT = "ONNX export and inference need: pip install 'bonetumor[onnx]' (onnx, onnxruntime, onnxscript)"
OPENVINO_HINT = "predict --engine openvino needs: pip install 'bonetumor[openvino]' (openvino, and onnx, onnxruntime, onnxscript)"


def _require():
    try:
        import onnx
        import onnxruntime
    except ImportError:
        raise BonetumorError(INSTALL_HINT) from None
    return onnx, onnxruntime


class OnnxRunner(nn.Module):
    """An ONNX Runtime session behind the nn.Module call: image batch (N, 3, H, W) -> logits."""

    input_memory_format = torch.contiguous_format  # what it hands the engine: no conversion

    def __init__(self, session):
        super().__init__()
        self.session = session
        self.input_name = session.get_inputs()[0].name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def _session(path: Path, threads: int | None = None):
    _, ort = _require()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def export_onnx(checkpoint: str | Path, out: str | Path, overwrite: bool = False, tolerance: float = 1e-4) -> dict:
    """Export a checkpoint to ``out`` (.onnx) and check ONNX Runtime against PyTorch.

    Returns:
        {"path", "max_abs_diff_probability", "max_abs_diff_logit", "bytes"}.

    Raises:
        BonetumorError: missing packages, an existing ``out`` without ``overwrite``, or an export
            whose probabilities differ from PyTorch's by more than ``tolerance``.
    """
    onnx, _ = _require()
    out = Path(out)
    if out.exists() and not overwrite:
        raise BonetumorError(f"{out} already exists; pass --overwrite to replace it")
    ck = load_checkpoint(checkpoint, "cpu")
    model = ck.model.eval()
    size = ck.image_size
    example = torch.randn(2, 3, size, size)
    meta = {"format": "bonetumor-onnx", "classes": ck.classes, "threshold": ck.threshold, "image_size": size,
            "mean": list(ck.mean), "std": list(ck.std), "epoch": ck.epoch, "temperature": float(model.temperature),
            "config": config_to_dict(ck.config)}
    with atomic_path(out) as tmp:
        staged = tmp.with_name(tmp.name + ".onnx")  # the exporter wants an .onnx name
        try:
            torch.onnx.export(model, (example,), str(staged), input_names=["image"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch", min=1)},), dynamo=True,
                              external_data=False, verbose=False)
            graph = onnx.load(str(staged))
        finally:
            staged.unlink(missing_ok=True)
        entry = graph.metadata_props.add()
        entry.key, entry.value = META_KEY, json.dumps(meta)
        onnx.save(graph, str(tmp))
        diff = _verify(model, tmp, size)
        if diff["max_abs_diff_probability"] > tolerance:
            raise BonetumorError(f"{out}: ONNX Runtime differs from PyTorch by {diff['max_abs_diff_probability']:.2e} "
                                 f"in probability (limit {tolerance:g}); not written")
    return {"path": str(out), **diff, "bytes": out.stat().st_size}


EXPORT_FORMAT = 1  # part of the cache key: a change to what export writes makes new files
CACHE_KEEP = 5  # exports kept in the cache (about 95 MB each for ResNet50), the most recently used


def openvino_available() -> bool:
    """Whether a checkpoint can be exported (onnx, onnxruntime, onnxscript) and run in OpenVINO."""
    return all(find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript", "openvino"))


def export_cache_dir() -> Path:
    """Where checkpoints exported on the way to an engine are kept: ``$BONETUMOR_CACHE_DIR``,
    else ``$XDG_CACHE_HOME/bonetumor/exports`` (``~/.cache/bonetumor/exports``)."""
    if os.environ.get("BONETUMOR_CACHE_DIR"):
        return Path(os.environ["BONETUMOR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "bonetumor" / "exports"


def cached_export_path(checkpoint: str | Path) -> Path:
    """Where ``cached_export`` keeps ``checkpoint``'s export (whether or not it is there yet)."""
    if not Path(checkpoint).is_file():
        raise BonetumorError(f"{checkpoint}: file not found")
    st = os.stat(checkpoint)
    return export_cache_dir() / f"{_digest(str(Path(checkpoint).resolve()), st.st_mtime_ns, st.st_size)}.onnx"


@functools.lru_cache(maxsize=8)
def _digest(path: str, mtime_ns: int, size: int) -> str:
    """A hash of the checkpoint's bytes (0.06 s for ResNet50), once per file version."""
    digest = hashlib.sha256(f"bonetumor-onnx-{EXPORT_FORMAT}".encode())
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:32]


def cached_export(checkpoint: str | Path) -> Path:
    """``checkpoint`` exported to ONNX once (``export_onnx``, about 7 s for ResNet50), kept in
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
    """Largest logit and probability differences, PyTorch vs ONNX Runtime, on 4 random images."""
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(0))
    ref = model(x).float()
    got = OnnxRunner(_session(path))(x)
    prob = (lambda t: torch.sigmoid(t) if t.shape[1] == 1 else torch.softmax(t, 1))  # noqa: E731
    return {"max_abs_diff_logit": float((ref - got).abs().max()),
            "max_abs_diff_probability": float((prob(ref) - prob(got)).abs().max())}


def _read_meta(path: str | Path) -> tuple[Path, dict]:
    """The bonetumor metadata of an exported ``.onnx`` file (BonetumorError if it has none)."""
    try:
        import onnx
    except ImportError:
        raise BonetumorError(INSTALL_HINT) from None
    p = Path(path)
    if not p.is_file():
        raise BonetumorError(f"{p}: file not found")
    try:
        meta_props = {m.key: m.value for m in onnx.load(str(p), load_external_data=False).metadata_props}
        return p, json.loads(meta_props[META_KEY])
    except KeyError:
        raise BonetumorError(f"{p}: not an ONNX model exported by bonetumor (no metadata); use bonetumor export") from None
    except Exception as e:  # noqa: BLE001 - any parse failure of a foreign file is one line
        raise BonetumorError(f"{p}: not a readable ONNX file ({first_line(e, 120)})") from None


def _loaded(runner: nn.Module, meta: dict) -> LoadedCheckpoint:
    return LoadedCheckpoint(runner, config_from_dict(meta["config"]), list(meta["classes"]), int(meta["image_size"]),
                            tuple(meta["mean"]), tuple(meta["std"]), float(meta["threshold"]), int(meta.get("epoch", 0)),
                            meta)


def load_onnx(path: str | Path, threads: int | None = None) -> LoadedCheckpoint:
    """Load an exported model for inference in ONNX Runtime (CPU), as a LoadedCheckpoint.

    Raises:
        BonetumorError: missing packages, a missing file, or an ONNX file bonetumor did not write.
    """
    _require()
    p, meta = _read_meta(path)
    return _loaded(OnnxRunner(_session(p, threads)), meta)


def _autocast_bf16() -> bool:
    try:
        return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    except TypeError:  # torch < 2.4
        return torch.is_autocast_cpu_enabled() and torch.get_autocast_cpu_dtype() == torch.bfloat16


class OpenVinoRunner(nn.Module):
    """An OpenVINO model behind the nn.Module call: image batch (N, 3, H, W) -> logits.

    It runs in bf16 when called inside a CPU bf16 autocast (as predict's ``--precision`` runs
    PyTorch), else in fp32, so the precision choice and its check work as for PyTorch. Each
    (precision, batch size) is compiled once, on first use: a fixed shape is faster than a
    dynamic one, and OpenVINO compiles ResNet50 in a fraction of a second.

    An even batch runs as two halves at once, on two OpenVINO streams (each with half the
    threads), when there are at least two threads, so that no layer waits for the slower of two
    threads. On 2 cores, ResNet50 in bf16 at batch 8: 1.01-1.05x as fast as one request on both
    threads in one comparison, 0.97-1.03x in benchmarks/onnx_inference.py; ``predict`` over
    1,000 PNGs 1.01-1.06x. ``streams`` = 1 turns it off.
    """

    input_memory_format = torch.contiguous_format  # what it hands the engine: no conversion

    def __init__(self, core, model, threads: int | None = None, streams: int | None = None):
        super().__init__()
        self.core, self.ov_model, self.threads = core, model, threads
        self.streams = streams
        self._requests: dict[tuple[str, int], list] = {}

    def _request(self, precision: str, n: int) -> list:
        """The infer requests for a batch of ``n``: one per part of it, on its own stream."""
        key = (precision, n)
        if key not in self._requests:
            threads = self.threads or torch.get_num_threads()
            streams = self.streams if self.streams is not None else min(2, threads)
            parts = streams if streams > 1 and n % streams == 0 else 1
            model = self.ov_model.clone()
            shape = model.inputs[0].get_partial_shape()
            shape[0] = n // parts
            model.reshape({model.inputs[0]: shape})
            options = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads}
            options.update({"PERFORMANCE_HINT": "LATENCY"} if parts == 1 else
                           {"PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": parts})
            compiled = self.core.compile_model(model, "CPU", options)
            self._requests[key] = [compiled.create_infer_request() for _ in range(parts)]
        return self._requests[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        requests = self._request("bf16" if _autocast_bf16() else "f32", len(x))
        data = x.detach().float().cpu().contiguous().numpy()
        if len(requests) == 1:
            requests[0].infer({0: data})
            return torch.from_numpy(requests[0].get_output_tensor(0).data.copy())
        step = len(x) // len(requests)
        for i, request in enumerate(requests):
            request.start_async({0: data[i * step : (i + 1) * step]})
        for request in requests:
            request.wait()
        return torch.from_numpy(np.concatenate([r.get_output_tensor(0).data for r in requests]))


@functools.lru_cache(maxsize=1)
def _openvino_core():
    """The process's one OpenVINO Core, kept until exit. Each Core's CPU plugin points the
    calling thread's signal stack (sigaltstack) at memory of its own and, when destroyed, back at
    the stack it found: two Cores destroyed in the order they were made leave it pointing at
    freed memory, and the next signal Python handles (Ctrl-C, a DataLoader worker's SIGCHLD)
    kills the process with a segmentation fault (tested)."""
    import openvino as ov

    return ov.Core()


def load_openvino(path: str | Path, threads: int | None = None) -> LoadedCheckpoint:
    """Load an exported ``.onnx`` model for inference in OpenVINO (CPU), as a LoadedCheckpoint.

    Raises:
        BonetumorError: missing packages, a missing file, or an ONNX file bonetumor did not write.
    """
    p, meta = _read_meta(path)
    try:
        core = _openvino_core()
    except ImportError:
        raise BonetumorError(OPENVINO_HINT) from None
    try:
        model = core.read_model(str(p))
    except Exception as e:  # noqa: BLE001 - OpenVINO's own error, as one line
        raise BonetumorError(f"{p}: OpenVINO cannot read it ({first_line(e, 160)})") from None
    return _loaded(OpenVinoRunner(core, model, threads), meta)
