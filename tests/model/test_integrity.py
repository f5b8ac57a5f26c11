"""A checkpoint is as it was written or it is refused: every byte under its checksum, every load path
checking it, and forged values refused in one line."""

import math
import random
import shutil
import struct

import pytest
import torch
from conftest import tiny_config
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.config import TrainConfig
from bonetumor.errors import BonetumorError
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import (
    checkpoint_payload,
    load_checkpoint,
    read_torch_file,
    weights_digest,
    write_checkpoint,
)

pytestmark = pytest.mark.bad_input  # the bad-input corpus: counted in the README


def _checkpoint(path, threshold=0.216):
    torch.manual_seed(0)
    cfg = TrainConfig(data="x", weights="none", image_size=64)
    write_checkpoint(path, checkpoint_payload(create_model("resnet50", "none"), cfg, ["normal", "cancer"],
                                              threshold=threshold, copy=False))
    return path


def _flips(data: bytes, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """(offset, bit) pairs: the archive's first and last 4 KB (headers, pickled records, central
    directory, checksum) densely, the tensors' bytes between them at random."""
    rng = random.Random(seed)
    edges = list(range(4096)) + list(range(len(data) - 4096, len(data)))
    picks = rng.sample(edges, n // 2) + [rng.randrange(len(data)) for _ in range(n - n // 2)]
    return [(i, rng.randrange(8)) for i in picks]


def _silent_loads(path, flips, tmp_path) -> tuple[int, list]:
    data = path.read_bytes()
    silent, messages = 0, set()
    for k, (i, bit) in enumerate(flips):
        bad = bytearray(data)
        bad[i] ^= 1 << bit
        target = tmp_path / f"flip{k % 2}.pt"
        target.write_bytes(bytes(bad))
        try:
            load_checkpoint(target)
            silent += 1
        except BonetumorError as e:  # anything else is a traceback, and fails the test
            messages.add(str(e).split(": ", 1)[1][:40])
    return silent, sorted(messages)


def test_a_flipped_bit_in_headers_records_or_weights_is_refused(tmp_path):
    path = _checkpoint(tmp_path / "c.pt")
    silent, messages = _silent_loads(path, _flips(path.read_bytes(), 12), tmp_path)
    assert silent == 0, messages
    assert load_checkpoint(path).threshold == pytest.approx(0.216)  # the unflipped file loads


@pytest.mark.slow
def test_five_hundred_flipped_bits_give_no_silent_load(tmp_path):
    path = _checkpoint(tmp_path / "c.pt")
    silent, messages = _silent_loads(path, _flips(path.read_bytes(), 500, seed=1), tmp_path)
    assert silent == 0, messages


def test_the_threshold_bit_that_flipped_labels_is_refused(tmp_path):
    path = _checkpoint(tmp_path / "c.pt")
    data = bytearray(path.read_bytes())
    at = data.find(b"G" + struct.pack(">d", 0.216))  # pickle's BINFLOAT, big-endian
    assert at > 0 and data.find(b"G" + struct.pack(">d", 0.216), at + 1) == -1
    data[at + 2] ^= 0x20  # one bit of the exponent: 0.216 -> 0.864
    assert struct.unpack(">d", bytes(data[at + 1:at + 9]))[0] == pytest.approx(0.864)
    (tmp_path / "t.pt").write_bytes(bytes(data))
    with pytest.raises(BonetumorError, match="t.pt: the file does not match its checksum"):
        load_checkpoint(tmp_path / "t.pt")


def test_a_checkpoint_without_its_checksum_is_refused_and_older_files_still_load(tmp_path):
    raw = read_torch_file(_checkpoint(tmp_path / "c.pt"))
    torch.save(raw, tmp_path / "unsealed.pt")  # the same content, the checksum left out
    with pytest.raises(BonetumorError, match="unsealed.pt: its checksum is missing"):
        load_checkpoint(tmp_path / "unsealed.pt")
    # format 1: the weights' checksum in "model_sha256", nothing over the rest
    old = {**raw, "format_version": 1, "model_sha256": weights_digest(raw["model"])}
    torch.save(old, tmp_path / "v1.pt")
    assert load_checkpoint(tmp_path / "v1.pt").threshold == pytest.approx(0.216)
    torch.save({k: v for k, v in old.items() if k != "model_sha256"}, tmp_path / "v1_no_sum.pt")
    with pytest.raises(BonetumorError, match="v1_no_sum.pt: its checksum is missing"):
        load_checkpoint(tmp_path / "v1_no_sum.pt")
    name = next(iter(raw["model"]))
    torch.save({**old, "model": {**raw["model"], name: raw["model"][name] + 1}}, tmp_path / "v1_altered.pt")
    with pytest.raises(BonetumorError, match="v1_altered.pt: the weights do not match their checksum"):
        load_checkpoint(tmp_path / "v1_altered.pt")


@pytest.mark.parametrize("change, says", [
    ({"config": {"image_size": "ninety-six"}}, "image_size = 'ninety-six' is not a valid int"),
    ({"classes": ["cancer"]}, "classes must be two or more distinct names"),
    ({"classes": ["cancer", "cancer"]}, "classes must be two or more distinct names"),
    ({"threshold": math.nan}, "threshold must be a number from 0 to 1, not nan"),
    ({"threshold": 1.5}, "threshold must be a number from 0 to 1"),
    ({"temperature": 0.0}, "temperature must be a number"),
    ({"image_size": -3}, "image_size must be a whole number from 8"),
    ({"normalization": {"mean": [0.5], "std": [0.2]}}, "normalization must be 3 finite means"),
    ({"config": {"precision": "fp8"}}, "--precision must be"),
])
def test_forged_values_with_a_valid_checksum_get_one_line(tmp_path, change, says):
    raw = read_torch_file(_checkpoint(tmp_path / "c.pt"))
    if "config" in change:
        change = {"config": {**raw["config"], **change["config"]}}
    write_checkpoint(tmp_path / "forged.pt", {**raw, **change})  # sealed: made by hand, checksum and all
    with pytest.raises(BonetumorError, match="forged.pt: checkpoint is incomplete, has invalid values") as e:
        load_checkpoint(tmp_path / "forged.pt")
    assert says in str(e.value) and "\n" not in str(e.value)


def test_weights_and_resume_check_the_checksum_too(tiny_data, tiny_run, tmp_path):
    from bonetumor import fit

    data = bytearray((tiny_run / "best.pt").read_bytes())
    data[len(data) // 2] ^= 0x10
    (tmp_path / "damaged.pt").write_bytes(bytes(data))
    with pytest.raises(BonetumorError, match="damaged.pt: the file does not match its checksum"):
        fit(tiny_config(tiny_data, weights=str(tmp_path / "damaged.pt"), epochs=1), tmp_path / "w", verbose=False)
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    last = bytearray((run / "last.pt").read_bytes())
    last[len(last) // 2] ^= 0x10
    (run / "last.pt").write_bytes(bytes(last))
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--out", str(run), "--resume", "--epochs", "3"])
    assert r.exit_code != 0 and "last.pt: the file does not match its checksum" in " ".join(r.output.split())


def test_a_pickle_that_would_run_code_is_named_as_such(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("this code must never run",))

    for protocol in (2, 4, 5):
        with open(tmp_path / "evil.pt", "wb") as f:
            pickle.dump({"format": "bonetumor-checkpoint", "x": Evil()}, f, protocol=protocol)
        with pytest.raises(BonetumorError, match=r"holds code or objects, not only tensors \((builtins\.)?print\)"):
            load_checkpoint(tmp_path / "evil.pt")


def test_resume_refuses_options_it_would_ignore(tiny_data, tiny_run, tmp_path):
    run = tmp_path / "r"
    shutil.copytree(tiny_run, run)
    r = CliRunner().invoke(app, ["train", str(tiny_data), "--out", str(run), "--resume", "--epochs", "3",
                                 "--image-size", "96"])
    flat = " ".join(r.output.split())
    assert r.exit_code == 2 and "would ignore --image-size 96 (the run's: 32)" in flat, r.output
