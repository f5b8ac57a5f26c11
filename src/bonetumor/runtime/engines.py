"""Inference engines: PyTorch, or an exported ONNX model run in ONNX Runtime or OpenVINO.

An exported model's runner stands behind the same call as a PyTorch module (an image batch
(N, 3, H, W) in, logits out), so every other step of inference is shared. ``Engine.AUTO``
picks OpenVINO on a CPU for large jobs, where exporting the checkpoint once pays for itself,
and PyTorch otherwise (``choose_engine``).
"""

from __future__ import annotations

import functools
import json
from enum import Enum
from importlib.util import find_spec
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from bonetumor.errors import BonetumorError, first_line

META_KEY = "bonetumor"
INSTALL_HINT = "ONNX export and inference need: pip install 'bonetumor[onnx]' (onnx, onnxruntime, onnxscript)"
OPENVINO_HINT = "predict --engine openvino needs: pip install 'bonetumor[openvino]' (openvino, and onnx, onnxruntime, onnxscript)"
# --engine auto runs a checkpoint in OpenVINO on a CPU from this many images on, when installed:
# exporting it costs seconds once (then cached), which OpenVINO's faster batches repay over
# about this many images (docs/performance.md).
AUTO_OPENVINO_MIN_IMAGES = 1000


class Engine(str, Enum):
    """What runs the model: PyTorch, ONNX Runtime (fp32) or OpenVINO (fp32, bf16); or auto."""

    AUTO = "auto"
    TORCH = "torch"
    ONNX = "onnx"
    OPENVINO = "openvino"

    @classmethod
    def parse(cls, value: "str | Engine") -> "Engine":
        try:
            return cls(str(value.value if isinstance(value, Engine) else value))
        except ValueError:
            raise BonetumorError(f"--engine must be auto, torch, onnx or openvino, not {value!r}") from None

    @property
    def exported(self) -> bool:
        """Whether the engine runs an exported ``.onnx`` file (on the CPU)."""
        return self in (Engine.ONNX, Engine.OPENVINO)


def choose_engine(device: torch.device, n_images: int, exported: bool = False) -> Engine:
    """``--engine auto``'s choice for a checkpoint: OpenVINO on a CPU when it is installed, for
    ``AUTO_OPENVINO_MIN_IMAGES`` images or more (where exporting pays for itself) or for any
    number when the checkpoint is ``exported`` already; else PyTorch."""
    worth = n_images >= AUTO_OPENVINO_MIN_IMAGES or exported
    return Engine.OPENVINO if device.type == "cpu" and worth and openvino_available() else Engine.TORCH


def require_onnx():
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

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        # An export with the out-of-distribution check has a second output: (logits, distances).
        out = self.session.run(None, {self.input_name: x.detach().float().cpu().contiguous().numpy()})
        return torch.from_numpy(out[0]) if len(out) == 1 else tuple(torch.from_numpy(o) for o in out[:2])


def onnx_session(path: Path, threads: int | None = None):
    _, ort = require_onnx()
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def openvino_available() -> bool:
    """Whether a checkpoint can be exported (onnx, onnxruntime, onnxscript) and run in OpenVINO."""
    return all(find_spec(m) is not None for m in ("onnx", "onnxruntime", "onnxscript", "openvino"))


def read_meta(path: str | Path) -> tuple[Path, dict]:
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
    threads. ``streams`` = 1 turns it off.

    ``submit`` starts a batch and returns what waits for its outputs, so that a caller can hand
    the next batch over before this one ends: OpenVINO's streams then go from one batch to the
    next with no pause for Python's work between them (``IN_FLIGHT`` batches at most).
    """

    input_memory_format = torch.contiguous_format  # what it hands the engine: no conversion

    def __init__(self, core, model, threads: int | None = None, streams: int | None = None, hint: str | None = None):
        """``hint``: the precision of the layers left in float, whatever the autocast (a quantised
        model's: fp32, its int8 layers being what makes it fast)."""
        super().__init__()
        self.core, self.ov_model, self.threads = core, model, threads
        self.streams, self.hint = streams, hint
        self._slots: dict[tuple[str, int], list[list]] = {}  # see ``_slot``

    IN_FLIGHT = 2

    def _slot(self, precision: str, n: int) -> list:
        """[infer requests for a batch of ``n``, one per part of it, each on its own stream; the
        input they share; batches started on it], the next of ``IN_FLIGHT`` such slots, its last
        batch waited for."""
        key = (precision, n)
        if key not in self._slots:
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
            self._slots[key] = [[[compiled.create_infer_request() for _ in range(parts)], None, 0]
                                for _ in range(self.IN_FLIGHT)]
        slots = self._slots[key]
        slots.append(slot := slots.pop(0))  # in turn
        for r in slot[0]:  # a batch a caller never waited for ends before its input is replaced
            r.wait()
        return slot

    def submit(self, x: torch.Tensor) -> Callable[[], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """Start ``x`` (in the precision ``forward`` would use) and return what waits for its
        outputs, as ``forward`` returns them."""
        slot = self._slot(self.hint or ("bf16" if _autocast_bf16() else "f32"), len(x))
        requests = slot[0]
        # Shared with OpenVINO, not copied: the slot keeps it alive until its requests end.
        slot[1] = data = np.ascontiguousarray(x.detach().float().cpu().numpy())
        slot[2] += 1
        started = slot[2]
        step = len(x) // len(requests)
        for i, request in enumerate(requests):
            request.start_async({0: data[i * step : (i + 1) * step]}, share_inputs=True)

        def outputs():
            if slot[2] != started:
                raise RuntimeError(f"a batch's outputs read after {self.IN_FLIGHT} later batches of its size started")
            for request in requests:
                request.wait()
            # An export with the out-of-distribution check has a second output: (logits, distances).
            out = [torch.from_numpy(np.concatenate([r.get_output_tensor(k).data for r in requests]))
                   for k in range(len(self.ov_model.outputs[:2]))]
            return out[0] if len(out) == 1 else (out[0], out[1])

        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.submit(x)()


@functools.lru_cache(maxsize=1)
def openvino_core():
    """The process's one OpenVINO Core, kept until exit. Each Core's CPU plugin points the
    calling thread's signal stack (sigaltstack) at memory of its own and, when destroyed, back at
    the stack it found: two Cores destroyed in the order they were made leave it pointing at
    freed memory, and the next signal Python handles (Ctrl-C, a DataLoader worker's SIGCHLD)
    kills the process with a segmentation fault (tested)."""
    import openvino as ov

    return ov.Core()


def load_runner(path: str | Path, engine: Engine, threads: int | None = None) -> tuple[nn.Module, dict]:
    """(runner, the bonetumor metadata) of an exported ``.onnx`` file for ONNX Runtime or OpenVINO.

    Raises:
        BonetumorError: missing packages, a missing file, or an ONNX file bonetumor did not write.
    """
    if engine is Engine.ONNX:
        require_onnx()
        p, meta = read_meta(path)
        return OnnxRunner(onnx_session(p, threads)), meta
    p, meta = read_meta(path)
    try:
        core = openvino_core()
    except ImportError:
        raise BonetumorError(OPENVINO_HINT) from None
    try:
        model = core.read_model(str(p))
    except Exception as e:  # noqa: BLE001 - OpenVINO's own error, as one line
        raise BonetumorError(f"{p}: OpenVINO cannot read it ({first_line(e, 160)})") from None
    return OpenVinoRunner(core, model, threads), meta
