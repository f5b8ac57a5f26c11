"""How long a user waits for the command line: ``bonetumor --help``, ``--version``, and ``predict``
on one image, beside a bare ``import torch, torchvision`` measured in the same run.

Goals: ``--help`` <= 1 s; ``predict`` on one PNG <= 1.5 s beyond the bare import (which every
command that runs a model pays). Each command is a fresh process, as a user starts it; the
repetitions alternate (import, help, predict, ...) so that a drifting machine affects all alike,
and medians are reported. The checkpoint is a ResNet50 at 224 px with random weights (timing does
not depend on them), stored channels_last as ``fit`` stores its models; Python's bytecode cache
is allowed (as after any first run). On a machine whose disk is slow and whose page cache is small,
each command re-reads files that importing torch pushed out: the per-pair differences spread
widely, hence the many repeats.

    python benchmarks/cli_startup.py [--repeats 11] [--out benchmarks/results/cli_startup_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GOALS = {"help": 1.0, "predict_beyond_import": 1.5}


def _seconds(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cli_startup_cpu.json")
    ap.add_argument("--repeats", type=int, default=11)
    args = ap.parse_args()
    import numpy as np
    import torch

    from bonetumor.config import TrainConfig
    from bonetumor.data.writers import write_png
    from bonetumor.files import atomic_write_json
    from bonetumor.model.backbones import create_model
    from bonetumor.model.checkpoint import save_checkpoint

    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    exe = Path(sys.executable).parent / "bonetumor"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        env["BONETUMOR_CACHE_DIR"] = str(tmp / "cache")  # no export from an earlier run changes the engine
        torch.manual_seed(0)
        # channels_last, as ``fit`` trains and saves a model
        model = create_model("resnet50", "none").to(memory_format=torch.channels_last)
        save_checkpoint(tmp / "model.pt", model, TrainConfig(data="x", precision="fp32"), ["normal", "cancer"])
        image = tmp / "scan.png"
        write_png(image, np.random.default_rng(0).random((512, 512)))
        commands = {
            "import_torch_torchvision": [sys.executable, "-c", "import torch, torchvision"],
            "help": [str(exe), "--help"],
            "version": [str(exe), "--version"],
            "predict_one_image": [str(exe), "predict", str(tmp / "model.pt"), str(image), "--device", "cpu"],
        }
        for cmd in commands.values():  # once each, untimed: bytecode caches, the page cache
            _seconds(cmd, env)
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(args.repeats):
            for name, cmd in commands.items():
                times[name].append(_seconds(cmd, env))
    med = {k: statistics.median(v) for k, v in times.items()}
    beyond = [p - i for p, i in zip(times["predict_one_image"], times["import_torch_torchvision"])]
    result = {
        "seconds": {k: [round(x, 3) for x in v] for k, v in times.items()},
        "median_seconds": {k: round(v, 3) for k, v in med.items()},
        "predict_beyond_import_median_seconds": round(statistics.median(beyond), 3),
        "goals_seconds": GOALS,
        "met": {"help": med["help"] <= GOALS["help"],
                "predict_beyond_import": statistics.median(beyond) <= GOALS["predict_beyond_import"]},
        "repeats": args.repeats, "python": sys.version.split()[0], "torch": torch.__version__, "cpus": os.cpu_count(),
    }
    atomic_write_json(args.out, result)
    print(json.dumps(result["median_seconds"]), "predict beyond import:", result["predict_beyond_import_median_seconds"])


if __name__ == "__main__":
    main()
