"""Precision auto: the device's native reduced precision, kept only when it agrees with fp32."""

import json

import pytest
import torch
import yaml
from conftest import tiny_config

from bonetumor import fit
from bonetumor.model.backbones import create_model
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
    fit(tiny_config(tiny_data, epochs=2), tmp_path / "r", resume=True, verbose=False)
    assert yaml.safe_load((tmp_path / "r" / "config.yaml").read_text())["precision"] == "bf16"


def test_predict_auto_stays_within_tolerance_of_fp32(tiny_run, tiny_data, monkeypatch):
    monkeypatch.setattr(prec, "cpu_has_fast_bf16", lambda: True)
    files = [tiny_data / "train"]
    exact = predict(tiny_run / "best.pt", files, device="cpu", batch_size=8)
    auto = predict(tiny_run / "best.pt", files, device="cpu", batch_size=8, precision="auto")
    bf16 = predict(tiny_run / "best.pt", files, device="cpu", batch_size=8, precision="bf16")
    assert len(exact) > 8
    d_auto = max(abs(a["probability"] - b["probability"]) for a, b in zip(exact, auto))
    d_bf16 = max(abs(a["probability"] - b["probability"]) for a, b in zip(exact, bf16))
    assert d_bf16 > 0 and (d_auto == 0 or d_auto == pytest.approx(d_bf16))  # auto is fp32 or bf16, nothing else
