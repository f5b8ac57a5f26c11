"""The built-in demonstration: synthetic data → train → evaluate, on a laptop CPU in minutes."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bonetumor.config import TrainConfig
from bonetumor.data.synth import create_synthetic_dataset
from bonetumor.evaluate.run import evaluate
from bonetumor.explain.run import ExplainResult, explain
from bonetumor.files import RunDir
from bonetumor.report import build_report
from bonetumor.runtime.device import cpu_has_fast_bf16, select_device
from bonetumor.train import fit

# Small enough for 2 CPU cores in a few minutes, large enough for the model to learn. Fat-
# suppressed (STIR-like) MRI, where marrow lesions are bright, as radiologists look for them.
# The field of view is narrowed onto the bone (zoom) so that lesions are not tiny at 96 px, and
# ResNet50's last block is dilated (output stride 16) so that Grad-CAM has a 6x6 grid, not 3x3.
# A cosine learning-rate decay steadies training from scratch; bf16 where the CPU has it natively.
DEMO_DATA = {"n_patients": 160, "size": 96, "seed": 0, "modality": "stir", "slices_per_patient": 4, "zoom": 1.8}
DEMO_TRAIN = {"image_size": 96, "precision": "bf16", "epochs": 16, "batch_size": 32, "lr": 1e-3, "lr_schedule": "cosine",
              "weights": "none", "freeze": "none", "output_stride": 16, "patience": 8, "seed": 0}
# The guided variant (``demo --guided``): the same data, seed and budget, with the lesion masks
# the synthetic data comes with as guidance (train/guidance.py; benchmarks/lesion_guidance.py
# compares the two).
DEMO_GUIDANCE = {"lesion_masks": "manifest", "guidance_weight": 1.0}
DEMO_PANELS = 24


@dataclass
class DemoResult:
    """Where the demo put things and how well the model did."""

    out: Path
    run_dir: Path
    eval_dir: Path
    metrics: dict
    explanation: ExplainResult
    seconds: float
    report: Path | None = None


def run_demo(out: str | Path = "demo_output", overwrite: bool = False, device: str = "auto",
             epochs: int | None = None, verbose: bool = True, guided: bool = False) -> DemoResult:
    """Make the synthetic data set, train ResNet50 from scratch on it, evaluate on its test split and
    explain the test split with Grad-CAM (scored against the synthetic lesion masks); ``guided``:
    train with the training split's lesion masks as guidance (``DEMO_GUIDANCE``)."""
    t0 = time.perf_counter()
    run = RunDir.create(out, overwrite=overwrite)
    root = run.path
    run.claim("data/")  # made here, by bonetumor: --overwrite removes it whole
    data = create_synthetic_dataset(root / "data", **DEMO_DATA)
    cfg = TrainConfig(data=str(data.root), device=device, **DEMO_TRAIN, **(DEMO_GUIDANCE if guided else {}))
    if select_device(device).type == "cpu" and not cpu_has_fast_bf16():
        cfg.precision = "fp32"
    if epochs is not None:
        cfg.epochs = epochs
    res = fit(cfg, root / "run", verbose=verbose)
    best = res.run_dir / RunDir.BEST
    metrics = evaluate(best, str(data.root), root / "eval", "test", device=device)
    # Grad-CAM over the whole test split (scored against the synthetic masks); panels for a sample.
    ex = explain(best, [data.root / "test"], root / "explain", manifest=data.manifest, device=device,
                 max_panels=DEMO_PANELS)
    report = build_report(res.run_dir, root / "eval", root / "explain", root / RunDir.REPORT)
    return DemoResult(root, res.run_dir, root / "eval", metrics, ex, time.perf_counter() - t0, report)
