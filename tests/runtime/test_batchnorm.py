import copy
import importlib
from contextlib import contextmanager, nullcontext

import numpy as np
import pytest
import torch
import yaml
from conftest import tiny_config
from torch import nn

from bonetumor import fit
from bonetumor.data.layouts import discover
from bonetumor.errors import BonetumorError
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import write_checkpoint
from bonetumor.model.serialization import read_torch_file
from bonetumor.runtime import batchnorm
from bonetumor.runtime.batchnorm import (
    conv_bn_pairs,
    fold_batchnorm,
    folded_batchnorm,
    inference_folded,
    resolve_bn_statistics,
)
from bonetumor.train import loop as train_loop


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


@pytest.mark.slow
def test_fit_with_frozen_statistics(tiny_data, tmp_path, monkeypatch):
    # Pretrained weights of our own: a run's checkpoint, with statistics that are not 0 and 1.
    pre = fit(tiny_config(tiny_data, epochs=1, audit=False), tmp_path / "pre", verbose=False)
    weights = str(pre.run_dir / "best.pt")
    start = read_torch_file(weights)["model"]
    runs = {}
    for name in ("folded", "unfolded"):
        if name == "unfolded":  # the same training without the folding: the result must not change
            monkeypatch.setattr(train_loop, "folded_batchnorm", lambda net: nullcontext(0))
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
    # Folding changes fp32 rounding, and the parting grows with every Adam step: 1.1e-4 apart after two
    # epochs on one CPU, nothing on another. The exact checks are the float64 ones above; this one says
    # that fit wires the folding in without changing what it learns (a folded shift 10% off fails it).
    for a, b in zip(runs["folded"].history, runs["unfolded"].history):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
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
    write_checkpoint(run / "last.pt", state)
    fit(tiny_config(tiny_data, epochs=2, weights="imagenet"), run, resume=True, verbose=False)  # as saved
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


@pytest.mark.parametrize("name, folded", [("resnet50", 53), ("efficientnet_b0", 49), ("densenet121", 59)])
def test_inference_folding_gives_the_unfolded_outputs(name, folded):
    model = _pretrained_like(name).eval()
    x = torch.randn(3, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        ref = model(x)
        with inference_folded(model) as n:
            assert n == folded
            out = model(x)
        assert torch.allclose(out, ref, rtol=1e-10, atol=1e-12) and ref.std() > 0
    model.train()  # frozen statistics: still folded while training
    with inference_folded(model) as n:
        assert n == folded
    model.bn_statistics = "batch"
    model.train()  # batch statistics: nothing may be folded
    with inference_folded(model) as n:
        assert n == 0


def test_inference_folding_inside_training_folding_folds_the_rest_and_leaves_the_outer_pairs():
    model = create_model("resnet50", "none", freeze="backbone", unfreeze=["layer4"]).double()
    model.bn_statistics = "batch"
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    with torch.inference_mode():
        ref = model.eval()(x)
    with folded_batchnorm(model) as outer:  # as fit trains, then validates inside the same block
        assert outer == 43
        model.eval()
        with torch.inference_mode(), inference_folded(model) as inner:
            assert inner == 10  # layer4's, in eval mode now
            assert torch.allclose(model(x), ref, rtol=1e-10, atol=1e-12)
        assert type(model.backbone.layer4[0].conv1) is nn.Conv2d  # the inner block's pairs restored
        assert type(model.backbone.layer1[0].conv1).__name__ == "_FoldedConv2d"  # the outer's kept
    assert all(type(m) in (nn.Conv2d, nn.BatchNorm2d) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d)))


def test_pairs_are_traced_once_per_module_and_again_when_it_changes(monkeypatch):
    model = create_model("resnet50", "none", freeze="none")
    first = conv_bn_pairs(model.backbone)
    traces = []
    real = batchnorm._Tracer.trace
    monkeypatch.setattr(batchnorm._Tracer, "trace", lambda self, m: traces.append(m) or real(self, m))
    assert conv_bn_pairs(model.backbone) == first and traces == []
    model.backbone.layer1[0].bn1 = nn.Identity()  # a pair gone: the cached list no longer holds
    assert len(conv_bn_pairs(model.backbone)) == 52 and len(traces) == 1


