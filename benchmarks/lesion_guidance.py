"""Lesion guidance on the demo: the same data, seed and budget, trained with and without it.

Runs the demo (``bonetumor demo``: synthetic STIR-like MRI with lesion masks, ResNet50 from random
initialisation, 96 px, output stride 16) twice, ``--guided`` (the training split's masks as
``--lesion-masks manifest``, train/guidance.py) and not, and reports for each the test ROC-AUC
and the Grad-CAM localisation of ``explain`` on the test split: pointing game, energy inside the
lesion and top-15% IoU over every image with a lesion and over the lesion images the model
called cancer (correctly classified cancers), beside the centred Gaussian baseline.

    python benchmarks/lesion_guidance.py [--epochs N] [--work DIR] [--arms guided,unguided]
        [--out benchmarks/results/lesion_guidance_cpu.json]

``--arms`` runs only those (for instance each in its own process, at the same time); their results
are merged into ``--out``, beside those of the other arm already there.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path


def _figures(r) -> dict:
    """What one demo run measured."""
    loc = r.explanation.localization
    ccp = loc["correctly_classified_positive"]
    with open(r.run_dir / "history.csv") as f:
        history = list(csv.DictReader(f))
    return {
        "seconds": round(r.seconds, 1), "epochs_run": len(history),
        "precision": json.loads((r.run_dir / "precision.json").read_text())["chosen"],
        "test_roc_auc": r.metrics["roc_auc"], "test_accuracy": r.metrics.get("accuracy"),
        "last_train_outside_lesion": float(history[-1]["train_outside_lesion"]) if "train_outside_lesion" in history[-1] else None,
        "grid": loc["grid"],
        "all_lesion_images": {"n": loc["n_with_lesion"], "cam": loc["cam"], "baseline_centred_gaussian": loc["baseline_centred_gaussian"]},
        "correctly_classified_cancers": ccp,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=None, help="Override the demo's epochs (same for both).")
    ap.add_argument("--work", default=None, help="Keep the two demo folders here (default: a temporary folder).")
    ap.add_argument("--arms", default="guided,unguided", help="Which of the two to run, comma-separated.")
    ap.add_argument("--out", default="benchmarks/results/lesion_guidance_cpu.json")
    args = ap.parse_args()

    from bonetumor.demo import DEMO_DATA, DEMO_GUIDANCE, DEMO_TRAIN, run_demo
    from bonetumor.files import atomic_write_json
    from bonetumor.runtime.device import environment_info, select_device

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        results = {}
        for name in args.arms.split(","):
            guided = {"guided": True, "unguided": False}[name]
            r = run_demo(work / name, overwrite=True, device="cpu", epochs=args.epochs, guided=guided)
            results[name] = _figures(r)
            print(name, json.dumps(results[name]["correctly_classified_cancers"]["cam"]["pointing"]), flush=True)
    out = Path(args.out)
    before = json.loads(out.read_text()) if out.is_file() else {}
    results = {**before.get("results", {}), **results}
    summary = {
        "benchmark": "lesion_guidance", "date": time.strftime("%Y-%m-%d"), "data": DEMO_DATA,
        "train": {**DEMO_TRAIN, **({"epochs": args.epochs} if args.epochs else {})}, "guidance": DEMO_GUIDANCE,
        "results": results, "environment": environment_info(select_device("cpu")),
    }
    atomic_write_json(args.out, summary)
    for name, f in results.items():
        a, c = f["all_lesion_images"], f["correctly_classified_cancers"]
        print(f"{name}: test ROC-AUC {f['test_roc_auc']['value']:.3f}; all {a['n']} lesion images: pointing "
              f"{a['cam']['pointing']['value']:.3f}, energy {a['cam']['energy']['value']:.3f} (baseline "
              f"{a['baseline_centred_gaussian']['pointing']['value']:.3f}, {a['baseline_centred_gaussian']['energy']['value']:.3f}); "
              f"{c['n']} correctly classified cancers: pointing {c['cam']['pointing']['value']:.3f}, energy "
              f"{c['cam']['energy']['value']:.3f} (baseline {c['baseline_centred_gaussian']['pointing']['value']:.3f})")


if __name__ == "__main__":
    main()
