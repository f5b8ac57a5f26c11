import pickle

import pytest
import torch

from bonetumor.config import TrainConfig, config_from_dict
from bonetumor.errors import BonetumorError
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import (
    checkpoint_config,
    load_checkpoint,
    read_torch_file,
    save_checkpoint,
)


class Evil:
    def __reduce__(self):
        return (print, ("this code must never run",))


def _save(path, **kw):
    cfg = TrainConfig(data="x", weights="none", image_size=64)
    model = create_model("resnet50", "none")
    save_checkpoint(path, model, cfg, ["normal", "cancer"], threshold=0.3, **kw)
    return model


def test_roundtrip_holds_what_predict_needs(tmp_path):
    torch.manual_seed(0)  # not the global state other tests leave
    model = _save(tmp_path / "c.pt", epoch=4)
    ck = load_checkpoint(tmp_path / "c.pt")
    assert ck.classes == ["normal", "cancer"] and ck.positive_class == "cancer"
    assert ck.image_size == 64 and ck.threshold == 0.3 and ck.epoch == 4 and len(ck.mean) == 3
    assert not ck.model.training
    x = torch.randn(2, 3, 64, 64)
    # the loaded model runs channels_last, the original contiguous: other convolution kernels,
    # differing by ~1e-5; a wrong or missing weight moves the logits by far more
    torch.testing.assert_close(ck.model(x), model.eval()(x), atol=1e-4, rtol=1e-4)
    # Loadable by plain torch with weights_only=True: no code runs on load.
    assert torch.load(tmp_path / "c.pt", weights_only=True)["format"] == "bonetumor-checkpoint"


def test_config_is_read_without_the_model(tmp_path, monkeypatch):
    _save(tmp_path / "c.pt")
    monkeypatch.setattr("bonetumor.model.checkpoint.create_empty_model", lambda *a, **k: pytest.fail("model built"))
    cfg = checkpoint_config(tmp_path / "c.pt")
    assert cfg == config_from_dict(torch.load(tmp_path / "c.pt", weights_only=True)["config"]) and cfg.image_size == 64
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    with pytest.raises(BonetumorError, match="foreign.pt: not a bonetumor checkpoint"):
        checkpoint_config(tmp_path / "foreign.pt")


def test_failed_write_leaves_the_old_file_intact(tmp_path, monkeypatch):
    _save(tmp_path / "c.pt", epoch=1)
    before = (tmp_path / "c.pt").read_bytes()
    real_save = torch.save

    def dies_half_way(obj, f, *a, **k):
        real_save(obj, f)
        with open(f, "r+b") as fh:
            fh.truncate(100)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(BonetumorError, match="disk full while writing.*intact"):
        _save(tmp_path / "c.pt", epoch=2)
    assert (tmp_path / "c.pt").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temporary left behind


def test_pickled_code_is_refused_not_run(tmp_path, capsys):
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": "bonetumor-checkpoint", "x": Evil()}, f)
    torch.save({"format": "bonetumor-checkpoint", "x": Evil()}, tmp_path / "evil2.pt")
    for name in ("evil.pt", "evil2.pt"):
        with pytest.raises(BonetumorError, match="refused to load.*print|not a readable"):
            read_torch_file(tmp_path / name)
    assert "must never run" not in capsys.readouterr().out


def test_foreign_and_broken_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(BonetumorError, match="not a bonetumor checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    # bytes on which torch's unpickler fails with UnpicklingError, KeyError, IndexError, struct.error
    for content in (b"\x00garbage", b"junk\n", b"\x80\x02", b"GIF89a", b"\x80\x02\x8a\x0a"):
        (tmp_path / "junk.pt").write_bytes(content)
        with pytest.raises(BonetumorError, match="junk.pt: not a readable"):
            load_checkpoint(tmp_path / "junk.pt")
    with pytest.raises(BonetumorError, match="file not found"):
        load_checkpoint(tmp_path / "none.pt")


def test_tampered_bytes_and_swapped_weights_are_refused(tmp_path):
    _save(tmp_path / "c.pt", epoch=1)
    data = bytearray((tmp_path / "c.pt").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\xff" * 64  # corrupt the middle of the archive
    (tmp_path / "t.pt").write_bytes(bytes(data))
    (tmp_path / "cut.pt").write_bytes(bytes(data[: len(data) // 3]))
    for name in ("t.pt", "cut.pt"):
        with pytest.raises(BonetumorError, match=name):
            load_checkpoint(tmp_path / name)
    raw = torch.load(tmp_path / "c.pt", weights_only=True)
    raw["model"] = {k: torch.zeros(1) for k in list(raw["model"])[:3]}  # weights of some other network
    torch.save(raw, tmp_path / "swapped.pt")
    with pytest.raises(BonetumorError, match="swapped.pt"):
        load_checkpoint(tmp_path / "swapped.pt")


def test_altered_weights_give_no_prediction_even_with_the_check_deferred(tiny_run, tiny_data, tmp_path):
    from bonetumor.predict import predict

    data = bytearray((tiny_run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0x04  # one bit of one weight, in the middle of the tensors' bytes
    (tmp_path / "altered.pt").write_bytes(bytes(data))
    with pytest.raises(BonetumorError, match="altered.pt: the file does not match its checksum"):
        predict(tmp_path / "altered.pt", [tiny_data / "test"], device="cpu")
    with pytest.raises(BonetumorError, match="does not match its checksum"):
        load_checkpoint(tmp_path / "altered.pt")
    ck = load_checkpoint(tmp_path / "altered.pt", check="deferred")  # returns at once, refuses when asked
    with pytest.raises(BonetumorError, match="does not match its checksum"):
        ck.verified()


def test_an_empty_model_is_on_meta_and_real_tensors_still_initialise():
    """The structure built for saved weights skips random init, and only for meta tensors."""
    import torch

    from bonetumor.model.backbones import _SkipMetaInit, create_empty_model

    model = create_empty_model("resnet50", 3, 16, 0.1, 16)
    assert all(p.is_meta for p in model.parameters()) and model.head[-1].out_features == 3
    with _SkipMetaInit():
        t = torch.nn.init.normal_(torch.zeros(1000))
    assert t.std() > 0.5
