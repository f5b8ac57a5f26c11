"""The Keras original against bonetumor, in one run: frozen-backbone training and inference.

The original's pipeline is rebuilt in Keras 3 (TensorFlow backend): ResNet50(include_top=False,
weights=None) frozen, GlobalAveragePooling -> Dense(256, relu) -> Dropout(0.5) -> Dense(1,
sigmoid), Adam(1e-3), binary cross-entropy, flip/zoom/rotate augmentation, batch 32, 224 px,
early stopping (patience = epochs, so both sides run every epoch) and a best-model checkpoint.
It runs in its own environment (TensorFlow is not a dependency of bonetumor):

    python -m venv /tmp/tfenv && /tmp/tfenv/bin/pip install tensorflow-cpu
    python benchmarks/keras_original.py --keras-python /tmp/tfenv/bin/python [--epochs 10] [--reps 3]

Alternating in one run, repetition by repetition: the machine's ceiling (benchmarks/ceiling.py),
the Keras original's training (wall time of ``model.fit`` for E epochs) and inference (images/s
at batch 8, tf.function), then bonetumor's ``fit`` (frozen; features cached with 1 and with 4
views; uncached with augmentation, and uncached without it, the like-for-like twin of 1 view) and
inference at batch 8 (PyTorch eager fp32 and bf16 with BatchNorms folded as bonetumor runs
eager inference, torch.compile bf16, ONNX Runtime), plus
``predict`` over the data folder with its defaults, file decoding included. Same synthetic data,
same image size, random weights on both sides; bonetumor at ``--precision auto`` unless told.
Results: ``benchmarks/results/keras_original_cpu.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

KERAS_CHILD = r'''
import json, os, sys, time
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
import numpy as np
import keras
import tensorflow as tf
root, epochs, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
keras.utils.set_random_seed(0)
load = lambda split, shuffle: keras.utils.image_dataset_from_directory(
    os.path.join(root, split), labels="inferred", label_mode="binary", image_size=(224, 224), batch_size=32,
    shuffle=shuffle, seed=0, verbose=False)
train, valid = load("train", True), load("valid", False)
augment = keras.Sequential([keras.layers.RandomFlip("horizontal"), keras.layers.RandomZoom(0.1),
                            keras.layers.RandomRotation(15 / 360)])
pre = keras.applications.resnet50.preprocess_input
train = train.map(lambda x, y: (pre(augment(x, training=True)), y)).prefetch(tf.data.AUTOTUNE)
valid = valid.map(lambda x, y: (pre(x), y)).prefetch(tf.data.AUTOTUNE)
base = keras.applications.ResNet50(include_top=False, weights=None, input_shape=(224, 224, 3))
base.trainable = False
inputs = keras.Input((224, 224, 3))
x = keras.layers.GlobalAveragePooling2D()(base(inputs, training=False))
x = keras.layers.Dense(256, activation="relu")(x)
x = keras.layers.Dropout(0.5)(x)
model = keras.Model(inputs, keras.layers.Dense(1, activation="sigmoid")(x))
model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", metrics=[keras.metrics.AUC(name="auc")])
callbacks = [keras.callbacks.EarlyStopping(monitor="val_loss", patience=epochs, restore_best_weights=True),
             keras.callbacks.ModelCheckpoint(os.path.join(out, "best.keras"), monitor="val_loss", save_best_only=True)]
t0 = time.perf_counter()
hist = model.fit(train, validation_data=valid, epochs=epochs, callbacks=callbacks, verbose=0)
train_seconds = time.perf_counter() - t0
best = int(np.argmin(hist.history["val_loss"]))
xb = tf.random.normal((8, 224, 224, 3))
infer = tf.function(lambda t: model(t, training=False))
infer(xb)
rates = []
for _ in range(3):
    t0 = time.perf_counter()
    for _ in range(3):
        infer(xb).numpy()
    rates.append(24 / (time.perf_counter() - t0))
print(json.dumps({"train_seconds": train_seconds, "best_epoch": best + 1, "val_auc": float(hist.history["val_auc"][best]),
                  "inference_images_per_second": sorted(rates)[1], "tensorflow": tf.__version__, "keras": keras.__version__}))
'''


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keras-python", required=True, help="Python of an environment with tensorflow-cpu installed")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--precision", default="auto",
                    help="bonetumor's precision (default auto, what a user gets; the Keras original runs fp32, as it did)")
    ap.add_argument("--out", default="benchmarks/results/keras_original_cpu.json")
    args = ap.parse_args()
    import torch
    from ceiling import measure_ceiling, share

    from bonetumor import TrainConfig, create_synthetic_dataset, fit
    from bonetumor.files import atomic_write_json
    from bonetumor.model.checkpoint import load_checkpoint
    from bonetumor.model.export import export_onnx, load_onnx
    from bonetumor.predict import predict
    from bonetumor.runtime.batchnorm import inference_folded
    from bonetumor.runtime.device import cpu_has_fast_bf16, environment_info
    from bonetumor.runtime.forward import CompiledInference

    cpu = torch.device("cpu")
    bf16 = cpu_has_fast_bf16()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = create_synthetic_dataset(tmp / "data", n_patients=40, size=224, seed=0, modality="stir",
                                        slices_per_patient=3).root
        files = sorted(str(p) for p in root.rglob("*.png"))
        (tmp / "child.py").write_text(KERAS_CHILD)
        base = TrainConfig(data=str(root), image_size=224, batch_size=32, epochs=args.epochs, patience=args.epochs,
                           weights="none", freeze="backbone", precision=args.precision, seed=0, audit=False)
        plain = dict(hflip=False, rotate_degrees=0.0, zoom_min=1.0, zoom_max=1.0)
        # cached_k1 sees no augmentation, so its like-for-like uncached twin is uncached_plain.
        ours = {"cached_k1": dict(feature_views=1), "cached_k4": dict(feature_views=4),
                "uncached": dict(cache_features=False), "uncached_plain": dict(cache_features=False, **plain)}
        fit(dataclasses.replace(base, epochs=1), tmp / "warmup", verbose=False)
        infer_kinds = ["torch_eager_fp32", "onnx_runtime_fp32", "predict_folder_default"]
        if bf16:
            infer_kinds[1:1] = ["torch_eager_bf16", "torch_compiled_bf16"]
        results: dict[str, list] = {"keras": [], "ceiling": [], "precision_chosen": [], **{k: [] for k in ours},
                                    **{k: [] for k in infer_kinds}}
        x = torch.randn(8, 3, 224, 224).contiguous(memory_format=torch.channels_last)

        def rate(model, dtype=None) -> float:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                model(x)
                times = []
                for _ in range(3):
                    t0 = time.perf_counter()
                    for _ in range(3):
                        model(x)
                    times.append(24 / (time.perf_counter() - t0))
                return sorted(times)[1]

        compiled = None
        for rep in range(args.reps):
            results["ceiling"].append(measure_ceiling(cpu, bf16))
            kdir = tmp / f"keras_{rep}"
            kdir.mkdir()
            out = subprocess.run([args.keras_python, str(tmp / "child.py"), str(root), str(args.epochs), str(kdir)],
                                 capture_output=True, text=True, check=True)
            results["keras"].append(json.loads(out.stdout.strip().splitlines()[-1]))
            print("keras", rep, results["keras"][-1], flush=True)
            for name, kw in ours.items():
                t0 = time.perf_counter()
                r = fit(dataclasses.replace(base, **kw), tmp / f"{name}_{rep}", verbose=False)
                best = next(h for h in r.history if h["epoch"] == r.best_epoch)
                results[name].append({"train_seconds": time.perf_counter() - t0, "best_epoch": r.best_epoch,
                                      "val_auc": best["val_roc_auc"]})
                print(name, rep, results[name][-1], flush=True)
            run = tmp / f"cached_k1_{rep}"
            results["precision_chosen"].append(json.loads((run / "precision.json").read_text())["chosen"])
            ck = load_checkpoint(run / "best.pt")
            model = ck.model.to(memory_format=torch.channels_last).eval()
            export_onnx(run / "best.pt", tmp / f"m{rep}.onnx")
            with inference_folded(model):  # eager, as bonetumor runs it: BatchNorms folded
                results["torch_eager_fp32"].append(rate(model))
                if bf16:  # bf16 figures only where the CPU runs bf16 natively: emulated, they say nothing
                    results["torch_eager_bf16"].append(rate(model, torch.bfloat16))
                    if compiled is None:  # compiled once; its compile time is reported by resnet50_throughput.py
                        compiled = CompiledInference(model, 8)
                        rate(compiled, torch.bfloat16)
                    results["torch_compiled_bf16"].append(rate(compiled, torch.bfloat16))
            results["onnx_runtime_fp32"].append(rate(load_onnx(tmp / f"m{rep}.onnx").model))
            t0 = time.perf_counter()  # what `bonetumor predict RUN/best.pt FOLDER` does, file decoding included
            predict(run / "best.pt", files, device="cpu", precision="auto")
            results["predict_folder_default"].append(len(files) / (time.perf_counter() - t0))
            print("inference", rep, {k: round(results[k][-1], 2) for k in infer_kinds}, flush=True)
    med = statistics.median
    ceiling = {p: {k: med([c[p][k] for c in results["ceiling"]]) for k in results["ceiling"][0][p]}
               for p in results["ceiling"][0]}
    keras_train = med([r["train_seconds"] for r in results["keras"]])
    keras_infer = med([r["inference_images_per_second"] for r in results["keras"]])
    train = {k: med([r["train_seconds"] for r in results[k]]) for k in ours}
    infer = {k: med(results[k]) for k in infer_kinds}
    auc = {k: med([r["val_auc"] for r in results[k]]) for k in ("keras", *ours)}
    summary = {
        "benchmark": "keras_original", "date": time.strftime("%Y-%m-%d"), "epochs": args.epochs, "image_size": 224,
        "bonetumor_precision_requested": args.precision, "bonetumor_precision_chosen": results["precision_chosen"],
        "batch_size": 32, "data": f"synthetic stir, 40 patients x 3 slices (84 train, 18 valid; predict: {len(files)} files)",
        "reps": args.reps,
        "keras_versions": {k: results["keras"][0][k] for k in ("tensorflow", "keras")},
        "ceiling": ceiling,
        "train_seconds": {"keras_original": keras_train, **train},
        "training_speedup_vs_keras": {k: keras_train / v for k, v in train.items()},
        "val_auc_best_epoch_median": auc,
        "val_auc_cached_k1_minus_uncached_plain": auc["cached_k1"] - auc["uncached_plain"],
        "inference_images_per_second": {"keras_original": keras_infer, **infer},
        "inference_ratio_vs_keras": {k: v / keras_infer for k, v in infer.items()},
        "inference_share_of_ceiling": {k: share(v, ceiling, "bf16" if "bf16" in k or (k.startswith("predict") and bf16)
                                                else "fp32") for k, v in {"keras_original": keras_infer, **infer}.items()},
        "runs": results, "environment": environment_info(cpu),
    }
    atomic_write_json(args.out, summary)
    print(json.dumps({k: summary[k] for k in ("train_seconds", "training_speedup_vs_keras", "val_auc_best_epoch_median",
                                              "inference_images_per_second", "inference_ratio_vs_keras",
                                              "inference_share_of_ceiling")}, indent=1))


if __name__ == "__main__":
    main()
