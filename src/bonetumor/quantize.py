"""int8 post-training quantisation of a checkpoint for OpenVINO's CPU plugin.

``quantize_checkpoint`` exports the checkpoint (``model.export``) and quantises it with ONNX
Runtime's static quantiser (quantize_onnx.py: activation ranges from a few hundred calibration
images of the training split) for OpenVINO to run, or, with ``max_drop``, with NNCF's
``quantize_with_accuracy_control``, which returns layers to float, most harmful first, until the
validation ROC-AUC is within ``max_drop`` of the float model's. The folder it writes
(model/quantized.py) is a model ``predict``, ``evaluate`` and ``serve`` take like a checkpoint;
Grad-CAM needs gradients and runs on the float checkpoint it names.

Why two quantisers: on this project's benchmark models ONNX Runtime's kept the float model's
labels better than NNCF's post-training quantisation (synthetic test split 100% against 96.7%)
and OpenVINO runs its model faster (docs/results.md); NNCF alone has the accuracy-controlled mode.

The out-of-distribution check (model/ood.py) stays in float: a few small matrix products with
precision matrices, where int8 would save nothing and only add error. It reads the int8 model's
features; with its stored threshold it flagged 99% of a real validation split's images as the
float model did (the distances' median ratio 1.00).

OpenVINO (2026.4, CPU) computes an int8 model compiled with a dynamic batch wrongly (logits
0.6-1.3 where a fixed batch, 1 or 8, gives 1.4-5.9 and agrees with the float model), so NNCF
gets the model with a fixed batch of one, and the check runs it as predict does.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bonetumor.config import config_to_dict
from bonetumor.errors import BonetumorError, first_line
from bonetumor.evaluate.run import select_samples
from bonetumor.files import RunDir
from bonetumor.inference import model_input, read_batches
from bonetumor.model.checkpoint import load_checkpoint
from bonetumor.model.export import cached_export
from bonetumor.model.quantized import (
    META,
    MODEL_BIN,
    MODEL_XML,
    QUANTIZED_FORMAT,
    digest,
)
from bonetumor.model.serialization import file_seal
from bonetumor.runtime.engines import OpenVinoRunner, openvino_core

MIN_CALIBRATION = 32  # fewer images give activation ranges that one odd image decides
INSTALL_HINT = "bonetumor quantize needs: pip install 'bonetumor[quantize]' (onnxruntime, openvino, nncf)"


def _require():
    try:
        import nncf
        import openvino as ov
    except ImportError:
        raise BonetumorError(INSTALL_HINT) from None
    return nncf, ov


def quantize_checkpoint(checkpoint: str | Path, calibration: str | Path, out: str | Path, *, samples: int = 300,
                        max_drop: float | None = None, max_float_layers: int = 20, min_agreement: float = 0.99,
                        validation: str | Path | None = None, overwrite: bool = False, manifest: str | None = None,
                        seed: int = 0) -> dict:
    """Quantise ``checkpoint`` to int8 into the folder ``out`` and return its record.

    Args:
        calibration: a labelled data folder as ``train`` takes (its training split calibrates; the
            validation split, when there is one, measures the int8 model against the float one).
        samples: calibration images (drawn with ``seed`` from the training split).
        max_drop: with it, accuracy control: layers go back to float until the validation ROC-AUC
            is within ``max_drop`` (absolute) of the float model's, or ``max_float_layers`` have
            (each costs a validation pass); the record says whether the limit was met. Also held:
            ``min_agreement``, the share of validation labels the int8 model must give as the float
            model does.
        validation: another labelled folder to validate on (all of its images), instead of the
            calibration data's validation split.

    Raises:
        BonetumorError: missing packages, bad input (too few or unreadable calibration images, no
            validation split for ``max_drop``), or an existing ``out`` without ``overwrite``.
    """
    nncf, ov = _require()
    if samples < MIN_CALIBRATION:
        raise BonetumorError(f"--samples {samples}: calibration needs at least {MIN_CALIBRATION} images")
    if max_drop is not None and not 0 <= max_drop < 1:
        raise BonetumorError(f"--max-drop must lie in [0, 1), not {max_drop}")
    run = RunDir(out)
    run.refuse_existing(overwrite, inputs=[checkpoint, calibration, validation, manifest])
    ck = load_checkpoint(checkpoint, "cpu")
    calib, valid = _images(ck, calibration, manifest, validation, samples, seed, Path(checkpoint).parent)
    if max_drop is not None and valid is None:
        raise BonetumorError(f"{calibration}: no validation split to hold the ROC-AUC drop to --max-drop; pass "
                             "--validation DATA (a labelled folder)")
    calib_x = _read(ck, calib)
    t0 = time.perf_counter()
    onnx_path = cached_export(checkpoint)
    float_model = openvino_core().read_model(str(onnx_path))
    # A fixed batch of one for NNCF, which validates what it compiles: see the module's docstring.
    float_model.reshape({float_model.inputs[0]: [1, 3, ck.image_size, ck.image_size]})
    valid_xy = (_read(ck, valid[0]), valid[1]) if valid is not None else None
    checked = valid_xy if valid_xy is not None else (calib_x, None)
    reference = _run(float_model, checked[0], ck)  # the float model's answers: once, for control and check
    control = (max_drop, max_float_layers, min_agreement, reference[0])
    model, precision, note = _quantize(nncf, float_model, calib_x, valid_xy, control, ck, onnx_path)
    seconds = time.perf_counter() - t0
    check = _compare(reference, model, checked, ck)
    run = RunDir.create(out, overwrite=overwrite, inputs=[checkpoint, calibration, validation, manifest])
    meta = {"format": QUANTIZED_FORMAT, "precision": precision, **({"fallback": note} if precision != "int8" else {}),
            "source": {"path": os.path.relpath(Path(checkpoint).resolve(), run.path.resolve()),
                       "seal": file_seal(checkpoint)},
            "classes": ck.classes, "threshold": ck.threshold, "image_size": ck.image_size, "mean": list(ck.mean),
            "std": list(ck.std), "epoch": ck.epoch, "config": config_to_dict(ck.config), "ood": ck.ood,
            **({"operating_point": ck.raw["operating_point"]} if "operating_point" in ck.raw else {}),
            "calibration": {"data": str(calibration), "images": len(calib), "seed": seed},
            "accuracy_control": _control_record(control, check), "layers": _layers(model),
            "check": check, "seconds": round(seconds, 2), "versions": _versions()}
    _save(ov, run, model, meta)
    return meta


def _control_record(control: tuple, check: dict) -> dict | None:
    """The accuracy control's limits and whether the check met them (None without control)."""
    max_drop, max_float_layers, min_agreement, _ = control
    if max_drop is None:
        return None
    met = check.get("roc_auc_drop", 0.0) <= max_drop and check["label_agreement"] >= min_agreement
    return {"max_drop": max_drop, "min_agreement": min_agreement, "max_float_layers": max_float_layers, "met": bool(met)}


