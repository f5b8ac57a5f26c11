"""DistributedDataParallel as training wraps the model: which of DDP's per-step costs it keeps."""

import copy

import pytest
import torch
import torch.distributed as dist
from torch import nn

from bonetumor.runtime import distributed as ranks
from bonetumor.train.ranks import data_parallel


@pytest.fixture
def world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 1))


def _syncs_buffers(ddp: nn.parallel.DistributedDataParallel) -> bool:
    return ddp.forward_sync_buffers if hasattr(ddp, "forward_sync_buffers") else ddp.broadcast_buffers


def _train(net: nn.Module, steps: int = 3) -> nn.Module:
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(6, 3, 8, 8, generator=gen), torch.rand(6, 1, generator=gen)
        opt.zero_grad(set_to_none=True)
        nn.functional.binary_cross_entropy_with_logits(net(x), y).backward()
        opt.step()
    return net


def test_a_world_of_one_trains_as_the_bare_model_with_no_buffer_sync_and_bucket_views(world_of_one):
    bare = _train(_net())
    ddp = _train(data_parallel(_net(), torch.device("cpu"), "batch"))
    assert ddp.gradient_as_bucket_view and not _syncs_buffers(ddp)
    for (name, a), b in zip(bare.state_dict().items(), ddp.module.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6), name  # weights and running statistics


def test_buffers_are_sent_each_step_only_where_ranks_can_hold_different_ones(world_of_one, monkeypatch):
    monkeypatch.setattr(ranks, "world_size", lambda: 2)
    cpu = torch.device("cpu")
    # CPU ranks normalise their own batches (no SyncBatchNorm there): rank 0's statistics are sent.
    assert _syncs_buffers(data_parallel(_net(), cpu, "batch"))
    assert not _syncs_buffers(data_parallel(_net(), cpu, "frozen"))  # running statistics never change
    net = _net()
    before = copy.deepcopy(net.state_dict())
    data_parallel(net, cpu, "batch")
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())  # wrapping changes no weight
