import copy
from contextlib import nullcontext

import pytest
import torch
import yaml
from conftest import tiny_config
from torch import nn

from bonetumor import fit
from bonetumor import train as train_mod
from bonetumor.batchnorm import conv_bn_pairs, fold_batchnorm, folded_batchnorm, resolve_bn_statistics
from bonetumor.errors import BonetumorError
from bonetumor.models import create_model
from bonetumor.serialization import read_torch_file


def _pretrained_like(name="resnet50", seed=0):
    """A model whose running statistics are not the initial 0 and 1, so that folding them matters."""
    torch.manual_seed(seed)
    model = create_model(name, "none", freeze="none")
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    model.bn_statistics = "frozen"
    return model.double()


def _step(model, x):
    torch.manual_seed(1)  # efficientnet's stochastic depth draws in training mode
    model.train()
    loss = model(x).square().mean()
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("name, folded, total", [("resnet50", 53, 53), ("efficientnet_b0", 49, 49),
                                                 ("densenet121", 59, 121)])
def test_pairs_are_the_convolutions_feeding_a_batchnorm(name, folded, total):
    model = create_model(name, "none", freeze="none")
    pairs = conv_bn_pairs(model.backbone)
    assert len(pairs) == folded
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == total
    named = dict(model.backbone.named_modules())
    for conv, bn in pairs:
        assert named[conv].out_channels == named[bn].num_features
    if name == "resnet50":
        assert ("conv1", "bn1") in pairs and ("layer1.0.downsample.0", "layer1.0.downsample.1") in pairs
    if name == "densenet121":  # its other BatchNorms come before their convolution
        assert ("features.denseblock1.denselayer1.conv1", "features.denseblock1.denselayer1.norm2") in pairs
        assert not any(bn.endswith("norm1") for _, bn in pairs)


@pytest.mark.parametrize("name", ["resnet50", "efficientnet_b0", "densenet121"])
def test_folded_training_step_equals_the_unfolded_one(name):
    # The reference is PyTorch's own BatchNorm in eval mode, after the convolution.
    plain = _pretrained_like(name)
    folded = copy.deepcopy(plain)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = _step(plain, x)
    with fold_batchnorm(folded.backbone) as n:
        assert n > 40
        out = _step(folded, x)
    assert torch.allclose(out, ref, rtol=1e-10, atol=0)
    for (k, p), q in zip(plain.named_parameters(), folded.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-7, atol=1e-12), k
    for (k, a), b in zip(plain.named_buffers(), folded.buffers()):  # statistics untouched by both
        assert torch.equal(a, b), k
    assert plain.backbone.state_dict()[next(k for k in plain.backbone.state_dict() if "running_mean" in k)].abs().max() > 0.1


