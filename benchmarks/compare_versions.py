"""Run the benchmarks on two versions of the code, alternately, and compare their figures.

    python benchmarks/compare_versions.py --before REV [--after HEAD] [--only NAME,NAME] [--keras-python PY]

Each version is checked out with ``git worktree`` into a temporary folder, and each benchmark of
that version runs its own script with that version's package first on the path, writing its JSON
to OUT/<benchmark>/<before|after>.json. Before and after alternate, benchmark by benchmark, so that
both see the same machine. OUT/summary.json then lists every number the two results share, with
after/before, and for the numbers a benchmark repeats (a list of per-repetition values), the
before run's own spread (max/min - 1): a change within that spread is run-to-run noise.
Memory figures are measured by the benchmarks that name them; speed figures are ratios within
one run wherever a benchmark reports a ceiling or a baseline beside them.
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

ROOT = Path(__file__).resolve().parents[1]
# The CPU benchmarks (gpu.py needs CUDA; keras_original.py a TensorFlow environment: --keras-python).
BENCHMARKS = ["resnet50_throughput", "onnx_inference", "gradcam_speed", "frozen_training", "data_loader",
              "training_memory", "explain_memory", "large_image_memory", "serve_load"]


def _worktree(rev: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(where), rev], check=True,
                   capture_output=True)
    return where


def _run(tree: Path, name: str, out: Path, extra: list[str]) -> dict:
    """One benchmark of one version: its JSON, and how long it took."""
    env = {**os.environ, "PYTHONPATH": str(tree / "src")}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(tree / "benchmarks" / f"{name}.py"), "--out", str(out), *extra],
                          cwd=tree, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:], "seconds": round(seconds, 1)}
    return {"result": json.loads(out.read_text()), "seconds": round(seconds, 1)}


def _leaves(x, path: str = ""):
    """(path, number or list of numbers) for every numeric leaf of a JSON value."""
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _leaves(v, f"{path}/{k}")
    elif isinstance(x, list) and x and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x):
        yield path, x
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _leaves(v, f"{path}/{i}")
    elif isinstance(x, (int, float)) and not isinstance(x, bool):
        yield path, x


def compare(before: dict, after: dict) -> dict:
    """{path: {"before", "after", "ratio", "before_spread"}} for the numbers both results hold."""
    a, b = dict(_leaves(before)), dict(_leaves(after))
    out = {}
    for path in a.keys() & b.keys():
        x, y = a[path], b[path]
        spread = None
        if isinstance(x, list) and isinstance(y, list):
            spread = max(x) / min(x) - 1 if min(x) > 0 else None
            x, y = statistics.median(x), statistics.median(y)
        elif isinstance(x, list) or isinstance(y, list):
            continue
        out[path] = {"before": x, "after": y, "ratio": round(y / x, 4) if x else None,
                     "before_spread": round(spread, 4) if spread is not None else None}
    return dict(sorted(out.items()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="Git revision of the first version.")
    ap.add_argument("--after", default="HEAD")
    ap.add_argument("--only", default=",".join(BENCHMARKS), help="Comma-separated benchmark names.")
    ap.add_argument("--keras-python", default=None, help="Also run keras_original with this TensorFlow Python.")
    ap.add_argument("--out", default="benchmarks/results/versions")
    args = ap.parse_args()
    names = [n for n in args.only.split(",") if n]
    out = Path(args.out)
    summary: dict = {"before": args.before, "after": args.after, "date": time.strftime("%Y-%m-%d"), "benchmarks": {}}
    if (out / "summary.json").is_file():  # a later call for more benchmarks adds to the same comparison
        earlier = json.loads((out / "summary.json").read_text())
        if (earlier["before"], earlier["after"]) == (args.before, args.after):
            summary["benchmarks"] = earlier["benchmarks"]
    # Resolved once, so that a later call with the same --after name (HEAD) is told apart by its commit.
    commits = {side: subprocess.run(["git", "-C", str(ROOT), "rev-parse", rev], check=True, capture_output=True,
                                    text=True).stdout.strip() for side, rev in (("before", args.before), ("after", args.after))}
    with tempfile.TemporaryDirectory() as tmp:
        trees = {side: _worktree(commit, Path(tmp) / side) for side, commit in commits.items()}
        try:
            for name in names + (["keras_original"] if args.keras_python else []):
                extra = ["--keras-python", args.keras_python] if name == "keras_original" else []
                runs = {}
                (out / name).mkdir(parents=True, exist_ok=True)
                for side in ("before", "after"):
                    runs[side] = _run(trees[side], name, (out / name / f"{side}.json").resolve(), extra)
                    print(name, side, runs[side].get("error") or f"{runs[side]['seconds']} s", flush=True)
                entry = {side: {"commit": commits[side], "seconds": r["seconds"], **({"error": r["error"]} if "error" in r else {})}
                         for side, r in runs.items()}
                if all("result" in r for r in runs.values()):
                    entry["figures"] = compare(runs["before"]["result"], runs["after"]["result"])
                summary["benchmarks"][name] = entry
                (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        finally:
            for tree in trees.values():
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


if __name__ == "__main__":
    main()
