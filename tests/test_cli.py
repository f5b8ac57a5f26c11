"""Every command through the CLI, as a user types it."""

import json

import pytest
from typer.testing import CliRunner

from bonetumor.cli import app

runner = CliRunner()


def _run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_synth_train_evaluate_predict(tmp_path):
    code, out = _run("synth", tmp_path / "d", "--n-patients", 8, "--size", 32, "--seed", 2, "--modality", "xray")
    assert code == 0 and "wrote 32 images" in out
    code, out = _run("train", tmp_path / "d", "--out", tmp_path / "r", "--epochs", 1, "--image-size", 32,
                     "--batch-size", 8, "--weights", "none", "--freeze", "none", "--device", "cpu", "--seed", 1,
                     "--workers", 0, "--patience", 3, "--lr", 0.001, "--backbone", "resnet50")
    assert code == 0, out
    assert (tmp_path / "r" / "best.pt").is_file()
    code, out = _run("evaluate", tmp_path / "r" / "best.pt", tmp_path / "d", "--out", tmp_path / "e")
    assert code == 0 and "ROC-AUC" in out and "roc_auc" not in out and (tmp_path / "e" / "metrics.json").is_file()
    code, out = _run("predict", tmp_path / "r" / "best.pt", tmp_path / "d" / "test", "--json")
    lines = [json.loads(x) for x in out.strip().splitlines()]
    assert code == 0 and len(lines) == 8 and {"path", "probability", "label", "threshold"} <= set(lines[0])
    assert all(0 <= x["probability"] <= 1 and x["label"] in ("cancer", "normal") for x in lines)
    code, out = _run("predict", tmp_path / "r" / "best.pt", tmp_path / "d" / "test" / "cancer")
    assert code == 0 and "probability" in out


def test_audit_command_and_strict_exit_code(tmp_path, tiny_data):
    import shutil

    code, out = _run("audit", tiny_data, "--out", tmp_path / "a", "--strict")
    assert code == 0 and "no leakage found" in out and (tmp_path / "a" / "audit.json").is_file()
    data = tmp_path / "d"
    shutil.copytree(tiny_data, data)
    (data / "manifest.csv").unlink()
    shutil.copy(next((data / "train" / "normal").glob("*.png")), data / "test" / "normal" / "dup.png")
    code, out = _run("audit", data)
    assert code == 0 and "1 of 9 test images copy or nearly copy a training image (1 exact)" in out
    code, _ = _run("audit", data, "--strict")
    assert code == 1
    code, out = _run("audit")
    assert code == 2 and "no data given" in out


@pytest.mark.slow
def test_cv_command(tmp_path, tiny_data):
    code, out = _run("cv", tiny_data, "--out", tmp_path / "cv", "--folds", 2, "--epochs", 1, "--image-size", 32,
                     "--weights", "none", "--freeze", "none", "--device", "cpu", "--seed", 3)
    assert code == 0, out
    assert "2-fold cross-validation" in out and "mean" in out and "pooled out-of-fold ROC-AUC" in out
    assert (tmp_path / "cv" / "oof_predictions.csv").is_file() and (tmp_path / "cv" / "cv.json").is_file()


def test_report_command(tmp_path, tiny_run, tiny_data):
    code, out = _run("evaluate", tiny_run / "best.pt", tiny_data, "--out", tmp_path / "e")
    assert code == 0, out
    code, out = _run("report", tiny_run, "--eval", tmp_path / "e", "--out", tmp_path / "r.html")
    assert code == 0 and "report written" in out and (tmp_path / "r.html").stat().st_size > 10_000
    code, out = _run("report", tmp_path)
    assert code == 2 and "not a run folder" in out


def test_config_file_and_unfreeze_flag(tmp_path, tiny_data):
    (tmp_path / "c.yaml").write_text("epochs: 1\nimage_size: 32\nbatch_size: 8\nweights: none\nlr: 0.01\n")
    code, out = _run("train", tiny_data, "--out", tmp_path / "r", "--config", tmp_path / "c.yaml",
                     "--lr", "0.0005", "--unfreeze", "layer4", "--device", "cpu")
    assert code == 0, out
    text = (tmp_path / "r" / "config.yaml").read_text()
    assert "lr: 0.0005" in text and "- layer4" in text and "epochs: 1" in text