def test_folding_changes_only_classes_and_restores_them_even_after_an_error():
    model = _pretrained_like()
    keys = list(model.state_dict())
    with pytest.raises(ValueError):
        with fold_batchnorm(model.backbone):
            assert type(model.backbone.conv1).__name__ == "_FoldedConv2d"
            assert list(model.state_dict()) == keys  # the BatchNorm is not registered twice
            raise ValueError
    assert type(model.backbone.conv1) is nn.Conv2d and type(model.backbone.bn1) is nn.BatchNorm2d
    assert not hasattr(model.backbone.conv1, "_bn")
    with fold_batchnorm(model.backbone):
        model.backbone.bn1.train()
        with pytest.raises(RuntimeError, match="training mode"):  # batch statistics cannot be folded
            model(torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_folded_step_keeps_far_less_for_backward():
    model = create_model("resnet50", "none", freeze="none")
    model.bn_statistics = "frozen"
    model.train()
    x = torch.randn(2, 3, 96, 96)

    def saved_bytes():  # activations kept for backward (the folded weights, one copy, are not counted)
        storages = {}

        def pack(t):
            if t.dim() == 4 and t.shape[0] == len(x):
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(storages.values())

    unfolded = saved_bytes()
    with folded_batchnorm(model) as n:
        assert n == 53
        folded = saved_bytes()
    # each BatchNorm kept its input (the convolution's output); folded, nothing but the convolutions' inputs
    assert folded < 0.65 * unfolded


def test_only_batchnorms_that_keep_their_statistics_are_folded():
    model = create_model("resnet50", "none", freeze="backbone", unfreeze=["layer4"])
    model.bn_statistics = "batch"
    with folded_batchnorm(model) as n:  # layer4's BatchNorms train with batch statistics
        assert n == 53 - 10
        model.train()
        assert model.backbone.layer4[0].bn1.training and not model.backbone.bn1.training
    with folded_batchnorm(model.head) as n:
        assert n == 0


def test_auto_is_frozen_from_pretrained_weights_and_batch_from_random_ones():
    assert resolve_bn_statistics("auto", "none") == "batch"
    assert resolve_bn_statistics("auto", "imagenet") == "frozen"
    assert resolve_bn_statistics("auto", "some/weights.pt") == "frozen"
    assert resolve_bn_statistics("batch", "imagenet") == "batch"


def test_fit_with_frozen_statistics(tiny_data, tmp_path, monkeypatch):
    # Pretrained weights of our own: a run's checkpoint, with statistics that are not 0 and 1.
    pre = fit(tiny_config(tiny_data, epochs=1, audit=False), tmp_path / "pre", verbose=False)
    weights = str(pre.run_dir / "best.pt")
    start = read_torch_file(weights)["model"]
    runs = {}
    for name in ("folded", "unfolded"):
        if name == "unfolded":  # the same training without the folding: the result must not change
            monkeypatch.setattr(train_mod, "folded_batchnorm", lambda net: nullcontext(0))
        # A small learning rate: Adam turns fp32 rounding in near-zero gradients into full-size
        # steps, and at 1e-3 the two runs part after a few (in float64 they agree step by step).
        runs[name] = fit(tiny_config(tiny_data, weights=weights, epochs=2, lr=1e-5, audit=False), tmp_path / name,
                         verbose=False)
    cfg = yaml.safe_load((runs["folded"].run_dir / "config.yaml").read_text())
    assert cfg["bn_statistics"] == "frozen"  # auto, resolved and recorded
    end = read_torch_file(runs["folded"].run_dir / "last.pt")["model"]
    stats = [k for k in end if k.endswith("running_mean") or k.endswith("running_var")]
    assert len(stats) == 106 and all(torch.equal(end[k], start[k]) for k in stats)
    assert not torch.equal(end["backbone.conv1.weight"], start["backbone.conv1.weight"])  # yet it trained
    assert not torch.equal(end["backbone.bn1.weight"], start["backbone.bn1.weight"])
    for a, b in zip(runs["folded"].history, runs["unfolded"].history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
    assert runs["folded"].history[1]["train_loss"] != runs["folded"].history[0]["train_loss"]
    # batch statistics, from random weights by default: the statistics do move
    plain = read_torch_file(pre.run_dir / "last.pt")
    assert plain["config"]["bn_statistics"] == "batch"
    assert not torch.equal(plain["model"]["backbone.bn1.running_mean"], torch.zeros(64))


def test_resuming_a_run_saved_before_the_option_keeps_batch_statistics(tiny_data, tmp_path):
    run = fit(tiny_config(tiny_data, epochs=1, audit=False), tmp_path / "r", verbose=False).run_dir
    state = read_torch_file(run / "last.pt")
    del state["config"]["bn_statistics"]
    state["config"]["weights"] = "imagenet"  # auto would now mean frozen
    torch.save(state, run / "last.pt")
    fit(tiny_config(tiny_data, epochs=2), run, resume=True, verbose=False)
    assert yaml.safe_load((run / "config.yaml").read_text())["bn_statistics"] == "batch"


def test_bad_bn_statistics_is_refused(tiny_data, tmp_path):
    with pytest.raises(BonetumorError, match="--bn-statistics must be auto, batch or frozen"):
        fit(tiny_config(tiny_data, bn_statistics="running"), tmp_path / "r", verbose=False)


def test_folding_and_recomputed_stages_together_give_the_same_step():
    plain = _pretrained_like()
    both = copy.deepcopy(plain)
    both.recompute_stages = 2
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    ref = _step(plain, x)
    with folded_batchnorm(both) as n:
        assert n == 53
        assert torch.allclose(_step(both, x), ref, rtol=1e-10, atol=0)
    for (k, p), q in zip(plain.named_parameters(), both.parameters()):
        assert torch.allclose(q.grad, p.grad, rtol=1e-7, atol=1e-12), k
