"""Experiment tracking read back with the libraries' own readers: MLflow's client on a real
SQLite store, TensorBoard's event reader on the run's event files; a failing store only warns."""

import json
import warnings

import pytest
from conftest import tiny_config

from bonetumor.evaluate.run import evaluate
from bonetumor.explain.run import explain
from bonetumor.files import RunDir, recorded_names
from bonetumor.tracking import TrackingWarning
from bonetumor.train import fit

pytest.importorskip("mlflow")
pytest.importorskip("tensorboard")


def _history(run):
    lines = (run / "history.csv").read_text().splitlines()
    keys = lines[0].split(",")
    return [dict(zip(keys, line.split(","))) for line in lines[1:]]


@pytest.mark.slow
def test_mlflow_holds_the_run_its_params_each_epoch_and_what_evaluate_adds(tiny_data, tmp_path):
    from mlflow.tracking import MlflowClient

    run = tmp_path / "runs" / "a"
    fit(tiny_config(tiny_data, epochs=2, tracker="mlflow"), run, verbose=False)
    record = json.loads((run / "tracking.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlruns.db').as_posix()}"
    client = MlflowClient(record["tracking_uri"])
    got = client.get_run(record["run_id"])
    assert got.info.status == "FINISHED" and got.info.run_name == "a"
    assert client.get_experiment(got.info.experiment_id).name == tiny_data.name
    assert got.data.params["lr"] == "0.001" and got.data.params["image_size"] == "32"
    assert got.data.params["backbone"] == "resnet50" and len(got.data.params) >= 50
    data = json.loads((run / "data.json").read_text())
    assert got.data.tags["data_fingerprint"] == data["fingerprint"] and got.data.tags["precision"] == "fp32"
    rows = _history(run)
    for key in ("train_loss", "val_loss", "val_accuracy", "lr", "seconds"):
        history = client.get_metric_history(record["run_id"], key)
        assert [m.step for m in history] == [1, 2], key
        assert [m.value for m in history] == pytest.approx([float(r[key]) for r in rows]), key
    assert [m.step for m in client.get_metric_history(record["run_id"], "images_per_second")] == [1, 2]
    files = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"checkpoint", "figures", "config.yaml", "history.csv", "operating_point.json"} <= files
    assert {a.path for a in client.list_artifacts(record["run_id"], "checkpoint")} == {"checkpoint/best.pt"}
    figures = {a.path for a in client.list_artifacts(record["run_id"], "figures")}
    assert {"figures/curves.png", "figures/val_roc.png", "figures/val_confusion.png"} <= figures
    # evaluate adds its metrics to the run it evaluates; an external one is tagged so
    m = evaluate(run / "best.pt", str(tiny_data), tmp_path / "ev", split="test", device="cpu", n_boot=50)
    evaluate(run / "best.pt", str(tiny_data), tmp_path / "hospital", split="all", device="cpu", n_boot=50, external=True)
    got = client.get_run(record["run_id"])
    assert got.data.metrics["test/roc_auc"] == pytest.approx(m["roc_auc"]["value"])
    assert got.data.metrics["test/roc_auc_ci_low"] == pytest.approx(m["roc_auc"]["ci_low"])
    assert "external_hospital/accuracy" in got.data.metrics and got.data.tags["external_evaluation"] == "true"
    assert got.info.status == "FINISHED"
    assert {"test/metrics.json", "test/predictions.csv"} <= {a.path for a in client.list_artifacts(record["run_id"], "test")}


@pytest.mark.slow
def test_tensorboard_holds_the_scalars_figures_config_and_explain_panels(tiny_data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "tb"
    fit(tiny_config(tiny_data, epochs=2, tracker="tensorboard"), run, verbose=False)
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0}).Reload()
    rows = _history(run)
    for key in ("train_loss", "val_loss", "val_roc_auc"):
        got = events.Scalars(key)
        assert [e.step for e in got] == [1, 2] and [e.value for e in got] == pytest.approx([float(r[key]) for r in rows])
    assert {"curves", "val_roc", "val_confusion"} <= set(events.Tags()["images"])
    assert events.Images("val_roc")[0].width > 200
    assert "config/text_summary" in events.Tags()["tensors"]
    assert all(n.startswith("tensorboard/") is False or n in recorded_names(run) for n in
               [str(p.relative_to(run)) for p in (run / "tensorboard").rglob("*") if p.is_file()])
    assert any(n.startswith("tensorboard/events.out.tfevents") for n in recorded_names(run))  # --overwrite removes them
    explain(run / "best.pt", [str(tiny_data / "test" / "cancer")], tmp_path / "maps", device="cpu",
            faithfulness_samples=2)
    shown = EventAccumulator(str(tmp_path / "maps" / "tensorboard"), size_guidance={"images": 0}).Reload()
    panels = [t for t in shown.Tags()["images"] if t.startswith("explain_maps/")]
    assert len(panels) == 4


def test_a_failing_store_warns_once_and_training_finishes(tiny_data, tmp_path):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the store's folder should be")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = fit(tiny_config(tiny_data, epochs=2, tracker="mlflow", tracking_uri=f"sqlite:///{blocked}/store/x.db"),
                  tmp_path / "run", verbose=False)
    said = [w for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(said) == 1 and "mlflow tracking stopped" in str(said[0].message), [str(w.message) for w in caught]
    assert res.best_epoch >= 1 and (tmp_path / "run" / "best.pt").is_file()
    assert not (tmp_path / "run" / RunDir.TRACKING).exists()


def test_no_tracker_unless_asked_or_mlflow_tracking_uri_is_set(tiny_data, tmp_path, monkeypatch):
    from bonetumor.tracking import resolve_tracker

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracker("auto") == "none"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'lab.db'}")
    assert resolve_tracker("auto") == "mlflow" and resolve_tracker("none") == "none"
    fit(tiny_config(tiny_data, epochs=1), tmp_path / "run", verbose=False)
    record = json.loads((tmp_path / "run" / "tracking.json").read_text())
    assert record["tracking_uri"] == f"sqlite:///{tmp_path / 'lab.db'}"


def test_a_tracker_whose_package_is_missing_is_refused_before_any_work(tiny_data, tmp_path, monkeypatch):
    import importlib.util

    from bonetumor.errors import BonetumorError

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find(name, *a))
    with pytest.raises(BonetumorError, match=r"--tracker mlflow needs the mlflow package: pip install 'bonetumor\[tracking\]'"):
        fit(tiny_config(tiny_data, tracker="mlflow"), tmp_path / "run", verbose=False)
    assert not (tmp_path / "run").exists()
    with pytest.raises(BonetumorError, match="--tracker must be auto, none, mlflow or tensorboard, not 'wandb'"):
        fit(tiny_config(tiny_data, tracker="wandb"), tmp_path / "run", verbose=False)
