import numpy as np
import pytest
import torch

from bonetumor.explain.cam import compute_cams
from bonetumor.model.backbones import create_model
from bonetumor.task import Task
from bonetumor.train.guidance import guided_forward, outside_share

TASK = Task(("normal", "cancer"))


def _model(seed=0):
    torch.manual_seed(seed)
    return create_model("resnet50", "none", "none", n_outputs=1, output_stride=8).eval()


def _masks(n, size=64):
    m = torch.zeros(n, size, size, dtype=torch.bool)
    for i in range(n):
        y, x = 4 + 8 * i, 30 - 8 * i
        m[i, y:y + 32, x:x + 28] = True
    return m


def _gradcam_by_hand(model, x):
    """float64 Grad-CAM of the cancer logit at layer4, before its ReLU, from the activation and the
    head's weights: d logit / d A = (1/hw) d logit / d GAP(A), the same at every position."""
    store = {}
    handle = model.backbone.layer4.register_forward_hook(lambda m, i, o: store.setdefault("a", o.detach()))
    with torch.no_grad():
        model(x)
    handle.remove()
    a = store["a"].double()
    lin1, lin2 = model.head[0], model.head[3]
    f = a.mean(dim=(2, 3))
    open_units = (f @ lin1.weight.double().T + lin1.bias.double()) > 0
    dy_df = (open_units * lin2.weight.double()[0]) @ lin1.weight.double()  # (N, C)
    weights = dy_df / (a.shape[2] * a.shape[3])
    return (weights[:, :, None, None] * a).sum(1).detach()


def _outside_by_hand(cam: np.ndarray, mask: np.ndarray) -> float:
    """One minus the lesion's signed share of the map's absolute mass, the mask averaged over each cell."""
    h, w = cam.shape
    s = mask.shape[0] // h
    inside = mask.reshape(h, s, w, s).mean(axis=(1, 3))
    return float(1 - (cam * inside).sum() / np.abs(cam).sum())


def test_the_guidance_loss_is_computed_from_explains_gradcam():
    model = _model()
    x = torch.randn(4, 3, 64, 64)
    y = torch.tensor([1, 1, 1, 1])
    masks = _masks(4)
    logits, outside = guided_forward(model, x, y, masks, TASK)
    cam = _gradcam_by_hand(model, x)
    res = compute_cams(model, x, "backbone.layer4", "gradcam", target="cancer")
    assert res.raw.shape == cam.shape == (4, 8, 8)
    # After its ReLU the map is explain's Grad-CAM, and the loss is that map's signed energy.
    np.testing.assert_allclose(res.raw.numpy(), cam.clamp_min(0).numpy(), rtol=1e-3, atol=1e-4 * float(cam.abs().max()))
    want = [_outside_by_hand(cam[i].numpy(), masks[i].numpy()) for i in range(4)]
    assert all(0.5 < w < 1.5 for w in want) and len({round(w, 3) for w in want}) == 4
    np.testing.assert_allclose(outside.detach().numpy(), want, rtol=1e-4)
    outside.mean().backward()
    for name in ("head.3.weight", "head.0.weight", "backbone.layer4.2.conv3.weight"):
        g = dict(model.named_parameters())[name].grad
        assert g is not None and g.abs().sum() > 0, name  # the loss trains the head and the backbone


def test_images_without_a_mask_and_normals_add_no_guidance():
    model = _model()
    x = torch.randn(4, 3, 64, 64)
    masks = _masks(4)
    masks[1] = False  # a cancer without a mask
    y = torch.tensor([1, 1, 0, 1])  # image 2: a normal with a mask
    _, outside = guided_forward(model, x, y, masks, TASK)
    _, alone = guided_forward(model, x[[0, 3]], y[[0, 3]], masks[[0, 3]], TASK)
    assert outside.shape == (2,)  # images 0 and 3 only
    np.testing.assert_allclose(outside.detach().numpy(), alone.detach().numpy(), rtol=1e-5)
    logits, none = guided_forward(model, x, torch.tensor([0, 0, 0, 0]), masks, TASK)
    assert none is None and logits.shape == (4, 1)
    assert guided_forward(model, x, y, torch.zeros_like(masks), TASK)[1] is None


def test_the_outside_share_counts_sign_and_place():
    masks = torch.zeros(4, 8, 8, dtype=torch.bool)
    masks[:, :4, :4] = True  # the top-left cell of a 2x2 map
    cams = torch.zeros(4, 2, 2)
    cams[1, 0, 0] = 2.0  # all positive, all inside
    cams[2, 1, 1] = 3.0  # all positive, all outside
    cams[3, 0, 0], cams[3, 1, 1] = -1.0, 1.0  # negative inside, positive outside
    torch.testing.assert_close(outside_share(cams, masks), torch.tensor([1.0, 0.0, 1.0, 1.5]))

