"""int8 inference against the bf16 ceiling and the float engines: speed, accuracy, quantisation time.

    python benchmarks/int8_inference.py [--files 1000] [--reps 3] [--real ../shared/data/bone-cancer-xray-v1]

In one run:
- speed: a ResNet50 at 224 px (random init, backbone frozen, head trained one epoch: only the
  architecture matters here) quantised with ``bonetumor quantize --samples 300`` (timed), then
  ``predict`` over ``--files`` PNGs (256 px) with the int8 folder, OpenVINO bf16 and fp32 (the
  checkpoint's cached export) and PyTorch bf16, alternated ``--reps`` times, each repetition
  between two measurements of the machine's bf16 ceiling (benchmarks/ceiling.py); images/s end
  to end (model load, PNG decode and resize included);
- accuracy: models that learnt (ResNet50 from random init, all layers trained, ``--acc-size`` px,
  ``--acc-epochs`` epochs with a cosine schedule; a frozen random backbone at 224 px learns nothing, and ImageNet weights cannot be
  downloaded here), quantised the same way: int8 against the float model (OpenVINO fp32),
  ROC-AUC and label agreement at the stored threshold, on the synthetic test split and, with
  ``--real``, on the shared set's whole validation split (trained on ``--real-train`` of its
  training images, half of each class).

Goals: int8 ``predict`` >= 1.5x the bf16 ceiling's images/s; ROC-AUC within 0.005 and >= 99% label
agreement; quantisation under 2 minutes. Results: ``benchmarks/results/int8_inference_cpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BONETUMOR = [sys.executable, "-m", "bonetumor"]
SPEED_TRAIN = ["--image-size", "224", "--weights", "none", "--freeze", "backbone", "--feature-views", "1", "--epochs", "1",
               "--seed", "0", "--no-audit", "--device", "cpu"]
ACC_TRAIN = ["--weights", "none", "--freeze", "none", "--lr-schedule", "cosine", "--seed", "0", "--no-audit",
             "--device", "cpu"]


def _run(cmd: list, cwd: Path) -> None:
    p = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(map(str, cmd))} failed:\n{p.stdout[-2000:]}{p.stderr[-2000:]}")


def _subset(real: Path, out: Path, n_train: int) -> None:
    """``n_train`` training images (half each class, seeded) and the whole validation split, linked."""
    rng = random.Random(0)
    for split in ("train", "valid"):
        for cls in ("cancer", "normal"):
            files = sorted((real / split / cls).iterdir())
            if split == "train":
                files = rng.sample(files, n_train // 2)
            (out / split / cls).mkdir(parents=True, exist_ok=True)
            for f in files:
                (out / split / cls / f.name).symlink_to(f.resolve())


def _accuracy(model_run: Path, data: Path, split: str, samples: int) -> dict:
    """The model quantised, then int8 against OpenVINO fp32 on one split: ROC-AUCs, label
    agreement, largest difference, and the float model's errors (it must make both kinds)."""
    import numpy as np
    from sklearn.metrics import roc_auc_score

    from bonetumor.predict import predict

    quantised = _quantize(model_run, data, samples)

    files = sorted(str(p) for p in (data / split).rglob("*") if p.is_file())
    truth = np.array([Path(f).parent.name == "cancer" for f in files])
    fl = predict(model_run / "best.pt", files, engine="openvino", precision="fp32")
    q8 = predict(model_run / "int8", files)
    pf, pq = (np.array([r["probability"] for r in rows]) for rows in (fl, q8))
    return {"images": len(files), "roc_auc_float": float(roc_auc_score(truth, pf)),
            "roc_auc_int8": float(roc_auc_score(truth, pq)),
            "roc_auc_drop": float(roc_auc_score(truth, pf) - roc_auc_score(truth, pq)),
            "label_agreement": float(np.mean([a["label"] == b["label"] for a, b in zip(fl, q8)])),
            "max_abs_diff_probability": float(np.abs(pf - pq).max()),
            "float_errors": {"false_positives": int(np.sum((pf >= fl[0]["threshold"]) & ~truth)),
                             "false_negatives": int(np.sum((pf < fl[0]["threshold"]) & truth))},
            "quantize": quantised}


