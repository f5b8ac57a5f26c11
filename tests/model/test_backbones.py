import urllib.error

import pytest
import torch
import torchvision
from torch import nn

from bonetumor.errors import BonetumorError
from bonetumor.model.backbones import count_parameters, create_model


def test_resnet50_head_matches_the_original():
    m = create_model("resnet50", "none")
    layers = list(m.head)
    assert [type(l) for l in layers] == [nn.Linear, nn.ReLU, nn.Dropout, nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].p, layers[3].out_features) == (2048, 256, 0.5, 1)
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 1)


def test_frozen_backbone_trains_only_the_head_and_keeps_bn_in_eval():
    m = create_model("resnet50", "none", freeze="backbone")
    trainable, total = count_parameters(m)
    assert trainable == 2048 * 256 + 256 + 256 + 1
    m.train()
    bns = [x for x in m.backbone.modules() if isinstance(x, nn.BatchNorm2d)]
    assert bns and not any(b.training for b in bns)
    assert m.head.training
    before = bns[0].running_mean.clone()
    m(torch.randn(4, 3, 64, 64) * 5 + 3)
    torch.testing.assert_close(bns[0].running_mean, before)


def test_unfreeze_deeper_layers():
    m = create_model("resnet50", "none", freeze="backbone", unfreeze=["layer4", "layer3"])
    assert all(p.requires_grad for p in m.backbone.layer4.parameters())
    assert all(p.requires_grad for p in m.backbone.layer3.parameters())
    assert not any(p.requires_grad for p in m.backbone.layer2.parameters())
    m.train()
    assert m.backbone.layer4[0].bn1.training and not m.backbone.bn1.training
    with pytest.raises(BonetumorError, match="valid blocks are conv1, bn1"):
        create_model("resnet50", "none", unfreeze=["layer9"])


@pytest.mark.parametrize("stride", [32, 16, 8])
def test_output_stride_sets_the_last_feature_map_and_keeps_weight_shapes(stride):
    m = create_model("resnet50", "none", output_stride=stride).eval()
    feats = {}
    m.backbone.layer4.register_forward_hook(lambda mod, i, o: feats.setdefault("x", o))
    assert m(torch.randn(1, 3, 96, 96)).shape == (1, 1)
    assert feats["x"].shape[-2:] == (96 // stride, 96 // stride)
    # Dilation instead of stride: every weight keeps its shape, so ImageNet weights still fit.
    ref = torchvision.models.resnet50().state_dict()
    assert {k: v.shape for k, v in m.backbone.state_dict().items()} == {k: v.shape for k, v in ref.items() if not k.startswith("fc.")}


def test_output_stride_other_backbones_refuse():
    with pytest.raises(BonetumorError, match="densenet121 supports 32"):
        create_model("densenet121", "none", output_stride=16)
    with pytest.raises(BonetumorError, match="resnet50 supports 32, 16 or 8"):
        create_model("resnet50", "none", output_stride=4)


def test_full_fine_tune():
    m = create_model("resnet50", "none", freeze="none")
    assert count_parameters(m)[0] == count_parameters(m)[1]


@pytest.mark.parametrize("name,feat", [("densenet121", 1024), ("efficientnet_b0", 1280)])
def test_other_backbones_take_the_same_head(name, feat):
    m = create_model(name, "none", n_outputs=3)
    assert m.head[0].in_features == feat
    assert m.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3)


def test_weights_from_a_torchvision_state_dict_file(tmp_path):
    ref = torchvision.models.resnet50()
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    m = create_model("resnet50", str(tmp_path / "w.pth"))
    torch.testing.assert_close(m.backbone.conv1.weight, ref.conv1.weight)
    torch.testing.assert_close(m.backbone.layer4[2].bn3.running_var, ref.layer4[2].bn3.running_var)


def test_weights_file_for_another_architecture_is_refused(tmp_path):
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "r18.pth")
    with pytest.raises(BonetumorError, match="do not fit resnet50"):
        create_model("resnet50", str(tmp_path / "r18.pth"))
    with pytest.raises(BonetumorError, match="no such file"):
        create_model("resnet50", str(tmp_path / "missing.pth"))


def test_offline_imagenet_gives_a_clear_error_and_no_silent_fallback(monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(BonetumorError) as e:
        create_model("resnet50", "imagenet")
    msg = str(e.value)
    assert "fetch-weights" in msg and "--weights PATH" in msg and "resnet50-" in msg


def test_imagenet_uses_the_torchvision_weights_api(monkeypatch):
    """The weights come from torchvision's registry (cached download), here faked by a state dict."""
    ref = torchvision.models.resnet50()
    seen = {}

    def cached(url, *a, **k):
        seen["url"] = url
        return ref.state_dict()

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", cached)
    m = create_model("resnet50", "imagenet")
    assert seen["url"] == torchvision.models.ResNet50_Weights.DEFAULT.url
    torch.testing.assert_close(m.backbone.conv1.weight, ref.conv1.weight)


def test_unknown_backbone():
    with pytest.raises(BonetumorError, match="unknown backbone"):
        create_model("vgg16", "none")


def test_weights_from_a_bonetumor_checkpoint_reuse_its_backbone(tmp_path):
    from bonetumor.config import TrainConfig
    from bonetumor.model.checkpoint import save_checkpoint

    trained = create_model("resnet50", "none", n_outputs=3)
    save_checkpoint(tmp_path / "c.pt", trained, TrainConfig(data="x"), ["a", "b", "c"])
    m = create_model("resnet50", str(tmp_path / "c.pt"), n_outputs=1)
    torch.testing.assert_close(m.backbone.layer1[0].conv1.weight, trained.backbone.layer1[0].conv1.weight)
    assert m.head[-1].out_features == 1  # a new head for the new task
    with pytest.raises(BonetumorError, match="backbone resnet50, not densenet121"):
        create_model("densenet121", str(tmp_path / "c.pt"))