def _spy(monkeypatch, module, counts, fold=True):
    """Replace ``module``'s ``inference_folded`` by one that records how many BatchNorms it folded
    (or, with ``fold=False``, folds none)."""
    @contextmanager
    def spy(model):
        with (inference_folded(model) if fold else nullcontext(0)) as n:
            counts.append(n)
            yield n

    monkeypatch.setattr(module, "inference_folded", spy)


def test_predict_evaluate_features_and_deletion_scores_run_folded_with_the_same_results(tiny_run, tiny_data, monkeypatch):
    images = sorted((tiny_data / "test").rglob("*.png"))[:6]
    samples = discover(tiny_data).split("test")[:6]
    cfg = tiny_config(tiny_data)
    model = create_model("resnet50", "none", freeze="none")
    with torch.no_grad():  # statistics that are not 0 and 1, so that folding them matters
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(6, 3, 32, 32)
    loader = [(x, torch.tensor([0, 1, 0, 1, 0, 1]), torch.arange(6))]
    # Every inference path folds through runtime.forward; deletion scores fold themselves.
    forward, scores = (importlib.import_module(f"bonetumor.{m}") for m in ("runtime.forward", "explain.scores"))
    from bonetumor.inference import score_loader
    from bonetumor.predict import predict
    from bonetumor.runtime.features import extract_features
    from bonetumor.task import Task

    maps, target = torch.rand(6, 32, 32), torch.tensor([0, 1, 0, 1, 0, 1])
    cpu, task = torch.device("cpu"), Task(("normal", "cancer"))
    out = {}
    for fold in (True, False):
        counts = []
        for mod in (forward, scores):
            _spy(monkeypatch, mod, counts, fold)
        rows = predict(tiny_run / "best.pt", images, device="cpu", engine="torch", compile_mode="off")
        with forward.Forward(model, cpu) as f:
            preds = score_loader(f, loader, task)
        feats = extract_features(model.backbone, samples, cfg, 1, cpu)
        dele, ins = scores.deletion_insertion(model.eval(), x, maps, target, steps=2)
        out[fold] = (np.array([r["probability"] for r in rows]), preds.probs, feats, dele, ins)
        assert counts == ([53] * 4 if fold else [0] * 4)
    for a, b in zip(out[True], out[False]):  # fp32 rounding apart, over 50 layers
        a, b = np.asarray(a), np.asarray(b)
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
    assert out[True][2].std() > 0 and len(out[True][0]) == 6


def test_a_module_without_batchnorms_is_never_traced():
    # An exported model's runner is a module whose forward hands its input to another runtime:
    # tracing would hand it a placeholder (ONNX Runtime crashed the process with a bus error).
    seen = []

    class Runner(nn.Module):
        def forward(self, x):
            seen.append(type(x))
            return x

    with inference_folded(Runner()) as n:
        assert n == 0
    assert seen == []


def test_inference_folds_each_weight_once_until_a_source_changes(monkeypatch):
    # Folding 25 M weights on every call would cost a third of a batch-of-one forward.
    model = _pretrained_like().eval()
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    folds = []
    real = batchnorm._FoldedConv2d._fold
    monkeypatch.setattr(batchnorm._FoldedConv2d, "_fold", lambda self: folds.append(self) or real(self))
    with torch.inference_mode(), inference_folded(model):
        first = model(x)
        assert len(folds) == 53
        assert torch.equal(model(x), first) and len(folds) == 53  # reused
    with torch.no_grad():
        model.backbone.layer1[0].bn2.weight.mul_(2.0)  # in place, as an optimizer step changes it
    with torch.inference_mode():
        ref = model(x)
        with inference_folded(model):
            model(x)
            assert len(folds) == 106  # a new block folds afresh
            model.backbone.layer1[0].bn2.weight.mul_(0.5)
            ref2 = model(x)
            assert len(folds) == 107  # only the changed pair again
    with torch.inference_mode():
        assert torch.allclose(ref2, first, rtol=1e-10, atol=1e-12) and not torch.allclose(ref, first)
    # While the folded weights are trained, they are folded on every call (gradients must reach the sources)
    model.train()
    with inference_folded(model):
        model(x).sum().backward()
        model(x)
    assert len(folds) == 107 + 2 * 53 and model.backbone.conv1.weight.grad is not None
    assert not any("_fold_cache" in m.__dict__ for m in model.modules())  # dropped on exit
