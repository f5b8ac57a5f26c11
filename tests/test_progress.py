"""Progress outside a terminal: plain lines with done/total, rate and ETA, in every long command."""

import io
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.progress import tracked


def test_plain_lines_say_done_total_rate_and_eta(monkeypatch):
    monkeypatch.setenv("BONETUMOR_PROGRESS_SECONDS", "0")
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=False, soft_wrap=True)
    assert list(tracked([[1, 2], [3, 4], [5]], 5, "evaluate", size=len, out=out)) == [[1, 2], [3, 4], [5]]
    lines = buf.getvalue().splitlines()
    assert re.fullmatch(r"evaluate: 2/5 images \(40%\), [\d.]+ images/s, ETA \d+:\d\d", lines[0])
    assert lines[2].startswith("evaluate: 5/5 images (100%)") and re.fullmatch(r"evaluate: 5 images in \d+:\d\d", lines[3])
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=False, soft_wrap=True)
    assert list(tracked(range(3), None, "explain", out=out)) == [0, 1, 2]
    assert re.match(r"explain: 1 images, [\d.]+ images/s$", buf.getvalue().splitlines()[0])


def test_a_short_job_prints_nothing_and_a_quiet_one_nothing_at_all(monkeypatch):
    buf = io.StringIO()
    out = Console(file=buf, force_terminal=False)
    assert list(tracked(range(3), 3, "x", out=out)) == [0, 1, 2]  # under 10 s: no line
    monkeypatch.setenv("BONETUMOR_PROGRESS_SECONDS", "0")
    assert list(tracked(range(3), 3, "x", out=out, enabled=False)) == [0, 1, 2]
    assert buf.getvalue() == ""


@pytest.mark.slow
def test_every_long_command_reports_progress_when_redirected(tiny_run, tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("BONETUMOR_PROGRESS_SECONDS", "0")
    run = CliRunner()
    common = ["--device", "cpu"]
    checks = [
        (["train", str(tiny_data), "--out", str(tmp_path / "r"), "--epochs", "1", "--image-size", "32", "--weights",
          "none", "--batch-size", "8", "--precision", "fp32", *common], [r"epoch 1/1: \d+/32 images", r"reading images \(audit\): \d+/48"]),
        (["evaluate", str(tiny_run / "best.pt"), str(tiny_data), "--out", str(tmp_path / "e"), *common], [r"evaluate: \d+/8 images"]),
        (["predict", str(tiny_run / "best.pt"), str(tiny_data / "test"), "--engine", "torch", *common], [r"predict: \d+/8 images"]),
        (["explain", str(tiny_run / "best.pt"), str(tiny_data / "test"), "--out", str(tmp_path / "x"), *common], [r"explain: \d+/8 images"]),
        (["audit", str(tiny_data), "--out", str(tmp_path / "a")], [r"reading images \(audit\): \d+/48 images"]),
    ]
    for args, patterns in checks:
        r = run.invoke(app, args)
        assert r.exit_code == 0, (args[0], r.output[-800:])
        for p in patterns:
            assert re.search(p + r".*ETA \d+:\d\d", r.stderr), (args[0], p, r.stderr[-800:])