def _versions() -> dict:

    return {m: version(m) for m in ("nncf", "openvino", "torch")}


def _images(ck, data, manifest, validation, samples: int, seed: int, run_dir: Path):
    """(calibration samples, (validation samples, targets) or None)."""

    all_samples, train, _ = select_samples(data, manifest, ck, "train", None, run_dir)
    pool = train or all_samples
    if len(pool) < MIN_CALIBRATION:
        raise BonetumorError(f"{data}: {len(pool)} calibration images; quantisation needs at least {MIN_CALIBRATION}")
    rng = np.random.default_rng(seed)
    calib = [pool[i] for i in sorted(rng.choice(len(pool), size=min(samples, len(pool)), replace=False))]
    if validation is not None:
        _, held, _ = select_samples(validation, None, ck, "all", None)
    else:
        held = [s for s in all_samples if s.split == "valid"]
    if not held:
        return calib, None
    index = {c: i for i, c in enumerate(ck.classes)}
    return calib, (held, np.array([index[s.label] for s in held]))


def _read(ck, samples, batch_size: int = 8) -> list[np.ndarray]:
    """The model's inputs for ``samples`` as ``predict`` makes them (read, resized, normalised),
    in batches; an unreadable file stops with its name."""
    out = []
    for _, x, _ in read_batches(samples, batch_size, ck.image_size, ck.read_options):
        out.append(model_input(x, torch.device("cpu"), ck.mean, ck.std, torch.contiguous_format).numpy())
    return out


def _ood_only(model) -> list[str]:
    """Names of the operations that compute only the out-of-distribution output: ancestors of
    its output that the logits do not need."""
    def ancestors(node) -> set:
        seen, stack = {}, [node]
        while stack:
            n = stack.pop()
            if n.get_friendly_name() in seen:
                continue
            seen[n.get_friendly_name()] = n
            stack.extend(i.get_source_output().get_node() for i in n.inputs())
        return set(seen)

    if len(model.outputs) < 2:
        return []
    return sorted(ancestors(model.outputs[1].get_node()) - ancestors(model.outputs[0].get_node()))


