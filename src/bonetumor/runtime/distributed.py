"""Running as one of several processes: torch.distributed, as ``torchrun`` (or SLURM's ``srun
torchrun``) starts it.

torchrun sets ``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` in
each process it starts; ``init_distributed`` joins that group (NCCL on CUDA GPUs, gloo on CPUs)
once per process, and everything else here is a no-op when the process runs alone. What the
training loop needs from it:

- ``shard_sampler``: torch's ``DistributedSampler``, reseeded per epoch from (seed, epoch), so
  each rank draws its part of one permutation of the training split;
- ``shard``: a split's indices ``rank::world`` for evaluation, without the sampler's padding, so
  that every image is scored exactly once; ``gather`` brings the parts to every rank;
- ``is_main`` / ``barrier`` / ``broadcast``: rank 0 alone writes files, decisions are its;
- ``together``: bad input found by any rank stops every rank, with one line from rank 0.

Nothing here is a launcher or a collective of its own: torchrun launches, torch.distributed
communicates.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist

from bonetumor.errors import BonetumorError, RankStopped
from bonetumor.files import RunDir


def launched() -> bool:
    """True in a process that torchrun (or an equivalent launcher) started."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_distributed(device_name: str = "auto") -> bool:
    """Join torchrun's process group when launched by it (once per process); True when this
    process is one of a group. NCCL when the ranks use CUDA GPUs, else gloo."""
    if dist.is_available() and dist.is_initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise BonetumorError("this PyTorch build has no torch.distributed; run without torchrun")
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dist.init_process_group("nccl" if cuda else "gloo")
    except Exception as e:  # noqa: BLE001 - a rendezvous failure is one line, not a traceback
        raise BonetumorError(f"could not join the torchrun process group (rank {os.environ.get('RANK')} of "
                             f"{os.environ.get('WORLD_SIZE')}, {os.environ.get('MASTER_ADDR')}:"
                             f"{os.environ.get('MASTER_PORT')}): {e}") from None
    return True


def describe() -> dict | None:
    """This job's ranks for the run record (None for a process on its own)."""
    if not active():
        return None
    return {"world_size": world_size(), "backend": dist.get_backend(),
            "nodes": int(os.environ.get("GROUP_WORLD_SIZE", os.environ.get("NNODES", 1)) or 1)}


def join(device_name: str = "auto") -> bool:
    """``init_distributed`` for a command that may run under torchrun; True on the rank that
    writes and prints (rank 0, or a process on its own)."""
    init_distributed(device_name)
    return is_main()


def active() -> bool:
    """True when this process belongs to a process group (even one of a single rank)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0, or a process on its own: the one that writes files and prints."""
    return rank() == 0


