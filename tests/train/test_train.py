import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_class_tree, tiny_config

from bonetumor import fit, load_checkpoint
from bonetumor.errors import BadImageError, BonetumorError
from bonetumor.files import RunDir


def _history(run):
    return list(csv.DictReader(open(run / "history.csv")))


def test_run_folder_holds_everything(tiny_run, tiny_data):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"best.pt", "last.pt", "config.yaml", "environment.json", "data.json", "splits.csv",
            "history.csv", "curves.png", "audit.json"} <= names
    assert json.loads((tiny_run / "audit.json").read_text())["leakage"] is False
    assert yaml.safe_load((tiny_run / "config.yaml").read_text())["image_size"] == 32
    data = json.loads((tiny_run / "data.json").read_text())
    assert data["split_level"] == "patient" and data["classes"] == ["normal", "cancer"]
    assert len(data["fingerprint"]) == 64 and data["counts"]["train"] == {"normal": 16, "cancer": 16}
    env = json.loads((tiny_run / "environment.json").read_text())
    assert env["packages"]["torch"] == torch.__version__.split("+")[0] or env["packages"]["torch"].startswith(torch.__version__[:4])
    assert len(_history(tiny_run)) == 2
    ck = torch.load(tiny_run / "last.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["optimizer"] is not None and ck["classes"] == ["normal", "cancer"]
    assert ck["image_size"] == 32 and "threshold" in ck and ck["normalization"]["mean"][0] == 0.485
    best = torch.load(tiny_run / "best.pt", weights_only=True)
    assert best["optimizer"] is None and best["config"] == ck["config"] and best["classes"] == ck["classes"]  # last.pt resumes


def test_training_audits_the_data_and_warns_on_leakage(tmp_path, tiny_data):
    import shutil

    from bonetumor.errors import LeakageWarning

    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    src = next((data / "train" / "cancer").glob("*.png"))
    shutil.copy(src, data / "valid" / "cancer" / "copy_of_train.png")
    (data / "manifest.csv").unlink()  # folder layout, so the copy is picked up
    with pytest.warns(LeakageWarning, match="1 of 9 valid images copy or nearly copy a training image"):
        fit(tiny_config(data, epochs=1), tmp_path / "r", verbose=False)
    audit = json.loads((tmp_path / "r" / "audit.json").read_text())
    assert audit["leakage"] is True and audit["duplicates"]["valid"]["exact_copies_of_train"] == 1
    fit(tiny_config(data, epochs=1, audit=False), tmp_path / "r2", verbose=False)
    assert not (tmp_path / "r2" / "audit.json").exists()


def test_best_checkpoint_is_the_lowest_validation_loss(tiny_run):
    hist = _history(tiny_run)
    best = min(hist, key=lambda r: float(r["val_loss"]))
    assert load_checkpoint(tiny_run / "best.pt").epoch == int(best["epoch"])


@pytest.mark.slow
def test_same_seed_same_numbers(tmp_path, tiny_data):
    a = fit(tiny_config(tiny_data), tmp_path / "a", verbose=False)
    b = fit(tiny_config(tiny_data), tmp_path / "b", verbose=False)
    c = fit(tiny_config(tiny_data, seed=4), tmp_path / "c", verbose=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history) != strip(c.history)
    wa = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_result(tmp_path, tiny_data):
    full = fit(tiny_config(tiny_data, epochs=3), tmp_path / "full", verbose=False)
    fit(tiny_config(tiny_data, epochs=1), tmp_path / "part", verbose=False)
    resumed = fit(tiny_config(tiny_data, epochs=3), tmp_path / "part", resume=True, verbose=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)
    wf = torch.load(tmp_path / "full" / "last.pt", weights_only=True)["model"]
    wr = torch.load(tmp_path / "part" / "last.pt", weights_only=True)["model"]
    assert all(torch.allclose(wf[k].float(), wr[k].float()) for k in wf)


@pytest.mark.slow
def test_cosine_schedule_is_recorded_and_resumes_exactly(tmp_path, tiny_data):
    from bonetumor.train import lr_at_epoch

    cfg = tiny_config(tiny_data, epochs=3, lr=1e-3, lr_schedule="cosine")
    assert [lr_at_epoch(cfg, e) for e in (1, 2, 3)] == pytest.approx([1e-3, 0.505e-3, 1e-5])
    full = fit(cfg, tmp_path / "full", verbose=False)
    assert [float(r["lr"]) for r in full.history] == pytest.approx([1e-3, 0.505e-3, 1e-5])
    fit(tiny_config(tiny_data, epochs=1, lr=1e-3, lr_schedule="cosine"), tmp_path / "part", verbose=False)
    resumed = fit(tiny_config(tiny_data, epochs=3), tmp_path / "part", resume=True, verbose=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_early_stopping_restores_best(tmp_path, tiny_data):
    # A learning rate this small leaves the validation loss flat: no improvement after epoch 1.
    r = fit(tiny_config(tiny_data, epochs=10, patience=2, lr=1e-12, freeze="backbone"), tmp_path / "r", verbose=False)
    assert r.stopped_early and r.best_epoch == 1 and len(r.history) == 3
    assert load_checkpoint(tmp_path / "r" / "best.pt").epoch == 1


def test_existing_run_is_never_overwritten_silently(tmp_path, tiny_data):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "precious.txt").write_text("keep")
    with pytest.raises(BonetumorError, match="--overwrite"):
        fit(tiny_config(tiny_data, epochs=1), tmp_path / "r", verbose=False)
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep"
    with pytest.raises(BonetumorError, match="did not write"):  # not bonetumor's folder: not even then
        fit(tiny_config(tiny_data, epochs=1), tmp_path / "r", overwrite=True, verbose=False)
    assert (tmp_path / "r" / "precious.txt").read_text() == "keep"


def test_resume_without_a_run(tmp_path, tiny_data):
    with pytest.raises(BonetumorError, match="nothing to resume"):
        fit(tiny_config(tiny_data), tmp_path / "none", resume=True, verbose=False)


def test_bad_file_stops_or_is_skipped_and_listed(tmp_path):
    data = make_class_tree(tmp_path / "d", n=8, size=32)
    (data / "normal" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(BadImageError, match="corrupt.png"):
        fit(tiny_config(data, epochs=1, test_fraction=0.0, val_fraction=0.25), tmp_path / "r1", verbose=False)
    fit(tiny_config(data, epochs=1, test_fraction=0.0, val_fraction=0.25, skip_bad_files=True), tmp_path / "r2", verbose=False)
    rows = list(csv.DictReader(open(tmp_path / "r2" / "skipped_files.csv")))
    assert len(rows) == 1 and rows[0]["path"].endswith("corrupt.png") and rows[0]["problem"]


def test_class_balanced_weight_and_multiclass(tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    from bonetumor.task import Task
    from bonetumor.train.setup import create_loss, prepare_data

    data = tmp_path / "d"
    for c, n in (("a", 9), ("b", 6), ("c", 3)):  # unbalanced: the weights must differ
        make_class_tree(data, classes=(c,), n=n, size=32)
    cfg = tiny_config(data, epochs=1, class_balanced=True, test_fraction=0.0, val_fraction=0.34)
    index = prepare_data(cfg)
    labels = [s.label for s in index.split("train")]
    loss = create_loss(index, cfg, torch.device("cpu"), Task.of(index.classes))
    expected = compute_class_weight("balanced", classes=np.array(index.classes), y=np.array(labels))
    assert np.allclose(loss.weight.numpy(), expected) and len(set(expected.round(6))) == 3
    r = fit(cfg, tmp_path / "r", verbose=False)
    ck = load_checkpoint(r.run_dir / "best.pt")
    assert ck.classes == ["a", "b", "c"] and ck.model.head[-1].out_features == 3
    binary = tmp_path / "bin"
    make_class_tree(binary, classes=("cancer",), n=4, size=32)
    make_class_tree(binary, classes=("normal",), n=12, size=32)
    bcfg = tiny_config(binary, class_balanced=True, test_fraction=0.0, val_fraction=0.25)
    bindex = prepare_data(bcfg)
    n_pos = sum(s.label == "cancer" for s in bindex.split("train"))
    pos_weight = create_loss(bindex, bcfg, torch.device("cpu"), Task.of(bindex.classes)).pos_weight
    assert float(pos_weight) == pytest.approx((len(bindex.split("train")) - n_pos) / n_pos) and float(pos_weight) > 1


def test_train_split_with_one_class_is_refused(tmp_path):
    data = tmp_path / "d"
    make_class_tree(data / "train", classes=("cancer",), n=4)
    make_class_tree(data / "valid", n=2)
    with pytest.raises(BonetumorError, match="train split holds only"):
        fit(tiny_config(data, epochs=1), tmp_path / "r", verbose=False)


def _bright_discs(root, size=32, n_train=16, n_valid=8, seed=0):
    """An easy task: a bright disc somewhere in cancer images, noise alone in normal ones."""
    from bonetumor.data.writers import write_png

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for split, n in (("train", n_train), ("valid", n_valid)):
        for label in ("cancer", "normal"):
            for i in range(n):
                img = 0.3 + 0.1 * rng.standard_normal((size, size))
                if label == "cancer":
                    cy, cx = rng.integers(size // 4, 3 * size // 4, 2)
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 < (size // 6) ** 2] += 0.5
                write_png(root / split / label / f"{i}.png", np.clip(img, 0, 1))
    return root


def test_bf16_training_on_cpu_learns_and_records_its_precision(tmp_path):
    data = _bright_discs(tmp_path / "d")
    # 8 epochs: on a CPU without native bf16 (emulated, AVX2) the validation AUC climbs later
    r = fit(tiny_config(data, precision="bf16", epochs=8, audit=False), tmp_path / "r", verbose=False)
    loss = [float(h["train_loss"]) for h in r.history]
    auc = [float(h["val_roc_auc"]) for h in r.history]
    assert loss[-1] < 0.5 * loss[0]  # it learns the training images...
    assert max(auc) >= 0.9 and max(auc) > auc[0] + 0.15  # ...and what tells the classes apart (16 images)
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["precision"] == "bf16"
    with pytest.raises(BonetumorError, match="fp16 needs a CUDA GPU"):
        fit(tiny_config(data, precision="fp16", device="cpu"), tmp_path / "r2", verbose=False)


def _train_cmd(data, out, *extra):
    return [sys.executable, "-m", "bonetumor.cli", "train", str(data), "--out", str(out), "--epochs", "4",
            "--image-size", "64", "--batch-size", "2", "--weights", "none", "--freeze", "none", "--device", "cpu",
            "--seed", "5", "--workers", "0", "--no-audit", "--checkpoint-seconds", "0", *extra]


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_result(tmp_path, tiny_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # same thread count in every process: same float sums
    subprocess.run(_train_cmd(tiny_data, tmp_path / "full"), env=env, check=True, capture_output=True, timeout=600)
    proc = subprocess.Popen(_train_cmd(tiny_data, tmp_path / "cut"), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    history = tmp_path / "cut" / "history.csv"
    deadline = time.time() + 300
    while not (history.is_file() and len(list(csv.DictReader(open(history)))) >= 1):
        assert proc.poll() is None and time.time() < deadline, "training ended before its first epoch was written"
        time.sleep(0.05)
    epoch_seconds = float(list(csv.DictReader(open(history)))[0]["seconds"])
    time.sleep(0.4 * epoch_seconds)  # well inside epoch 2
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    state = torch.load(tmp_path / "cut" / "last.pt", weights_only=True)  # loadable, not half-written
    assert 1 <= state["epoch"] < 4
    (tmp_path / "cut" / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # as a kill mid-write leaves
    subprocess.run(_train_cmd(tiny_data, tmp_path / "cut", "--resume"), env=env, check=True, capture_output=True,
                   timeout=600)
    assert not list((tmp_path / "cut").glob(".*.tmp"))
    strip = lambda p: [{k: v for k, v in r.items() if k != "seconds"} for r in csv.DictReader(open(p))]  # noqa: E731
    assert strip(history) == strip(tmp_path / "full" / "history.csv") and len(strip(history)) == 4
    wf = torch.load(tmp_path / "full" / "best.pt", weights_only=True)
    wc = torch.load(tmp_path / "cut" / "best.pt", weights_only=True)
    assert wf["epoch"] == wc["epoch"] and wf["threshold"] == pytest.approx(wc["threshold"], abs=1e-6)
    assert all(torch.allclose(wf["model"][k].float(), wc["model"][k].float(), atol=1e-6) for k in wf["model"])


def test_full_disk_is_refused_before_training(tmp_path, tiny_data, monkeypatch):
    import shutil

    from bonetumor import files as utils

    monkeypatch.setattr(utils.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12 - 10 * 2**20, 10 * 2**20))
    with pytest.raises(BonetumorError, match=r"only 10 MB free on its disk, and a training run needs about \d[\d,]* MB"):
        fit(tiny_config(tiny_data), tmp_path / "r", verbose=False)
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_disk_full_mid_run_keeps_the_last_checkpoint_and_resumes(tmp_path, tiny_data, monkeypatch):
    import errno

    full = fit(tiny_config(tiny_data, epochs=2, checkpoint_seconds=0), tmp_path / "full", verbose=False)
    real_save, calls = torch.save, []

    def fills_up(obj, f, *a, **k):
        calls.append(f)
        if obj.get("epoch") == 2:  # the disk fills during epoch 2's checkpoint
            with open(f, "wb") as fh:
                fh.write(b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fills_up)
    with pytest.raises(BonetumorError, match=r"last.pt|best.pt") as e:
        fit(tiny_config(tiny_data, epochs=2, checkpoint_seconds=0), tmp_path / "r", verbose=False)
    assert "disk full while writing" in str(e.value) and "--resume" in str(e.value)
    assert load_checkpoint(tmp_path / "r" / "last.pt").epoch == 1  # the previous checkpoint, intact
    assert not list((tmp_path / "r").glob(".*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    resumed = fit(tiny_config(tiny_data, epochs=2, checkpoint_seconds=0), tmp_path / "r", resume=True, verbose=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(resumed.history) == strip(full.history)


def test_checkpoints_wait_for_their_interval_and_hold_the_same_best_epoch(tmp_path, tiny_data):
    cfg = tiny_config(tiny_data, epochs=4, freeze="backbone", feature_views=1)
    every_run, deferred_run = RunDir(tmp_path / "every"), RunDir(tmp_path / "deferred")
    every = fit(replace(cfg, checkpoint_seconds=0), every_run, verbose=False)
    deferred = fit(cfg, deferred_run, verbose=False)  # 30 s: only the end of this run writes
    written = lambda run: [n for n in run.written if n.endswith(".pt")]  # noqa: E731
    assert sorted(written(deferred_run)) == ["best.pt", "last.pt"]
    assert written(every_run).count("last.pt") == 4 and written(every_run).count("best.pt") >= 2  # each epoch; threshold
    assert deferred.best_epoch == every.best_epoch and deferred.history[-1]["val_loss"] == every.history[-1]["val_loss"]
    a, b = (load_checkpoint(tmp_path / r / "best.pt") for r in ("every", "deferred"))
    assert a.epoch == b.epoch == every.best_epoch and a.threshold == pytest.approx(b.threshold, abs=1e-6)
    assert all(torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) for k in a.model.state_dict())
    assert load_checkpoint(tmp_path / "deferred" / "last.pt").epoch == 4


def test_unwritable_output_folder_is_a_clear_error(tmp_path, tiny_data):
    (tmp_path / "file").write_text("x")
    with pytest.raises(BonetumorError, match="file/run: cannot write to output folder"):
        fit(tiny_config(tiny_data), tmp_path / "file" / "run", verbose=False)
    if sys.platform.startswith("linux"):  # not even root may create files in /proc
        with pytest.raises(BonetumorError, match="cannot write to output folder"):
            fit(tiny_config(tiny_data), "/proc/bonetumor-run", verbose=False)


def test_a_trained_backbone_is_written_at_once_not_held_in_memory(tmp_path, tiny_data):
    from bonetumor.model.backbones import create_model
    from bonetumor.train.checkpointer import Checkpointer

    cfg = tiny_config(tiny_data)
    held = Checkpointer(RunDir(tmp_path / "a"), create_model("resnet50", "none", freeze="backbone"), cfg, ["n", "c"], 30)
    written = Checkpointer(RunDir(tmp_path / "b"), create_model("resnet50", "none", freeze="none"), cfg, ["n", "c"], 30)
    assert held.holds and not written.holds  # a frozen backbone's snapshot shares its 94 MB; a trained one's would copy it
    run = RunDir(tmp_path / "r")
    # an interval longer than the run: a loaded machine must not make an interval write due
    res = fit(tiny_config(tiny_data, epochs=3, patience=5, audit=False, checkpoint_seconds=3600), run, verbose=False)
    improved = sum(1 for i, row in enumerate(res.history)
                   if float(row["val_loss"]) < min([float(r["val_loss"]) for r in res.history[:i]] + [float("inf")]))
    # best.pt at each improvement, then its operating point; last.pt at the end
    assert run.written.count("best.pt") == improved + 1 and run.written.count("last.pt") == 1
    assert load_checkpoint(tmp_path / "r" / "best.pt").epoch == res.best_epoch


def test_checkpointer_writes_when_due_and_holds_the_best_until_then(tmp_path):
    from bonetumor.model.backbones import create_model
    from bonetumor.train.checkpointer import Checkpointer

    now = [0.0]
    model = create_model("resnet50", "none", freeze="backbone")
    opt = torch.optim.Adam(model.head.parameters())
    run = RunDir(tmp_path)
    ck = Checkpointer(run, model, tiny_config(None), ["normal", "cancer"], every_seconds=10, clock=lambda: now[0])
    ck.epoch_end(1, improved=True, final=False, optimizer=opt, scaler=None, extra={})
    assert run.written == [] and ck.has_best  # held in memory, nothing due yet
    now[0] = 11.0
    ck.epoch_end(2, improved=False, final=False, optimizer=opt, scaler=None, extra={})
    assert run.written == ["best.pt", "last.pt"]  # due: the held best, then last
    ck.epoch_end(3, improved=True, final=True, optimizer=opt, scaler=None, extra={})
    assert run.written == ["best.pt", "last.pt", "last.pt"]  # the final best waits for its operating point
    ck.finish({"threshold": 0.3})
    assert run.written[-1] == "best.pt"
    best = load_checkpoint(tmp_path / "best.pt")
    assert best.epoch == 3 and best.threshold == 0.3 and load_checkpoint(tmp_path / "last.pt").epoch == 3


def test_freeze_auto_trains_a_random_backbone_and_warns_when_told_to_freeze_one(tiny_data, tmp_path):
    from bonetumor.model.backbones import resolve_freeze

    assert resolve_freeze("auto", "imagenet") == "backbone" and resolve_freeze("auto", "w.pt") == "backbone"
    assert resolve_freeze("auto", "none") == "none" and resolve_freeze("backbone", "none") == "backbone"
    fit(tiny_config(tiny_data, freeze="auto", epochs=1), tmp_path / "auto", verbose=False)
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["freeze"] == "none"
    # Adam keeps a state for each parameter it trained: the whole backbone, not the head's four.
    state = torch.load(tmp_path / "auto" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) > 100
    with pytest.warns(UserWarning, match="frozen backbone is random"):
        fit(tiny_config(tiny_data, freeze="backbone", epochs=1, cache_features=False), tmp_path / "frozen",
            verbose=False)
    state = torch.load(tmp_path / "frozen" / "last.pt", weights_only=True)["optimizer"]["state"]
    assert len(state) == 4


@pytest.mark.bad_input
def test_a_real_failed_write_is_one_line_not_torchs_runtime_error(tmp_path, tiny_data):
    """torch.save reports a failed write as RuntimeError("unexpected pos ..."), not OSError: here a
    file size limit (RLIMIT_FSIZE) makes the write fail for real, as a full disk does."""
    import resource
    import signal
    import subprocess
    import sys

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 * 2**20, 20 * 2**20))  # a ResNet50 checkpoint is 94 MB

    r = subprocess.run([sys.executable, "-m", "bonetumor", "train", str(tiny_data), "--out", str(tmp_path / "r"),
                        "--epochs", "1", "--image-size", "32", "--batch-size", "16", "--weights", "none", "--freeze",
                        "none", "--no-audit", "--device", "cpu"], capture_output=True, text=True, preexec_fn=limited)
    said = r.stdout + r.stderr
    assert r.returncode == 2 and "Traceback" not in said, said
    assert "disk full while writing" in said and "--resume" in said and ".pt" in said, said
    assert not list((tmp_path / "r").glob(".*.tmp"))  # no half-written file left
