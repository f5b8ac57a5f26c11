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
    # Two Adam steps at lr 1e-3 move each weight by up to 2e-3: the ranks agree to a tenth of one step.
    worst = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    assert worst < 1e-4
    # rank 0 alone wrote the run: the same records as one process
    assert sorted(p.name for p in (work / "r2").iterdir()) == sorted(p.name for p in (work / "r1").iterdir())