def local_device(device: torch.device) -> torch.device:
    """This rank's own GPU (``cuda:LOCAL_RANK``) for a CUDA run under torchrun."""
    if active() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def barrier() -> None:
    if active() and world_size() > 1:
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (any picklable object)."""
    if not active() or world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def made_by_main(make: Callable[[], Any], sent: Callable[[Any], Any] = lambda value: value) -> Any:
    """``make()`` on rank 0, and on every other rank ``sent(that value)``, broadcast (what they
    need of it). A BonetumorError on rank 0 stops the other ranks too (see ``together``)."""
    value = None
    with together():
        if is_main():
            value = make()
    got = broadcast(sent(value) if is_main() and world_size() > 1 else None)
    return value if is_main() else got


@contextmanager
def together() -> Iterator[None]:
    """A block that every rank runs with no collective inside it (reading inputs, checking the
    output folder): a BonetumorError on any rank ends the block on every rank, rank 0 raising
    the first failing rank's error, to be printed once, and the others ``RankStopped``. Ranks
    that stopped apart would leave the rest waiting in the next collective (or dying with
    gloo's "connection closed"), and each would print its own line. Alone: a plain block."""
    error = None
    try:
        yield
    except BonetumorError as e:
        if not active() or world_size() == 1:
            raise
        error = e
    _agree(error)


def _agree(error: BonetumorError | None) -> None:
    """Every rank's outcome of a block, on every rank; raise as ``together`` says."""
    if not active() or world_size() == 1:
        if error is not None:
            raise error
        return
    said = gather(None if error is None else (isinstance(error, RankStopped), str(error)))
    # a rank's own error before one that only passes another's on; else in rank order
    failed = [line for _, line in sorted((s for s in said if s is not None), key=lambda s: s[0])]
    if not failed:
        return
    if not is_main():
        raise RankStopped(failed[0])
    if error is not None and not isinstance(error, RankStopped):
        raise error
    raise BonetumorError(failed[0]) from None


def gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active() or world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_in_order(ids: Sequence[int], items: Sequence[Any]) -> list[Any]:
    """Every rank's ``items`` (item k at global index ``ids[k]``) as one list in index order,
    on every rank: how each rank's share of a split comes back whole."""
    pairs = [pair for part in gather(list(zip(ids, items))) for pair in part]
    return [item for _, item in sorted(pairs, key=lambda pair: pair[0])]


def all_sum(values: Sequence[float]) -> list[float]:
    """The element-wise sum of ``values`` over ranks (float64)."""
    if not active() or world_size() == 1:
        return [float(v) for v in values]
    # NCCL reduces only CUDA tensors (this rank's device, set at joining); gloo CPU ones.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def shard(n: int) -> range:
    """This rank's indices of ``n`` items (``rank::world``): each item on exactly one rank."""
    return range(rank(), n, world_size())


def shard_sampler(dataset, seed: int) -> torch.utils.data.DistributedSampler:
    """This rank's part of a shuffled pass over ``dataset``; ``set_epoch(epoch)`` reshuffles
    from ``seed + epoch``. The last ranks repeat a few images when the split does not divide
    evenly (torch's padding), so every rank takes the same number of steps."""
    return torch.utils.data.DistributedSampler(dataset, num_replicas=world_size(), rank=rank(), shuffle=True,
                                               seed=seed, drop_last=False)


@contextmanager
def main_first() -> Iterator[bool]:
    """Rank 0 runs the block first (creating folders, exporting a model) while the others wait,
    then the others run it; yields whether this is rank 0. A BonetumorError in rank 0's block
    stops the others before theirs (see ``together``)."""
    if not is_main():
        _agree(None)  # rank 0's block has ended, well or not
        yield False
        return
    error = None
    try:
        yield True
    except BonetumorError as e:
        error = e
    _agree(error)


def output_folder(out: str | Path, overwrite: bool = False, inputs: Iterable = ()) -> RunDir:
    """A command's output folder (``RunDir.create``): rank 0 makes it and records what is written
    there, then the other ranks of a torchrun job write their share into it unrecorded."""
    with main_first() as main:
        return RunDir.create(out, overwrite=overwrite, inputs=inputs) if main else RunDir(out, recording=False)


def launch(nproc: int, argv: list[str]) -> None:
    """Run ``bonetumor *argv`` (less its ``--nproc-per-node``) as ``nproc`` ranks on this machine
    through torchrun's own launcher (``torch.distributed.run``, ``--standalone``), and wait.

    Raises:
        RankStopped: a rank stopped on bad input (exit code 2), and rank 0 has printed why.
        BonetumorError: a rank was killed or crashed: which one, and how.
    """
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = _without_option(argv, "--nproc-per-node")
    with _quiet_torchrun():
        try:
            torchrun.main(["--standalone", "--nproc-per-node", str(nproc), "-m", "bonetumor", *argv])
        except ChildFailedError as e:
            rank, failure = e.get_first_failure()  # the rank that stopped first; the others were stopped for it
            if failure.exitcode == 2:  # the CLI's exit code for bad input, whose line is already out
                raise RankStopped(f"rank {rank} of {nproc} stopped on bad input") from None
            how = (f"was killed by {failure.signal_name()}" if failure.exitcode < 0
                   else f"stopped with exit code {failure.exitcode}")
            raise BonetumorError(f"rank {rank} of {nproc} {how}, so torchrun stopped the job") from None


@contextmanager
def _quiet_torchrun() -> Iterator[None]:
    """torchrun's launcher logs its set-up (OMP_NUM_THREADS) and a failed rank's exit in lines
    of its own; ``launch`` says what matters in one line instead, so they are held back."""
    import logging

    names = [n for n in list(logging.Logger.manager.loggerDict) if n.startswith("torch.distributed")]
    before = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for n, level in before.items():
            logging.getLogger(n).setLevel(level)


def _without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == flag:
            skip = True
        elif not a.startswith(flag + "="):
            out.append(a)
    return out


def close_distributed() -> None:
    """Leave the process group (at the end of a command run under torchrun)."""
    if active():
        dist.destroy_process_group()