@pytest.mark.parametrize("args,needle", [
    (["train", "{tmp}/missing", "--out", "{tmp}/r", "--weights", "none"], "data folder not found"),
    (["train", "{tmp}/bad", "--out", "{tmp}/r", "--weights", "none", "--image-size", "32"], "broken.png"),
    (["predict", "{tmp}/nope.pt", "x.png"], "nope.pt: file not found"),
    (["evaluate", "{tmp}/bad/normal/broken.png", "{tmp}/bad", "--out", "{tmp}/e"], "not a readable PyTorch file"),
    (["train", "{tmp}/bad", "--out", "{tmp}/r", "--backbone", "vgg"], "unknown backbone"),
    (["synth", "{tmp}/s", "--modality", "ct"], "unknown modality"),
])
def test_errors_are_one_line_without_traceback(tmp_path, args, needle):
    from conftest import make_class_tree

    make_class_tree(tmp_path / "bad", n=3)
    (tmp_path / "bad" / "normal" / "broken.png").write_bytes(b"not an image")
    code, out = _run(*[a.format(tmp=tmp_path) for a in args])
    assert code == 2, out
    assert needle in out and "Traceback" not in out
    assert out.strip().startswith("error:") and len(out.strip().splitlines()) <= 3  # one (soft-wrapped) line


def test_fetch_weights_offline_says_what_to_do(monkeypatch):
    import urllib.error

    import torchvision

    def offline(*a, **k):
        raise urllib.error.URLError("Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    code, out = _run("fetch-weights", "--backbone", "densenet121")
    assert code == 2 and "densenet121" in out and "--weights PATH" in out and "Traceback" not in out


def test_train_and_cv_take_every_config_option_as_a_flag():
    import typer

    from bonetumor.config import options

    commands = typer.main.get_command(app).commands
    for name in ("train", "cv"):
        params = {p.name for p in commands[name].params}
        assert {f.name for f, opt in options() if opt.cli} <= params, name
    code, out = _run("train", "--help")
    assert code == 0 and all(title in out for title in ("Data", "Reading and preprocessing", "Model", "Optimisation",
                                                        "Runtime", "Output"))


@pytest.mark.parametrize("command,args,needle", [
    ("train", ["--zoom-min", "1.2", "--zoom-max", "1.1"], "--zoom-min must not exceed --zoom-max"),
    ("train", ["--dropout", "1.5"], "--dropout must be in [0, 1), not 1.5"),
    ("cv", ["--lr", "-1"], "--lr must be positive, not -1.0"),
    ("cv", ["--no-hflip", "--lr-schedule", "step"], "--lr-schedule must be constant or cosine, not 'step'"),
])
def test_config_flags_reach_the_config(tmp_path, tiny_data, command, args, needle):
    code, out = _run(command, tiny_data, "--out", tmp_path / "r", *args)
    assert code == 2 and needle in out and not (tmp_path / "r").exists()


def test_flags_override_the_yaml_file_and_lists_split_on_commas(tmp_path):
    from bonetumor.config import load_config

    (tmp_path / "c.yaml").write_text("hflip: false\nunfreeze: [layer3]\nepochs: 3\n")
    cfg = load_config(tmp_path / "c.yaml", {"hflip": True, "unfreeze": "layer4, layer2", "epochs": None})
    assert cfg.hflip is True and cfg.unfreeze == ["layer4", "layer2"] and cfg.epochs == 3


def test_every_flag_has_help_a_panel_and_its_default():
    import typer.core
    import typer.main

    group = typer.main.get_command(app)
    seen = 0
    for name, cmd in group.commands.items():
        for p in cmd.params:
            if not isinstance(p, typer.core.TyperOption) or p.name == "help":
                continue
            seen += 1
            assert p.help, (name, p.opts)
            assert p.rich_help_panel in ("Data", "Reading and preprocessing", "Model", "Optimisation", "Runtime",
                                         "Output"), (name, p.opts, p.rich_help_panel)
            assert p.required or p.default is not None or isinstance(p.show_default, str), (name, p.opts)
    assert seen > 100
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    for flag, default in (("--epochs", "30"), ("--image-size", "224"), ("--batch-size", "32"), ("--lr", "0.001"),
                          ("--seed", "42"), ("--weights", "imagenet"), ("--freeze", "auto")):
        text = r.output[r.output.index(f"│ {flag} "):]
        block = text[:text.index("│ --", 3)]  # the flag's lines, up to the next flag
        assert f"[default: ({default})]" in block or f"[default: {default}]" in block, block


def test_version_and_a_quick_help():
    from bonetumor import __version__

    r = runner.invoke(app, ["--version"])
    assert r.exit_code == 0 and r.output.strip() == f"bonetumor {__version__}"
    import subprocess
    import sys

    code = "import sys, bonetumor.cli; print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'matplotlib') if m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "[]"