def _quantize(nncf, model, calib_x, valid_xy, control: tuple, ck, onnx_path: Path):
    """(model, "int8" or "fp32", None | accuracy-control facts | the reason it stayed float).
    Without accuracy control ONNX Runtime's quantiser makes the model (quantize_onnx.py: it keeps
    the float model's labels better here); with it, NNCF's, which can return layers to float."""
    if control[0] is None:
        from bonetumor.quantize_onnx import quantize_onnx

        try:
            with _quiet():
                quantized = quantize_onnx(onnx_path, calib_x)
        except Exception as e:  # noqa: BLE001 - a graph the quantiser cannot take falls back to the float engine
            return _float_fallback(model, "ONNX Runtime", e)
        quantized.reshape({quantized.inputs[0]: [1, 3, ck.image_size, ck.image_size]})
        return quantized, "int8", None
    ignored = nncf.IgnoredScope(names=_ood_only(model), validate=False)
    # One image per item: NNCF's statistics (and its subset_size) count items, and some of its
    # algorithms assume a batch of one.
    singles = [x[i : i + 1] for x in calib_x for i in range(len(x))]
    options = dict(subset_size=len(singles), preset=nncf.QuantizationPreset.PERFORMANCE, ignored_scope=ignored)
    calibration = nncf.Dataset(singles)
    try:
        with _quiet():
            quantized = _run_nncf(nncf, model, calibration, valid_xy, *control, ck, options)
    except BonetumorError:
        raise
    except Exception as e:  # noqa: BLE001 - an architecture NNCF cannot take falls back to the float engine
        return _float_fallback(model, "NNCF", e)
    if not _layers(quantized)["int8"]:
        return quantized, "fp32", "accuracy control returned every layer to float"
    return quantized, "int8", None


def _float_fallback(model, quantiser: str, error: Exception):
    """The float model, with a warning that says why (``_quantize``'s answer when quantising failed)."""
    reason = f"{quantiser} could not quantise this model ({type(error).__name__}: {first_line(error, 160)})"
    warnings.warn(f"{reason}; the folder holds the float model, run in OpenVINO fp32", RuntimeWarning, stacklevel=4)
    return model, "fp32", reason


@contextmanager
def _quiet():
    """NNCF's INFO lines and progress bars held back (and torch's "no CUDA runtime" warning, as
    NNCF loads torch's extension tools): the command prints its own summary."""
    logging.disable(logging.WARNING)
    try:
        with redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        logging.disable(logging.NOTSET)


def _run_nncf(nncf, model, calibration, valid_xy, max_drop, max_float_layers, min_agreement, float_probs, ck,
              options):
    if max_drop is None:
        return nncf.quantize(model, calibration, **options)
    xs, targets = valid_xy
    float_labels = _labels(float_probs, ck)
    items = [(x[i : i + 1], y[i : i + 1], f[i : i + 1])
             for x, y, f in zip(xs, _split(targets, xs), _split(float_labels, xs)) for i in range(len(x))]
    validation = nncf.Dataset(items, lambda item: item[0])  # (inputs, targets, the float model's labels)
    return nncf.quantize_with_accuracy_control(
        model, calibration, validation, lambda compiled, batch: _validate(compiled, batch, ck, min_agreement),
        max_drop=max_drop, drop_type=nncf.DropType.ABSOLUTE,
        advanced_accuracy_restorer_parameters=nncf.AdvancedAccuracyRestorerParameters(max_num_iterations=max_float_layers),
        **options)


def _split(values: np.ndarray, xs: list[np.ndarray]) -> list[np.ndarray]:
    return np.split(values, np.cumsum([len(x) for x in xs])[:-1])


def _labels(probs: np.ndarray, ck) -> np.ndarray:
    """The labels at the stored threshold (a binary model), or the most probable classes."""
    return probs >= ck.threshold if probs.ndim == 1 else probs.argmax(1)


def _validate(compiled, items, ck, min_agreement: float) -> tuple[float, list]:
    """NNCF's validation function over ``items`` (inputs, targets, float labels): the ROC-AUC,
    less 1 when fewer than ``min_agreement`` of the labels are the float model's, so that either
    limit unmet is a drop NNCF must undo; with each item's outputs for its ranking of layers (an
    AUC has no per-image value)."""
    outputs, probs, targets, float_labels = [], [], [], []
    for x, y, f in items:
        logits = compiled(x)[0]
        outputs.append([logits])
        probs.append(_probabilities(logits, ck))
        targets.append(y)
        float_labels.append(f)
    p = np.concatenate(probs)
    agreement = float(np.mean(_labels(p, ck) == np.concatenate(float_labels)))
    return _auc(np.concatenate(targets), p) - (1.0 if agreement < min_agreement else 0.0), outputs


