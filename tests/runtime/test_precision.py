"""Precision auto: the device's native reduced precision, kept only when it agrees with fp32."""

import json

import pytest
import torch
import yaml
from conftest import tiny_config

from bonetumor import fit
from bonetumor.model.backbones import create_model
from bonetumor.model.checkpoint import write_checkpoint
from bonetumor.predict import predict
from bonetumor.runtime import precision as prec
from bonetumor.task import Task

PROBABILITIES = Task(("normal", "cancer")).probabilities


def test_auto_keeps_the_candidate_only_within_tolerance(monkeypatch):
    torch.manual_seed(0)
    model = create_model("resnet50", "none", "none")
    x = torch.randn(4, 3, 32, 32)
    cpu = torch.device("cpu")
    assert prec.resolve_precision("fp32", model, x, cpu, PROBABILITIES) == {"requested": "fp32", "chosen": "fp32"}
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    r = prec.resolve_precision("auto", model, x, cpu, PROBABILITIES)
    assert r["candidate"] == "bf16" and r["n"] == 4 and 0 < r["max_abs_diff_probability"] < 1
    assert r["chosen"] == ("bf16" if r["max_abs_diff_probability"] <= 0.01 else "fp32")
    monkeypatch.setattr(prec, "TOLERANCE", 0.0)
    assert prec.resolve_precision("auto", model, x, cpu, PROBABILITIES)["chosen"] == "fp32"  # any difference is too much
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)  # emulated bf16 is slow: not tried
    assert prec.resolve_precision("auto", model, x, cpu, PROBABILITIES) == {"requested": "auto", "candidate": "fp32", "chosen": "fp32"}


def test_training_records_and_keeps_its_choice(tmp_path, tiny_data, monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    monkeypatch.setattr(prec, "TOLERANCE", 1.0)  # accept bf16 whatever the untrained model says
    fit(tiny_config(tiny_data, precision="auto", epochs=1), tmp_path / "r", verbose=False)
    rec = json.loads((tmp_path / "r" / "precision.json").read_text())
    assert rec["requested"] == "auto" and rec["chosen"] == "bf16" and rec["n"] > 0
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["precision"] == "bf16"
    monkeypatch.setattr(prec, "TOLERANCE", 0.0)  # a resumed run does not choose again
    fit(tiny_config(tiny_data, precision="auto", epochs=2), tmp_path / "r", resume=True, verbose=False)
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["precision"] == "bf16"


def _job(folder, n=100):
    """``n`` different 32 px images."""
    from conftest import write_image

    return [write_image(folder / f"im{k:03d}.png", 32, seed=k) for k in range(n)]


def _cli_predict(checkpoint, path) -> list[dict]:
    from typer.testing import CliRunner

    from bonetumor.cli import app

    r = CliRunner().invoke(app, ["predict", str(checkpoint), str(path), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    return [json.loads(line) for line in r.output.splitlines() if line.startswith('{"path"')]


@pytest.mark.parametrize("trained", ["fp32", "bf16"])
def test_a_files_probability_does_not_depend_on_the_job(trained, tiny_run, tmp_path, monkeypatch):
    """One precision per model (chosen at training, kept in the checkpoint), whatever the job's size."""
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)  # so that bf16 is this CPU's native choice
    ck = torch.load(tiny_run / "best.pt", weights_only=True)
    ck["config"]["precision"] = trained
    write_checkpoint(tmp_path / "m.pt", ck)  # sealed anew, as a real file of that precision is
    files = _job(tmp_path / "job")
    # as a user runs it: the command's defaults
    alone = _cli_predict(tmp_path / "m.pt", files[37])[0]["probability"]
    job = _cli_predict(tmp_path / "m.pt", tmp_path / "job")
    assert len(job) == 100 and job[37]["path"] == str(files[37])
    assert abs(job[37]["probability"] - alone) <= 1e-6
    fp32 = predict(tmp_path / "m.pt", [files[37]], device="cpu", engine="torch", precision="fp32")[0]["probability"]
    assert (alone == fp32) if trained == "fp32" else (alone != fp32)  # the model's precision, not fp32 always
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: False)  # a device without it runs fp32
    assert predict(tmp_path / "m.pt", [files[37]], device="cpu", engine="torch")[0]["probability"] == fp32
