"""Frozen-backbone fast path: features once per image and view, the head trains from them."""

import pytest
import torch
import torchvision
from conftest import tiny_config

from bonetumor.data.layouts import discover
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import weights_digest
from bonetumor.runtime.features import cached_features, extract_features
from bonetumor.train import fit

NO_AUG = dict(hflip=False, rotate_degrees=0.0, zoom_min=1.0, zoom_max=1.0)


def _strip(h):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in h]


def test_cached_head_training_equals_the_full_forward_without_augmentation(tmp_path, tiny_data):
    # With one plain view, features computed once give the same training as running the frozen
    # backbone every epoch (same shuffles, same dropout draws): the cache changes speed, not results.
    kw = dict(freeze="backbone", epochs=4, lr=1e-3, feature_views=1, **NO_AUG)
    cached = fit(tiny_config(tiny_data, **kw), tmp_path / "c", verbose=False)
    full = fit(tiny_config(tiny_data, cache_features=False, **kw), tmp_path / "f", verbose=False)
    assert cached.best_epoch == full.best_epoch and len(cached.history) == len(full.history) == 4
    for a, b in zip(_strip(cached.history), _strip(full.history)):
        for k in ("train_loss", "val_loss", "val_roc_auc"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), (k, a, b)


def test_backbone_passes_do_not_grow_with_epochs(tmp_path, tiny_data):
    seen = []

    def counted(module, inp, out):  # every ResNet forward of the process, with its batch size
        if isinstance(module, torchvision.models.ResNet):
            seen.append(len(inp[0]))

    index = discover(str(tiny_data))
    n_train, n_valid = len(index.split("train")), len(index.split("valid"))
    counts = {}
    hook = torch.nn.modules.module.register_module_forward_hook(counted)
    try:
        for epochs in (2, 6):
            seen.clear()
            fit(tiny_config(tiny_data, freeze="backbone", epochs=epochs, patience=10, feature_views=3),
                tmp_path / f"e{epochs}", verbose=False)
            counts[epochs] = sum(seen)
    finally:
        hook.remove()
    # 3 views of each training image and the validation images once, whatever the number of
    # epochs; the operating point reuses the best epoch's validation logits.
    assert counts[2] == counts[6] == 3 * n_train + n_valid


@pytest.mark.slow
def test_views_are_fixed_by_the_seed_not_the_batching(tiny_data):
    cfg = tiny_config(tiny_data)
    samples = discover(str(tiny_data)).split("train")[:10]
    torch.manual_seed(0)
    model = create_model("resnet50", "none", "backbone")
    a = extract_features(model.backbone, samples, cfg, 3, torch.device("cpu"))
    b = extract_features(model.backbone, samples, tiny_config(tiny_data, batch_size=3), 3, torch.device("cpu"))
    assert a.shape == (10, 3, 2048)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # batch size changes oneDNN's sums a little
    assert (a[:, 0] - a[:, 1]).abs().max() > 1e-3  # augmented views differ
    compiled = extract_features(model.backbone, samples, tiny_config(tiny_data, compile="on"), 3, torch.device("cpu"))
    torch.testing.assert_close(a, compiled, rtol=1e-4, atol=1e-4)  # torch.compile, padded last batch: same features
    plain = extract_features(model.backbone, samples, cfg, 1, torch.device("cpu"))
    from bonetumor.data.readers import load_tensor
    from bonetumor.data.transforms import create_transforms

    tf = create_transforms(False, cfg.image_size)
    x = torch.stack([tf(load_tensor(s.path)) for s in samples])
    with torch.inference_mode():
        torch.testing.assert_close(plain[:, 0], model.backbone.eval()(x), rtol=1e-4, atol=1e-4)


def _cached(model, samples, cfg, views):
    return cached_features(model.backbone, samples, cfg, views, torch.device("cpu"), weights_digest(model.backbone.state_dict()))


def test_disk_cache_is_reused_and_keyed_by_content(tmp_path, tiny_data):
    import shutil

    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    cfg = tiny_config(data, feature_cache_dir=str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = create_model("resnet50", "none", "backbone")
    samples = discover(str(data)).split("valid")
    first, hit1 = _cached(model, samples, cfg, 2)
    again, hit2 = _cached(model, samples, cfg, 2)
    assert (hit1, hit2) == (False, True) and torch.equal(first, again)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    # Other weights, other views or other file content: other features, never a stale hit.
    _, hit = _cached(model, samples, cfg, 1)
    assert not hit
    other = create_model("resnet50", "none", "backbone")
    _, hit = _cached(other, samples, cfg, 2)
    assert not hit
    shutil.copy(samples[1].path, samples[0].path)
    _, hit = _cached(model, samples, cfg, 2)
    assert not hit
    # A damaged entry is recomputed.
    for p in (tmp_path / "cache").glob("*.pt"):
        p.write_bytes(b"garbage")
    feats, hit = _cached(model, samples, cfg, 1)
    assert not hit and feats.shape == (len(samples), 1, 2048)


def test_fine_tuning_runs_the_backbone_every_epoch(tmp_path, tiny_data):
    # --unfreeze or --freeze none changes the features each step: no cache, full forward.
    r = fit(tiny_config(tiny_data, freeze="backbone", unfreeze=["layer4"], epochs=1), tmp_path / "u", verbose=False)
    assert len(r.history) == 1
