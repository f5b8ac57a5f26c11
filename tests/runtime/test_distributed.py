"""Training under torchrun (gloo, CPU): two ranks x 16 images a step train as one rank x 32.

The runs are real torchrun jobs (``python -m torch.distributed.run``), one thread per rank.
Without dropout and augmentation, and with batch norm normalising with fixed statistics, two
ranks' averaged gradients over 16 images each are the gradient over the 32: the same first
epoch's losses and weights, within float32 summation order.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_image

from bonetumor.model.serialization import read_checkpoint_file

CONFIG = """image_size: 32
epochs: 1
lr: 0.001
weights: none
freeze: none
bn_statistics: frozen
dropout: 0.0
hflip: false
rotate_degrees: 0.0
zoom_min: 1.0
zoom_max: 1.0
ood_quantile: 0.0
device: cpu
workers: 0
precision: fp32
audit: false
seed: 3
"""


@pytest.fixture(scope="module")
def ddp_data(tmp_path_factory) -> Path:
    """64 training images (two steps of 32), 12 validation, 8 test, 32 px."""
    root = tmp_path_factory.mktemp("ddp") / "data"
    k = 0
    for split, n in (("train", 32), ("valid", 6), ("test", 4)):
        for label in ("cancer", "normal"):
            for i in range(n):
                write_image(root / split / label / f"{label}_{i}.png", size=32, seed=k)
                k += 1
    (root.parent / "cfg.yaml").write_text(CONFIG)
    return root


def torchrun(nproc: int, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
           "-m", "bonetumor", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _history(run: Path) -> dict:
    lines = (run / "history.csv").read_text().splitlines()
    return dict(zip(lines[0].split(","), lines[1].split(",")))


def test_two_ranks_of_16_train_as_one_rank_of_32(ddp_data):
    work = ddp_data.parent
    for nproc, batch in ((1, 32), (2, 16)):
        p = torchrun(nproc, "train", "data", "--config", "cfg.yaml", "--batch-size", str(batch), "--out", f"r{nproc}", cwd=work)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("best epoch 1") == 1  # one closing line for the job, from rank 0
    one, two = _history(work / "r1"), _history(work / "r2")
    # the training loss over the epoch, and the validation loss with each rank scoring its share
    for key in ("train_loss", "train_accuracy", "val_loss", "val_accuracy"):
        assert float(two[key]) == pytest.approx(float(one[key]), rel=1e-5, abs=1e-6), key
    a, b = read_checkpoint_file(work / "r1" / "best.pt")["model"], read_checkpoint_file(work / "r2" / "best.pt")["model"]
    assert a.keys() == b.keys()
    # Two Adam steps at lr 1e-3 move each weight by up to 2e-3. All but 1 in 10,000 weights agree
    # to 1e-6; a weight whose gradient is near zero has an Adam step (m / sqrt(v)) that fp32
    # summation order can swing, so the worst may differ by up to a quarter of that move (seen:
    # 1.2e-4 on an AVX-512 CPU, 13 of 24 million weights past 1e-5). Without DDP's averaging,
    # most weights differ by a whole step.
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a if a[k].is_floating_point()])
    assert float((diffs > 1e-6).double().mean()) < 1e-4
    assert float(diffs.max()) < 5e-4
    # rank 0 alone wrote the run: the same records as one process
    assert sorted(p.name for p in (work / "r2").iterdir()) == sorted(p.name for p in (work / "r1").iterdir())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_nodes_on_one_machine_train_as_two_ranks_on_one(ddp_data):
    work = ddp_data.parent
    if not (work / "r2").is_dir():
        assert torchrun(2, "train", "data", "--config", "cfg.yaml", "--batch-size", "16", "--out", "r2", cwd=work).returncode == 0
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                              "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                              "--rdzv-id", "bonetumor-test", "-m", "bonetumor", "train", "data", "--config", "cfg.yaml",
                              "--batch-size", "16", "--out", "nodes"],
                             cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for node in (0, 1)]
    outs = [j.communicate(timeout=300) for j in jobs]
    assert [j.returncode for j in jobs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert _history(work / "nodes") == {**_history(work / "r2"), "seconds": _history(work / "nodes")["seconds"]}
    env_record = (work / "nodes" / "environment.json").read_text()
    assert '"world_size": 2' in env_record and '"backend": "gloo"' in env_record


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_stops_the_job_with_one_line_and_resume_finishes_it_on_one_process(ddp_data):
    import signal
    import time

    work = ddp_data.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "bonetumor", "train", "data", "--config", "cfg.yaml", "--epochs", "20",
                            "--checkpoint-seconds", "0", "--batch-size", "16", "--nproc-per-node", "2", "--out", "killed"],
                           cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (work / "killed" / "last.pt").exists() and time.time() < deadline and job.poll() is None:
        time.sleep(0.2)
    victim = None
    for pid in Path("/proc").iterdir():
        try:
            environ = (pid / "environ").read_bytes().split(b"\0")
            cmdline = (pid / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue
        if b"RANK=1" in environ and b"killed" in cmdline and b"bonetumor" in cmdline:
            victim = int(pid.name)
    assert victim is not None, "rank 1 not found"
    os.kill(victim, signal.SIGKILL)
    out, err = job.communicate(timeout=120)
    assert job.returncode == 2
    assert "error: rank 1 of 2 was killed by SIGKILL, so torchrun stopped the job" in err
    assert "add --resume to continue the run" in err and "Traceback" not in err
    done = int(_history(work / "killed")["epoch"])  # the first row; the run stopped early in its 20 epochs
    rows = (work / "killed" / "history.csv").read_text().splitlines()[1:]
    assert done == 1 and len(rows) < 20
    # another world size: one process continues the two ranks' run
    p = subprocess.run([sys.executable, "-m", "bonetumor", "train", "--resume", "--out", "killed", "--epochs", "20"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = (work / "killed" / "history.csv").read_text().splitlines()[1:]
    assert [int(r.split(",")[0]) for r in rows] == list(range(1, len(rows) + 1)) and len(rows) >= 6  # patience 5
    assert (work / "killed" / "best.pt").exists() and (work / "killed" / "operating_point.json").exists()


def test_sharded_evaluate_and_predict_write_exactly_what_one_process_writes(tiny_run, tiny_data, tmp_path):
    import shutil

    ck = tiny_run / "best.pt"
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    (data / "test" / "cancer" / "zz_broken.png").write_text("not an image")  # predict keeps a row where it stood
    files = [str(data / "test" / "cancer"), str(data / "test" / "normal")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, launcher in (("one", [sys.executable, "-m", "bonetumor"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                    "-m", "bonetumor"])):
        for args in (["evaluate", str(ck), str(tiny_data), "--out", f"eval_{name}", "--device", "cpu"],
                     ["predict", str(ck), *files, "--out", f"pred_{name}", "--skip-bad-files", "--device", "cpu"]):
            p = subprocess.run(launcher + args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, p.stderr[-3000:]
            if name == "two" and args[0] == "evaluate":
                assert p.stdout.count("ROC-AUC") == (tmp_path / "one_stdout.txt").read_text().count("ROC-AUC")
            if name == "one" and args[0] == "evaluate":
                (tmp_path / "one_stdout.txt").write_text(p.stdout)
    one, two = tmp_path / "eval_one", tmp_path / "eval_two"
    assert (two / "predictions.csv").read_text() == (one / "predictions.csv").read_text()
    assert (two / "metrics.json").read_text() == (one / "metrics.json").read_text()
    assert (two / "classification_report.txt").read_text() == (one / "classification_report.txt").read_text()
    rows = (tmp_path / "pred_two" / "predictions.csv").read_text()
    assert rows == (tmp_path / "pred_one" / "predictions.csv").read_text()
    assert rows.count("\n") == 10 and "zz_broken.png" in rows  # header, 8 images and the broken file's row


def test_sharded_explain_writes_what_one_process_writes(tiny_run, tiny_data, tmp_path):
    """Two ranks explain 2-D images and a volume (kept whole on one rank) into the files one
    process writes: the same rows in the same order, the same map and panel names, maps equal
    within float32 rounding (each rank's batches hold other images), and every file recorded."""
    import json

    import nibabel as nib
    import numpy as np

    from bonetumor.files import recorded_names

    vol = np.random.default_rng(0).random((32, 32, 5)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), tmp_path / "vol.nii.gz")
    files = [str(tiny_data / "test" / "cancer"), str(tmp_path / "vol.nii.gz"), str(tiny_data / "test" / "normal")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["explain", str(tiny_run / "best.pt"), *files, "--batch-size", "3", "--top-slices", "2", "--device", "cpu"]
    for name, launcher in (("one", [sys.executable, "-m", "bonetumor"]),
                           ("two", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                                    "-m", "bonetumor"])):
        p = subprocess.run(launcher + args + ["--out", name], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("images explained") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / n / "explain.json").read_text()) for n in ("one", "two"))
    assert len(one["images"]) == len(two["images"]) == 8 + 2
    for a, b in zip(one["images"], two["images"]):
        for k, v in a.items():
            assert b[k] == pytest.approx(v, abs=1e-5) if isinstance(v, float) else b[k] == v, k
        ma, mb = np.load(tmp_path / "one" / a["map"]), np.load(tmp_path / "two" / b["map"])
        assert np.abs(ma - mb).max() < 1e-5
    assert [r["slice"] for r in two["images"] if r["study"]] == [r["slice"] for r in one["images"] if r["study"]]
    for k in ("deletion", "insertion"):
        assert two["faithfulness"][k]["n"] == one["faithfulness"][k]["n"] == 10
        assert two["faithfulness"][k]["value"] == pytest.approx(one["faithfulness"][k]["value"], abs=1e-5)
    written = {str(q.relative_to(tmp_path / "two")) for q in (tmp_path / "two").rglob("*.*") if q.is_file()}
    assert written - {".bonetumor"} <= set(recorded_names(tmp_path / "two"))
    assert sum(n.startswith("maps/") for n in written) == 10