def _probabilities(logits: np.ndarray, ck) -> np.ndarray:
    return ck.task.probabilities(torch.from_numpy(np.asarray(logits, dtype=np.float32))).numpy()


def _auc(targets: np.ndarray, probs: np.ndarray) -> float:
    if len(np.unique(targets)) < 2:
        return float("nan")
    if probs.ndim == 1:
        return float(roc_auc_score(targets, probs))
    return float(roc_auc_score(targets, probs, multi_class="ovr", labels=list(range(probs.shape[1]))))


def _layers(model) -> dict:
    """How many convolutions and matrix products the model has, and how many take int8 inputs."""
    heavy = [op for op in model.get_ops() if op.get_type_name() in ("Convolution", "MatMul", "GroupConvolution")]
    # NNCF's models feed them through FakeQuantize; a QDQ model's weights come as int8 constants
    # converted and scaled (Convert -> [Subtract ->] Multiply), its activations through FakeQuantize.
    fed = [op for op in heavy if any(_int8_source(i.get_source_output().get_node()) for i in op.inputs())]
    return {"convolutions_and_matmuls": len(heavy), "int8": len(fed)}


def _int8_source(node, depth: int = 4) -> bool:
    """Whether ``node`` quantises: a FakeQuantize, or a dequantisation of an int8 constant."""
    kind = node.get_type_name()
    if kind == "FakeQuantize":
        return True
    if kind == "Convert":
        import openvino as ov

        if node.input(0).get_element_type() in (ov.Type.i8, ov.Type.u8):
            return True
    if depth and kind in ("Multiply", "Subtract", "Convert", "Reshape", "Transpose"):
        return any(_int8_source(i.get_source_output().get_node(), depth - 1) for i in node.inputs())
    return False


def _run(model, xs: list[np.ndarray], ck) -> tuple[np.ndarray, np.ndarray | None]:
    """(probabilities, out-of-distribution distances or None) of ``model`` over the batches
    ``xs``, as predict runs it: a fixed shape per batch size, layers outside int8 in fp32."""
    runner = OpenVinoRunner(openvino_core(), model, hint="f32")
    outs = [runner(torch.from_numpy(x)) for x in xs]
    if not isinstance(outs[0], tuple):
        return _probabilities(torch.cat(outs).numpy(), ck), None
    return _probabilities(torch.cat([o[0] for o in outs]).numpy(), ck), torch.cat([o[1] for o in outs]).numpy()


def _compare(reference, model, xy, ck) -> dict:
    """The int8 model against the float one (both in OpenVINO, fp32 elsewhere) on validation
    images (or, without, the calibration images): ROC-AUCs, label agreement at the stored
    threshold, the largest probability difference, and how often the out-of-distribution check
    (in float, on int8 features, with its stored threshold) flags alike."""
    xs, targets = xy
    (pf, df), (pq, dq) = reference, _run(model, xs, ck)
    out = {"images": int(len(pf)), "on": "validation" if targets is not None else "calibration",
           "label_agreement": float((_labels(pf, ck) == _labels(pq, ck)).mean()),
           "max_abs_diff_probability": float(np.abs(pf - pq).max()),
           "mean_abs_diff_probability": float(np.abs(pf - pq).mean())}
    if targets is not None:
        out.update(roc_auc_float=_auc(targets, pf), roc_auc_int8=_auc(targets, pq))
        out["roc_auc_drop"] = out["roc_auc_float"] - out["roc_auc_int8"]
    if df is not None and ck.ood:
        t = float(ck.ood["threshold"])
        out["ood_flag_agreement"] = float(((df > t) == (dq > t)).mean())
        out["ood_distance_ratio_median"] = float(np.median(dq / np.maximum(df, 1e-12)))
    return out


def _save(ov, run: RunDir, model, meta: dict) -> None:
    """The IR's two files, then the record with their checksums (written last: a folder without
    it is no model)."""
    stage = Path(tempfile.mkdtemp(dir=run.path, prefix=".stage-"))
    try:
        ov.save_model(model, str(stage / MODEL_XML), compress_to_fp16=False)
        meta["sha256"] = {}
        for name in (MODEL_BIN, MODEL_XML):
            meta["sha256"][name] = digest(stage / name)
            run.save(name, lambda tmp, src=stage / name: shutil.copyfile(src, tmp))
        run.write_json(META, meta)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
