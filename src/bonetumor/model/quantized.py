"""A quantised model folder (``bonetumor quantize``, quantize.py): what it holds, its checks, and
loading it for inference in OpenVINO.

The folder holds OpenVINO's IR (``model.xml``, ``model.bin``) and ``quantized.json``: the
checkpoint's facts (classes, threshold, preprocessing, config), the quantisation's record and
the checksums of both model files, so that an altered file is refused rather than run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from bonetumor.errors import BonetumorError, first_line

QUANTIZED_FORMAT = "bonetumor-openvino-int8"
MODEL_XML, MODEL_BIN, META = "model.xml", "model.bin", "quantized.json"


def is_quantized(path: str | Path) -> bool:
    """Whether ``path`` is a folder ``quantize_checkpoint`` wrote."""
    return Path(path).is_dir() and (Path(path) / META).is_file()


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def read_quantized(folder: str | Path) -> dict:
    """The record of a quantised model folder, its files checked against their checksums.

    Raises:
        BonetumorError: not such a folder, or a file missing or altered since it was written.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BonetumorError(f"{folder}: not a quantised model folder (no {META}); make one with bonetumor quantize") from None
    except (OSError, ValueError) as e:
        raise BonetumorError(f"{folder / META}: unreadable ({first_line(e, 100)})") from None
    if not isinstance(meta, dict) or meta.get("format") != QUANTIZED_FORMAT:
        raise BonetumorError(f"{folder / META}: not written by bonetumor quantize")
    for name, expected in meta.get("sha256", {}).items():
        if not (folder / name).is_file():
            raise BonetumorError(f"{folder / name}: missing; quantise the checkpoint again")
        if digest(folder / name) != expected:
            raise BonetumorError(f"{folder / name}: altered since bonetumor quantize wrote it (checksum mismatch)")
    return meta


def load_quantized(folder: str | Path, threads: int | None = None):
    """A quantised model folder for inference in OpenVINO (CPU), as a ``LoadedCheckpoint`` whose
    precision is the folder's (int8; fp32 where NNCF could not quantise the model).

    Raises:
        BonetumorError: no OpenVINO, or the folder's record or files do not check.
    """
    from bonetumor.model.export import loaded_checkpoint
    from bonetumor.runtime.engines import OPENVINO_HINT, OpenVinoRunner, openvino_core

    meta = read_quantized(folder)
    try:
        core = openvino_core()
    except ImportError:
        raise BonetumorError(OPENVINO_HINT) from None
    try:
        model = core.read_model(str(Path(folder) / MODEL_XML))
    except Exception as e:  # noqa: BLE001 - OpenVINO's own error, as one line
        raise BonetumorError(f"{folder}: OpenVINO cannot read it ({first_line(e, 160)})") from None
    runner = OpenVinoRunner(core, model, threads, hint="f32")
    return loaded_checkpoint(runner, {**meta, "fixed_precision": meta["precision"]})


def float_checkpoint(folder: str | Path) -> Path:
    """The float checkpoint a quantised folder was made from (for Grad-CAM, which needs gradients).

    Raises:
        BonetumorError: it is no longer where it was, or it changed since.
    """
    from bonetumor.model.serialization import file_seal

    meta = read_quantized(folder)
    src = (Path(folder) / meta["source"]["path"]).resolve()
    if not src.is_file():
        raise BonetumorError(f"{folder}: its float checkpoint {src} is gone; Grad-CAM needs it")
    if meta["source"].get("seal") and file_seal(src) != meta["source"]["seal"]:
        raise BonetumorError(f"{src}: changed since {folder} was quantised from it; quantise again")
    return src
