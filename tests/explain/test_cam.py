from contextlib import contextmanager, nullcontext

import pytest
import torch
from captum.attr import LayerAttribution, LayerGradCam
from torch import nn

from bonetumor.errors import BonetumorError
from bonetumor.explain.cam import compute_cams
from bonetumor.model.backbones import create_model


def _model(n_out=1, freeze="backbone"):
    torch.manual_seed(0)
    m = create_model("resnet50", "none", freeze=freeze, n_outputs=n_out)
    # Random init leaves BN running stats at identity; perturb them so the test is not degenerate.
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.1, 0.1)
            mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


def _captum_reference(model, x, sign: float, index: int = 0):
    """Grad-CAM by Captum (whole-network backprop) for the score sign * logit[index]."""
    lgc = LayerGradCam(lambda inp: sign * model(inp)[:, index:index + 1], model.backbone.layer4)
    raw = lgc.attribute(x, target=0, relu_attributions=True)  # (N, 1, h, w)
    up = LayerAttribution.interpolate(raw, x.shape[-2:], interpolate_mode="bicubic")[:, 0]
    # Bicubic overshoot clipped to the coarse map's range, as ours does.
    up = up.clamp(raw.amin((1, 2, 3))[:, None, None], raw.amax((1, 2, 3))[:, None, None])
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    return raw[:, 0], (up - lo) / (hi - lo)


@pytest.mark.parametrize("target,sign", [("cancer", 1.0), ("normal", -1.0)])
def test_gradcam_equals_captum(target, sign):
    model = _model()
    x = torch.randn(3, 3, 96, 96)
    ours = compute_cams(model, x, "backbone.layer4", "gradcam", target=target)
    raw, ref = _captum_reference(model, x, sign)
    assert raw.abs().max() > 0
    torch.testing.assert_close(ours.raw, raw.detach(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ours.maps, ref.detach(), atol=1e-4, rtol=0)
    assert ours.maps.shape == (3, 96, 96) and ours.maps.min() >= 0 and ours.maps.max() <= 1


def test_predicted_target_follows_the_prediction_per_image():
    model = _model()
    x = torch.randn(6, 3, 64, 64)
    pred = compute_cams(model, x, "backbone.layer4", target="predicted", threshold=0.5)
    pos = compute_cams(model, x, "backbone.layer4", target="cancer")
    neg = compute_cams(model, x, "backbone.layer4", target="normal")
    is_pos = pred.probs >= 0.5
    assert torch.equal(pred.target_index, is_pos.long())
    expected = torch.where(is_pos[:, None, None], pos.maps, neg.maps)
    torch.testing.assert_close(pred.maps, expected)


def test_multiclass_gradcam_equals_captum():
    model = _model(n_out=3)
    x = torch.randn(2, 3, 64, 64)
    ours = compute_cams(model, x, "backbone.layer4", target=2, classes=["a", "b", "c"])
    raw, _ = _captum_reference(model, x, 1.0, index=2)
    torch.testing.assert_close(ours.raw, raw.detach(), atol=1e-4, rtol=1e-4)


def test_model_state_is_left_as_found_and_batching_changes_nothing():
    model = _model(freeze="none")
    model.train()
    x = torch.randn(4, 3, 64, 64)
    batch = compute_cams(model, x, "backbone.layer4", "gradcam++", target="cancer")
    assert model.training and all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
    single = torch.cat([compute_cams(model, x[i:i + 1], "backbone.layer4", "gradcam++", target="cancer").maps for i in range(4)])
    torch.testing.assert_close(batch.maps, single, atol=1e-5, rtol=1e-4)


class Planted(nn.Module):
    """A tiny network that detects a bright square: conv (box filter) -> GAP -> linear."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 1, 5, padding=2, bias=False), nn.ReLU())
        nn.init.constant_(self.backbone[0].weight, 1 / 75)
        self.head = nn.Linear(1, 1)
        nn.init.constant_(self.head.weight, 2.0)
        nn.init.constant_(self.head.bias, -1.0)

    def forward(self, x):
        return self.head(self.backbone(x).mean((2, 3)))


@pytest.mark.parametrize("method", ["gradcam", "gradcam++", "eigencam"])
@pytest.mark.parametrize("where", [(8, 40), (44, 12), (30, 30)])
def test_map_peaks_at_the_planted_feature(method, where):
    torch.manual_seed(1)
    x = torch.rand(1, 3, 64, 64) * 0.1
    r, c = where
    x[:, :, r:r + 8, c:c + 8] = 1.0
    res = compute_cams(Planted(), x, "backbone", method, target="cancer")
    peak = divmod(int(res.maps[0].argmax()), 64)
    assert r <= peak[0] < r + 8 and c <= peak[1] < c + 8, (peak, where)
    assert res.maps.shape == (1, 64, 64) and float(res.maps.min()) == 0.0 and float(res.maps.max()) == 1.0


def test_unknown_layer_and_method_and_target():
    model = _model()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(BonetumorError, match="valid layers include .*backbone.layer4"):
        compute_cams(model, x, "backbone.layer9")
    with pytest.raises(BonetumorError, match="--method"):
        compute_cams(model, x, "backbone.layer4", "lime")
    with pytest.raises(BonetumorError, match="--target 'tumour'"):
        compute_cams(model, x, "backbone.layer4", target="tumour")


@pytest.mark.parametrize("layer, folded", [("backbone.layer4", 53), ("backbone.layer4.2.conv3", 52),
                                           ("backbone.layer4.2.bn3", 52)])
def test_folded_batchnorms_leave_the_maps_and_the_watched_layer_as_they_were(layer, folded, monkeypatch):
    # Grad-CAM runs with the BatchNorms folded into their convolutions, but for the watched
    # layer's own pair: a watched convolution's output must stay its own, not the BatchNorm's.
    import bonetumor.explain.cam as cam
    from bonetumor.runtime.batchnorm import inference_folded

    model = _model().double()
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    counts = []

    @contextmanager
    def spy(m, keep=None):
        with inference_folded(m, keep) as n:
            counts.append(n)
            yield n

    monkeypatch.setattr(cam, "inference_folded", spy)
    ours = compute_cams(model, x, layer, "gradcam", target="cancer")
    monkeypatch.setattr(cam, "inference_folded", lambda m, keep=None: nullcontext(0))
    plain = compute_cams(model, x, layer, "gradcam", target="cancer")
    assert counts == [folded] and ours.raw.abs().max() > 0
    monkeypatch.setattr(cam, "inference_folded", spy)
    compute_cams(model, x[:3], layer, "gradcam", target="cancer")  # too few images for folding to pay
    assert counts == [folded]
    torch.testing.assert_close(ours.raw, plain.raw, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(ours.probs, plain.probs, rtol=1e-9, atol=1e-12)
    with inference_folded(model.eval(), keep=dict(model.named_modules())[layer]) as n:
        assert n == folded
    assert type(model.backbone.layer4[2].conv3) is nn.Conv2d  # restored