@pytest.mark.slow
def test_cv_with_nproc_per_node_writes_what_one_process_writes(ddp_data):
    """``cv --nproc-per-node 2`` (the launcher started for you): the same folds and the same
    held-out rows, in the same order, as one process. At a learning rate of 1e-12 training leaves
    the shared initial weights as they were, so the two runs' probabilities agree to 1e-6 whatever
    the batches (within one step of the 6 written decimals); that the two ranks' steps equal one process's is the first test's."""
    import csv
    import json

    work = ddp_data.parent
    runs = {}
    for name, extra in (("one", []), ("two", ["--nproc-per-node", "2"])):
        cmd = [sys.executable, "-m", "bonetumor", "cv", "data", "--config", "cfg.yaml", "--folds", "2", "--lr", "1e-12",
               "--out", f"cv_{name}", *extra]
        p = subprocess.run(cmd, cwd=work, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
        assert p.stdout.count("pooled out-of-fold ROC-AUC") == 1  # rank 0 alone reports
        with open(work / f"cv_{name}" / "oof_predictions.csv") as f:
            runs[name] = list(csv.DictReader(f))
        assert (work / f"cv_{name}" / "fold_2" / "best.pt").is_file()
    one, two = runs["one"], runs["two"]
    assert len(one) == len(two) == 76  # train and valid pooled; the given test split left out
    for a, b in zip(one, two):
        assert (a["path"], a["label"], a["fold"]) == (b["path"], b["label"], b["fold"])
        assert abs(float(a["probability"]) - float(b["probability"])) <= 2e-6  # 6 decimals written
    env = json.loads((work / "cv_two" / "fold_1" / "environment.json").read_text())
    assert env["distributed"]["world_size"] == 2


@pytest.mark.slow
def test_a_lesion_guided_run_trains_under_torchrun(ddp_data):
    """``--lesion-masks`` with two ranks: the Grad-CAM term goes through DistributedDataParallel
    (its gradient is taken at an activation, the weights' once by backward), and the epoch's
    share of the maps outside the lesions is summed over both ranks' images. At a learning rate
    of 1e-9 the weights stay as initialised, so that share is the one process's to 1e-5."""
    import csv

    import numpy as np
    from PIL import Image

    work = ddp_data.parent
    for k, img in enumerate(sorted((ddp_data / "train" / "cancer").glob("*.png"))):
        mask = np.zeros((32, 32), np.uint8)
        mask[4 + k % 16:14 + k % 16, 8:20] = 255
        (work / "masks" / "train" / "cancer").mkdir(parents=True, exist_ok=True)
        Image.fromarray(mask).save(work / "masks" / "train" / "cancer" / img.name)
    outside = {}
    for nproc, batch in ((1, "32"), (2, "16")):
        p = torchrun(nproc, "train", "data", "--config", "cfg.yaml", "--batch-size", batch, "--lr", "1e-9",
                     "--lesion-masks", "masks", "--out", f"guided{nproc}", cwd=work)
        assert p.returncode == 0, p.stderr[-3000:]
        with open(work / f"guided{nproc}" / "history.csv") as f:
            outside[nproc] = float(next(csv.DictReader(f))["train_outside_lesion"])
    assert 0 < outside[1] < 2
    assert outside[2] == pytest.approx(outside[1], abs=1e-5)


def test_bad_input_stops_every_rank_with_one_line_from_rank_0(ddp_data, tmp_path):
    """A broken image found by one rank stops the whole job with the one line a lone process
    prints: through ``--nproc-per-node`` nothing else (torchrun's own log lines held back, no run
    folder left), and under plain torchrun rank 0 says rank 1's error while neither rank dies in
    a collective (gloo's "Connection closed by peer") nor prints a traceback of its own."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(ddp_data, data)
    (data / "train" / "cancer" / "zz_broken.png").write_text("not an image")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "bonetumor", "train", "data", "--config", str(ddp_data.parent / "cfg.yaml"),
                        "--nproc-per-node", "2", "--out", "run"], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    line = "error: data/train/cancer/zz_broken.png: not an image file (unrecognised format)"
    assert p.returncode == 2
    assert p.stdout == "" and p.stderr.startswith(line) and p.stderr.count("\n") == 1, p.stderr[-3000:]
    assert not (tmp_path / "run").exists()
    # explain shares the files rank::world: rank 0 takes a_good.png, rank 1 b_broken.png
    files = tmp_path / "files"
    files.mkdir()
    shutil.copy(ddp_data / "test" / "cancer" / "cancer_0.png", files / "a_good.png")
    (files / "b_broken.png").write_text("not an image")
    shutil.copy(ddp_data.parent / "cfg.yaml", tmp_path / "cfg.yaml")
    p = subprocess.run([sys.executable, "-m", "bonetumor", "train", "data", "--config", "cfg.yaml", "--skip-bad-files",
                        "--epochs", "1", "--out", "ok"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    p = torchrun(2, "explain", "ok/best.pt", "files", "--out", "maps", cwd=tmp_path)
    said = p.stdout + p.stderr
    assert p.returncode != 0
    assert [x for x in said.splitlines() if x.startswith("error:")] == [
        "error: files/b_broken.png: not an image file (unrecognised format)"]
    assert "Connection closed" not in said and "bonetumor/" not in said  # no frame of ours in a traceback