def _planted_batch(n=6, size=64, seed=0):
    """Cancers with a bright lesion somewhere and a bright marker in a corner (a shortcut as good as
    the lesion), then as many normals with neither; normalised images, masks and labels."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    x = 0.3 + 0.05 * torch.randn(2 * n, 1, size, size, generator=g)
    masks = torch.zeros(2 * n, size, size, dtype=torch.bool)
    for i in range(n):
        cy, cx = torch.randint(20, size - 12, (2,), generator=g).tolist()
        masks[i] = (yy - cy) ** 2 + (xx - cx) ** 2 < 7**2
        x[i, 0][masks[i]] += 0.5
        x[i, 0, :10, :10] += 0.5
    x = (x.clamp(0, 1).expand(-1, 3, -1, -1) - 0.45) / 0.25
    return x, masks, torch.tensor([1] * n + [0] * n)


@pytest.mark.slow
def test_a_few_guided_steps_move_the_evidence_into_the_lesion():
    from bonetumor.explain.scores import energy_inside

    x, masks, y = _planted_batch()
    energy = {}
    for guided in (False, True):
        model = _model(seed=1)
        model.bn_statistics = "frozen"  # so that training and explaining see the same network
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(8):
            logits, outside = guided_forward(model, x, y, masks if guided else torch.zeros_like(masks), TASK)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits[:, 0], y.float())
            opt.zero_grad()
            (loss + (outside.mean() if guided else 0)).backward()
            opt.step()
        maps = compute_cams(model, x[:6], "backbone.layer4", target="cancer").maps.numpy()
        energy[guided] = float(np.mean([energy_inside(m, k.numpy()) for m, k in zip(maps, masks[:6])]))
    # The lesion is 3.8% of each image; 8 guided steps put 0.093 of the maps' mass on it, 8 unguided 0.035.
    assert energy[True] > 2 * energy[False] and energy[True] > 0.07, energy


def test_a_guided_run_records_its_guidance_and_the_report_says_guided(tmp_path, tiny_data, tiny_run):
    import csv

    import yaml
    from conftest import tiny_config

    from bonetumor import fit, load_checkpoint
    from bonetumor.report import build_report

    r = fit(tiny_config(tiny_data, epochs=1, audit=False, lesion_masks="manifest", guidance_weight=0.5),
            tmp_path / "g", verbose=False)
    history = list(csv.DictReader(open(r.run_dir / "history.csv")))
    assert 0 < float(history[0]["train_outside_lesion"]) < 2
    assert yaml.safe_load((r.run_dir / "config.yaml").read_text())["lesion_masks"] == "manifest"
    assert load_checkpoint(r.run_dir / "best.pt", torch.device("cpu")).config.guidance_weight == 0.5
    guided = build_report(r.run_dir, out=tmp_path / "g.html").read_text()
    plain = build_report(tiny_run, out=tmp_path / "p.html").read_text()
    assert "px, lesion-guided, on" in guided and "guided: one minus the lesion&#x27;s share of the positive class&#x27;s Grad-CAM" in guided
    assert "lesion-guided" not in plain and "<td>lesion guidance</td><td>none</td>" in plain


def test_a_bad_mask_stops_training_in_one_line_before_the_run_folder_exists(tmp_path, tiny_data):
    from typer.testing import CliRunner

    from bonetumor.cli import app

    name = sorted((tiny_data / "train" / "cancer").glob("*.png"))[0].name
    (tmp_path / "masks" / "train" / "cancer").mkdir(parents=True)
    (tmp_path / "masks" / "train" / "cancer" / name).write_bytes(b"not a mask")
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--out", str(tmp_path / "r"), "--weights", "none",
                                 "--image-size", "32", "--epochs", "1", "--no-audit",
                                 "--lesion-masks", str(tmp_path / "masks")])
    assert r.exit_code == 2 and name in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) <= 3 and not (tmp_path / "r").exists()  # one (soft-wrapped) line


def test_a_guided_run_never_trains_from_the_feature_cache():
    from conftest import tiny_config

    from bonetumor.train.batches import uses_feature_cache

    frozen = create_model("resnet50", "none", "backbone", n_outputs=1)
    assert uses_feature_cache(tiny_config(None, freeze="backbone"), frozen)
    assert not uses_feature_cache(tiny_config(None, freeze="backbone", lesion_masks="manifest"), frozen)