def _quantize(model_run: Path, data: Path, samples: int) -> dict:
    from bonetumor.quantize import quantize_checkpoint

    t0 = time.perf_counter()
    record = quantize_checkpoint(model_run / "best.pt", data, model_run / "int8", samples=samples, overwrite=True)
    return {"wall_seconds": round(time.perf_counter() - t0, 2), "nncf_seconds": record["seconds"],
            "layers": record["layers"], "check": record["check"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/int8_inference_cpu.json")
    ap.add_argument("--files", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--samples", type=int, default=300)
    ap.add_argument("--patients", type=int, default=200, help="synthetic patients (6 slices each)")
    ap.add_argument("--real", default="../shared/data/bone-cancer-xray-v1")
    ap.add_argument("--real-train", type=int, default=1200)
    ap.add_argument("--acc-size", type=int, default=96)
    ap.add_argument("--acc-epochs", type=int, default=12)
    args = ap.parse_args()
    import numpy as np
    import torch
    from ceiling import measure_ceiling

    from bonetumor.data.writers import write_png
    from bonetumor.files import atomic_write_json
    from bonetumor.model.export import cached_export
    from bonetumor.predict import predict
    from bonetumor.runtime.device import cpu_has_fast_bf16, environment_info

    if not cpu_has_fast_bf16():
        raise SystemExit("this benchmark compares with the bf16 ceiling: it needs a CPU with native bf16")
    cpu = torch.device("cpu")
    tmp = Path(tempfile.mkdtemp(prefix="bonetumor-int8-"))
    os.environ["BONETUMOR_CACHE_DIR"] = str(tmp / "export-cache")
    _run(BONETUMOR + ["synth", "data", "--n-patients", str(args.patients), "--size", "224", "--seed", "0"], tmp)
    _run(BONETUMOR + ["train", "data", "--out", "synth_run"] + SPEED_TRAIN, tmp)
    result = {"benchmark": "int8_inference", "date": time.strftime("%Y-%m-%d"), "image_size": 224,
              "quantize_224": _quantize(tmp / "synth_run", tmp / "data", args.samples), "accuracy": {},
              "accuracy_image_size": args.acc_size, "accuracy_epochs": args.acc_epochs}
    acc = ACC_TRAIN + ["--image-size", str(args.acc_size), "--epochs", str(args.acc_epochs)]
    _run(BONETUMOR + ["train", "data", "--out", "synth_acc"] + acc, tmp)
    result["accuracy"]["synthetic_test"] = {**_accuracy(tmp / "synth_acc", tmp / "data", "test", args.samples)}
    real = Path(args.real)
    if real.is_dir():
        _subset(real, tmp / "real", args.real_train)
        _run(BONETUMOR + ["train", "real", "--out", "real_acc"] + acc, tmp)
        result["accuracy"]["real_valid"] = _accuracy(tmp / "real_acc", tmp / "real", "valid", args.samples)
    print(json.dumps(result, indent=1), flush=True)

    rng = np.random.default_rng(0)
    for i in range(args.files):
        write_png(tmp / "imgs" / f"{i:04d}.png", rng.random((256, 256)))
    model = tmp / "synth_run"
    cached_export(model / "best.pt")  # once, as a user's second run finds it
    engines = {"int8": (model / "int8", "openvino", "model", "bf16"),
               "openvino_bf16": (model / "best.pt", "openvino", "bf16", "bf16"),
               "openvino_fp32": (model / "best.pt", "openvino", "fp32", "fp32"),
               "torch_bf16": (model / "best.pt", "torch", "bf16", "bf16")}

    def rate(name: str) -> float:
        path, engine, precision, _ = engines[name]
        t0 = time.perf_counter()
        rows = predict(path, [tmp / "imgs"], device="cpu", engine=engine, precision=precision)
        return len(rows) / (time.perf_counter() - t0)

    for name in engines:  # warm: page cache, oneDNN kernel choice
        rate(name)
    ceilings = [measure_ceiling(cpu, True, 3)]
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(args.reps):
        for name in engines:
            runs[name].append(round(rate(name), 2))
        ceilings.append(measure_ceiling(cpu, True, 3))
        print({k: v[-1] for k, v in runs.items()}, flush=True)
    ceiling = {p: statistics.mean(c[p]["inference_ips"] for c in ceilings) for p in ("fp32", "bf16")}
    med = {k: statistics.median(v) for k, v in runs.items()}
    result.update({"files": args.files, "reps": args.reps, "ceiling_inference_ips": ceiling, "ceilings": ceilings,
                   "predict_images_per_second": med, "runs": runs,
                   "over_bf16_ceiling": {k: round(v / ceiling["bf16"], 3) for k, v in med.items()},
                   "int8_over_openvino_bf16": round(med["int8"] / med["openvino_bf16"], 3),
                   "environment": environment_info(cpu)})
    atomic_write_json(args.out, result)
    print(json.dumps({k: result[k] for k in ("ceiling_inference_ips", "predict_images_per_second",
                                             "over_bf16_ceiling", "int8_over_openvino_bf16")}, indent=1))


if __name__ == "__main__":
    main()
