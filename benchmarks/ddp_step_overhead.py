"""What one DistributedDataParallel training step costs against a plain one, with loading and the
launcher taken out: the companion of ``ddp_overhead.py``, whose end-to-end figure also holds the
data loader, torchrun's agent and the machine's drift.

    python benchmarks/ddp_step_overhead.py [--device cuda] [--size 224] [--batch-size 32] [--blocks 15] [--steps 10]

One process joins a process group of one (NCCL on a GPU, gloo on a CPU) and builds two identical
ResNet50 classifiers as ``train`` does (random init, all layers trained, channels_last, fused
Adam, the run's autocast): one plain, one wrapped by bonetumor's own ``data_parallel`` (the
wrapper ``train`` uses under torchrun: its buckets, all-reduce hooks and buffer rule). Each
step is the training loop's: forward, loss, backward, optimizer step and the loop's three host
reads (loss, its check, accuracy), on one fixed batch already on the device. Blocks of
``--steps`` steps alternate between the two (which goes first alternates too), so drift moves
both alike; the figure is the median over blocks of plain time / DDP time (goal on a GPU: >= 0.95).
Results: ``benchmarks/results/ddp_step_overhead_<device>[_no_reads].json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from ceiling import _sync

from bonetumor.model.backbones import create_model
from bonetumor.runtime.device import select_device, to_device
from bonetumor.runtime.precision import autocast, autocast_dtype, candidate_precision
from bonetumor.train.ranks import data_parallel


def _join_group_of_one(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_device(device)
    store = Path(tempfile.mkdtemp(prefix="bonetumor-ddp-step-")) / "store"  # a file rendezvous: no port to find
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{store}",
                            rank=0, world_size=1)


def _step(net, optimizer, context, loss_fn, x, y, host_reads: bool) -> None:
    """One step of the training loop (train/loop.py), its host reads included unless asked not to."""
    with context:
        logits = net(x)
        loss = loss_fn(logits.float().squeeze(1), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    if not host_reads:  # the host may run ahead of the device: its per-step work hides behind the device's
        return
    if not torch.isfinite(loss).item():
        raise SystemExit("loss became NaN")
    loss.item()
    ((logits.squeeze(1) > 0).float() == y).sum().item()


def _timed(fn, steps: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    _sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=15, help="timed blocks of each kind")
    ap.add_argument("--steps", type=int, default=10, help="steps per block")
    ap.add_argument("--precision", default="auto", help="auto: the run's reduced precision on this device")
    ap.add_argument("--no-host-reads", action="store_true",
                    help="leave out the loop's three per-step reads of results (each waits for the device)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = select_device(args.device)
    precision = candidate_precision(device) if args.precision == "auto" else args.precision
    _join_group_of_one(device)
    torch.manual_seed(0)
    base = create_model("resnet50", "none", "none", n_outputs=1)
    models = {}
    for name in ("plain", "ddp"):  # two copies made alike, so neither has the other's memory layout
        m = copy.deepcopy(base).to(device).to(memory_format=torch.channels_last).train()
        net = data_parallel(m, device, "batch") if name == "ddp" else m
        opt = torch.optim.Adam(m.parameters(), lr=1e-4, fused=device.type in ("cpu", "cuda"))
        models[name] = (net, opt, m)
    x = to_device(torch.randn(args.batch_size, 3, args.size, args.size), device)
    y = (torch.arange(args.batch_size) % 2).float().to(device)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    context = autocast(precision, device)
    steps = {k: (lambda k=k: _step(models[k][0], models[k][1], context, loss_fn, x, y, not args.no_host_reads)) for k in models}
    for k in steps:  # warm-up: cuDNN's algorithm search, the allocator, DDP's first-iteration bucket rebuild
        _timed(steps[k], 3, device)
    seconds: dict[str, list[float]] = {"plain": [], "ddp": []}
    for b in range(args.blocks):
        for k in (("plain", "ddp") if b % 2 == 0 else ("ddp", "plain")):
            seconds[k].append(_timed(steps[k], args.steps, device))
        print(b, {k: round(args.batch_size * args.steps / v[-1], 1) for k, v in seconds.items()}, "images/s", flush=True)
    dist.destroy_process_group()
    ips = {k: [round(args.batch_size * args.steps / s, 2) for s in v] for k, v in seconds.items()}
    out = {"benchmark": "ddp_step_overhead", "date": time.strftime("%Y-%m-%d"), "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
           "torch": torch.__version__, "precision": precision,
           "dtype": str(autocast_dtype(precision, device)), "size": args.size, "batch_size": args.batch_size,
           "blocks": args.blocks, "steps_per_block": args.steps,
           "host_reads": not args.no_host_reads, "threads": torch.get_num_threads(),
           "images_per_second": ips, "median_images_per_second": {k: statistics.median(v) for k, v in ips.items()},
           "ddp_over_plain": round(statistics.median(p / d for p, d in zip(seconds["plain"], seconds["ddp"])), 4)}
    path = Path(args.out or f"benchmarks/results/ddp_step_overhead_{device.type}{'_no_reads' if args.no_host_reads else ''}.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print("DDP step / plain step (median of paired blocks):", out["ddp_over_plain"], file=sys.stderr)


if __name__ == "__main__":
    main()
