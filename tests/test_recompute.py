import copy
from contextlib import nullcontext

import pytest
import torch
from conftest import tiny_config

from bonetumor import fit
from bonetumor import recompute as rc
from bonetumor.errors import BonetumorError
from bonetumor.models import create_model


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
        assert torch.allclose(rc.recompute_forward(plain.backbone, name, 0, x), plain.backbone(x), atol=1e-6)


def test_without_restoring_batchnorm_the_recomputation_would_count_batches_twice(monkeypatch):
    monkeypatch.setattr(rc, "_keep_batchnorm_statistics", lambda mods: nullcontext())
    plain, rec = _pair("resnet50", 1)
    x = torch.randn(2, 3, 64, 64)
    _step(plain, x), _step(rec, x)
    assert plain.backbone.bn1.num_batches_tracked.item() == 1
    assert rec.backbone.bn1.num_batches_tracked.item() == 2
    assert not torch.equal(plain.backbone.bn1.running_mean, rec.backbone.bn1.running_mean)


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


def test_frozen_stages_are_not_recomputed(monkeypatch):
    calls = []
    monkeypatch.setattr(rc, "checkpoint", lambda fn, mods, x, **kw: calls.append(len(mods)) or fn(mods, x))
    model = create_model("resnet50", "none", freeze="backbone", unfreeze=["layer2"]).train()
    model.recompute_stages = 3
    model(torch.randn(2, 3, 64, 64))
    assert calls == [1]  # layer2 only: nothing before it trains, so the stem and layer1 keep nothing


def test_fit_with_recomputation_gives_the_same_model(tiny_data, tmp_path):
    runs = [fit(tiny_config(tiny_data, epochs=1, recompute_stages=n, audit=False), tmp_path / f"r{n}", verbose=False)
            for n in (0, 3)]
    a, b = (torch.load(r.run_dir / "best.pt", weights_only=True)["model"] for r in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_recompute_stages_out_of_range_is_refused(tiny_data, tmp_path):
    with pytest.raises(BonetumorError, match="--recompute-stages must be 0 to 5"):
        fit(tiny_config(tiny_data, recompute_stages=6), tmp_path / "r", verbose=False)
