import copy

import pytest
import torch
from conftest import tiny_config
from torch import nn

from bonetumor import fit
from bonetumor.errors import BonetumorError
from bonetumor.model.backbones import BACKBONES, create_model
from bonetumor.runtime import recompute as rc


def _step(model, x, seed=1):
    torch.manual_seed(seed)  # efficientnet's stochastic depth draws in training mode
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach()


def _pair(name, stages):
    torch.manual_seed(0)
    plain = create_model(name, "none", freeze="none").train()
    rec = copy.deepcopy(plain)
    rec.recompute_stages = stages
    return plain, rec


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "efficientnet_b0"])
def test_recomputed_training_step_equals_the_plain_one(name):
    plain, rec = _pair(name, 5)
    x = torch.randn(3, 3, 64, 64)
    assert torch.equal(_step(plain, x), _step(rec, x))
    for (n, p), q in zip(plain.named_parameters(), rec.parameters()):
        assert torch.allclose(p.grad, q.grad, rtol=0, atol=1e-7), n
    # running statistics counted once per batch, as without recomputation
    for (n, a), b in zip(plain.named_buffers(), rec.buffers()):
        assert torch.equal(a, b), n
    plain.eval()
    with torch.no_grad():  # the stage list follows torchvision's own forward
        spec = BACKBONES[name]
        assert torch.allclose(rc.recompute_forward(plain.backbone, spec["stages"], 0, x, spec["relu_tail"]),
                              plain.backbone(x), atol=1e-6)


def test_recomputation_counts_each_batch_once_where_torch_alone_counts_it_twice():
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    alone = nn.BatchNorm2d(3).train()  # torch's checkpoint runs the forward again in backward
    torch.utils.checkpoint.checkpoint(alone, x, use_reentrant=False).sum().backward()
    assert alone.num_batches_tracked.item() == 2
    net = nn.Module()
    net.bn = nn.BatchNorm2d(3).train()
    rc.recompute_forward(net, [("bn",)], 1, x).sum().backward()
    plain = nn.BatchNorm2d(3).train()
    plain(x)
    assert net.bn.num_batches_tracked.item() == 1
    assert torch.equal(net.bn.running_mean, plain.running_mean) and torch.equal(net.bn.running_var, plain.running_var)


def _saved_bytes(model, x):
    storages = {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):  # activations only: the weights are kept either way
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


def test_recomputed_stages_keep_less_for_backward():
    model = create_model("resnet50", "none", freeze="none").train()
    x = torch.randn(2, 3, 128, 128)
    kept = {}
    for n in (0, 1, 2, 5):
        model.recompute_stages = n
        kept[n] = _saved_bytes(model, x)
    # the stem's 64x64 maps and max-pool indices, then layer1's 32x32 ones
    assert kept[1] < 0.92 * kept[0] and kept[2] < 0.7 * kept[1] and kept[5] < 0.1 * kept[0]
    model.eval()
    assert _saved_bytes(model, x) == _saved_bytes(create_model("resnet50", "none", freeze="none").eval(), x)


def test_frozen_stages_are_not_recomputed():
    model = create_model("resnet50", "none", freeze="backbone", unfreeze=["layer2"]).train()
    model.recompute_stages = 3
    runs = {name: 0 for name in ("conv1", "layer1", "layer2", "layer3")}
    for name in runs:
        getattr(model.backbone, name).register_forward_pre_hook(lambda m, i, name=name: runs.__setitem__(name, runs[name] + 1))
    model(torch.randn(2, 3, 64, 64)).sum().backward()
    # layer2 only runs again in backward: nothing before it trains, so the stem and layer1 keep
    # nothing to recompute, and layer3 is past the recomputed stages
    assert runs == {"conv1": 1, "layer1": 1, "layer2": 2, "layer3": 1}


def test_fit_with_recomputation_gives_the_same_model(tiny_data, tmp_path):
    runs = [fit(tiny_config(tiny_data, epochs=1, recompute_stages=n, audit=False), tmp_path / f"r{n}", verbose=False)
            for n in (0, 3)]
    a, b = (torch.load(r.run_dir / "best.pt", weights_only=True)["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recompute_stages_out_of_range_is_refused(tiny_data, tmp_path):
    with pytest.raises(BonetumorError, match="--recompute-stages must be 0 to 5"):
        fit(tiny_config(tiny_data, recompute_stages=6), tmp_path / "r", verbose=False)
