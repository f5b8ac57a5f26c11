"""ONNX export and ONNX Runtime inference give PyTorch's probabilities."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

pytest.importorskip("onnxruntime")
import onnx  # noqa: E402

from bonetumor.cli import app  # noqa: E402
from bonetumor.errors import BonetumorError  # noqa: E402
from bonetumor.model import export  # noqa: E402
from bonetumor.model.checkpoint import load_checkpoint, update_checkpoint  # noqa: E402
from bonetumor.model.export import cached_export, export_onnx, load_onnx, load_openvino  # noqa: E402
from bonetumor.predict import predict  # noqa: E402
from bonetumor.runtime import engines  # noqa: E402
from bonetumor.runtime.engines import choose_engine as auto_engine  # noqa: E402

runner = CliRunner()


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_run):
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    r = runner.invoke(app, ["export", str(tiny_run / "best.pt"), "--onnx", str(out)])
    assert r.exit_code == 0, r.output
    assert "max |Δ probability|" in r.output
    return out


def test_onnx_runtime_gives_the_same_probabilities(exported, tiny_run, tiny_data):
    ours = predict(tiny_run / "best.pt", [tiny_data / "test"], device="cpu")
    theirs = predict(exported, [tiny_data / "test"], engine="onnx")
    assert [r["path"] for r in ours] == [r["path"] for r in theirs] and len(ours) == 8
    diff = np.abs(np.array([r["probability"] for r in ours]) - np.array([r["probability"] for r in theirs]))
    assert diff.max() <= 1e-4
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]
    # the out-of-distribution check is the graph's second output
    np.testing.assert_allclose([r["ood_distance"] for r in theirs], [r["ood_distance"] for r in ours], rtol=1e-3)
    assert load_onnx(exported).ood == load_checkpoint(tiny_run / "best.pt").ood


def test_metadata_carries_what_prediction_needs(exported, tiny_run):
    ck, ox = load_checkpoint(tiny_run / "best.pt"), load_onnx(exported)
    assert (ox.classes, ox.threshold, ox.image_size, ox.mean, ox.std) == (ck.classes, ck.threshold, ck.image_size, ck.mean, ck.std)
    assert ox.read_options == ck.read_options
    graph = onnx.load(str(exported))
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)  # one file


def test_temperature_is_part_of_the_graph(tmp_path, tiny_run, tiny_data):
    import shutil

    shutil.copy(tiny_run / "best.pt", tmp_path / "t.pt")
    update_checkpoint(tmp_path / "t.pt", {"temperature": 2.5})
    export_onnx(tmp_path / "t.pt", tmp_path / "t.onnx")
    ours = predict(tmp_path / "t.pt", [tiny_data / "valid"], device="cpu")
    theirs = predict(tmp_path / "t.onnx", [tiny_data / "valid"], engine="onnx")
    plain = predict(tiny_run / "best.pt", [tiny_data / "valid"], device="cpu")
    a, b = np.array([r["probability"] for r in ours]), np.array([r["probability"] for r in theirs])
    assert np.abs(a - b).max() <= 1e-4
    assert np.abs(a - np.array([r["probability"] for r in plain])).max() > 1e-3  # the temperature did act


def test_refusals(tmp_path, exported, tiny_run):
    with pytest.raises(BonetumorError, match="already exists; pass --overwrite"):
        export_onnx(tiny_run / "best.pt", exported)
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(BonetumorError, match="junk.onnx: not a readable ONNX file"):
        load_onnx(tmp_path / "junk.onnx")
    graph = onnx.load(str(exported))
    del graph.metadata_props[:]
    onnx.save(graph, str(tmp_path / "foreign.onnx"))
    for load in (load_onnx, load_openvino):  # the same metadata check, before any engine is loaded
        with pytest.raises(BonetumorError, match="foreign.onnx: not an ONNX model exported by bonetumor"):
            load(tmp_path / "foreign.onnx")
    with pytest.raises(BonetumorError, match="pass --engine onnx"):
        predict(exported, [tmp_path])


def _hint_without(modules: list[str], call: str) -> str:
    """What ``call`` (from bonetumor.export) says in a Python where ``modules`` cannot be imported."""
    code = ("import sys\n" + "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
            + "from bonetumor.model.export import export_onnx, load_openvino\nfrom bonetumor.errors import BonetumorError\n"
            + f"try:\n    {call}\nexcept BonetumorError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return out.stdout + out.stderr


def test_missing_packages_say_what_to_install(tiny_run, tmp_path, exported):
    call = f"export_onnx({str(tiny_run / 'best.pt')!r}, {str(tmp_path / 'x.onnx')!r})"
    assert "pip install 'bonetumor[onnx]'" in _hint_without(["onnx", "onnxruntime"], call)
    assert "pip install 'bonetumor[openvino]'" in _hint_without(["openvino"], f"load_openvino({str(exported)!r})")


def _probs(rows):
    return np.array([r["probability"] for r in rows])


def test_openvino_gives_pytorchs_probabilities_in_fp32(exported, tiny_run, tiny_data):
    pytest.importorskip("openvino")
    ours = predict(tiny_run / "best.pt", [tiny_data / "test"], device="cpu", precision="fp32")
    theirs = predict(exported, [tiny_data / "test"], engine="openvino", precision="fp32", batch_size=3)
    assert [r["path"] for r in ours] == [r["path"] for r in theirs] and len(ours) == 8
    assert np.abs(_probs(ours) - _probs(theirs)).max() <= 1e-4
    assert [r["label"] for r in ours] == [r["label"] for r in theirs]


def test_openvino_runs_bf16_under_a_bf16_autocast_and_compiles_each_shape_once(exported):
    pytest.importorskip("openvino")
    import torch

    from bonetumor.runtime.device import cpu_has_fast_bf16

    ck = load_openvino(exported)
    x = torch.randn(5, 3, ck.image_size, ck.image_size, generator=torch.Generator().manual_seed(0))
    fp32 = torch.sigmoid(ck.model(x)[0])  # (logits, out-of-distribution scores)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = torch.sigmoid(ck.model(x)[0])
        ck.model(x[:2])
    assert float((fp32 - bf16).abs().max()) <= 0.01
    if cpu_has_fast_bf16():  # bf16 did run: its rounding shows
        assert float((fp32 - bf16).abs().max()) > 0
    assert set(ck.model._slots) == {("f32", 5), ("bf16", 5), ("bf16", 2)}


def test_openvino_batches_in_flight_together_give_what_one_at_a_time_gives(exported):
    pytest.importorskip("openvino")
    import torch

    ck = load_openvino(exported, threads=2)
    xs = [torch.randn(4, 3, ck.image_size, ck.image_size, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    one_at_a_time = [ck.model(x) for x in xs]
    first, second = ck.model.submit(xs[0]), ck.model.submit(xs[1])  # both running before either is read
    third = ck.model.submit(xs[2])  # reuses the first's requests: the first's outputs were not read yet
    got = [second(), third()]
    for (a, da), (b, db) in zip(got, one_at_a_time[1:]):
        assert torch.equal(a, b) and torch.equal(da, db)
    assert not torch.equal(got[0][0], got[1][0])  # two batches, not one read twice
    assert len(ck.model._slots[("f32", 4)]) == ck.model.IN_FLIGHT
    with pytest.raises(RuntimeError, match="later batches"):
        first()  # its requests now hold the third batch: an error, not the third's outputs


def test_openvino_splits_even_batches_over_two_streams_with_the_same_outputs(exported):
    pytest.importorskip("openvino")
    import torch

    split, whole = load_openvino(exported, threads=2), load_openvino(exported, threads=2)
    x = torch.randn(6, 3, split.image_size, split.image_size, generator=torch.Generator().manual_seed(1))
    whole.model.streams = 1
    (a, da), (b, db) = split.model(x), whole.model(x)
    assert len(split.model._slots[("f32", 6)][0][0]) == 2  # two halves of 3
    assert len(whole.model._slots[("f32", 6)][0][0]) == 1
    assert torch.allclose(a, b, atol=1e-5) and float((a[:3] - a[3:]).abs().max()) > 1e-3  # halves in order
    assert torch.allclose(da, db, rtol=1e-4) and da.shape == (6,)
    split.model(x[:5])
    assert len(split.model._slots[("f32", 5)][0][0]) == 1  # an odd batch runs whole


def test_models_loaded_and_dropped_in_any_order_leave_signals_safe(exported):
    """Each OpenVINO Core's CPU plugin swaps the thread's signal stack and restores the one it
    found when destroyed: dropped first-in first-out, two Cores left it pointing at freed
    memory, and the next signal Python handled was a segmentation fault."""
    pytest.importorskip("openvino")
    code = f"""
import gc, os, signal, torch
from bonetumor.model.export import load_openvino
a = load_openvino({str(exported)!r}); a.model(torch.zeros(2, 3, a.image_size, a.image_size))
b = load_openvino({str(exported)!r}); b.model(torch.zeros(2, 3, b.image_size, b.image_size))
del a; gc.collect(); del b; gc.collect()
signal.signal(signal.SIGUSR1, lambda *_: print("handled", flush=True))
os.kill(os.getpid(), signal.SIGUSR1)
print("alive")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.split() == ["handled", "alive"], (r.returncode, r.stdout, r.stderr[-500:])


def test_openvino_auto_precision_and_refusals(exported, tiny_run, tiny_data, tmp_path):
    pytest.importorskip("openvino")
    fp32 = predict(tiny_run / "best.pt", [tiny_data], device="cpu", precision="fp32")
    auto = predict(exported, [tiny_data], engine="openvino", precision="auto", batch_size=8)
    assert len(auto) == len(fp32) > 8 and np.abs(_probs(auto) - _probs(fp32)).max() <= 0.01
    # a checkpoint is exported on the way: the same probabilities as from the exported file
    direct = predict(tiny_run / "best.pt", [tiny_data / "test"], engine="openvino", precision="fp32")
    via = predict(exported, [tiny_data / "test"], engine="openvino", precision="fp32")
    assert [r["path"] for r in direct] == [r["path"] for r in via]
    assert np.abs(_probs(direct) - _probs(via)).max() <= 1e-6
    with pytest.raises(BonetumorError, match="with engine openvino, not 'fp16'"):
        predict(exported, [tiny_data / "test"], engine="openvino", precision="fp16")
    with pytest.raises(BonetumorError, match="--engine must be auto, torch, onnx or openvino"):
        predict(exported, [tiny_data / "test"], engine="tensorrt")
    r = runner.invoke(app, ["predict", str(exported), str(tiny_data / "test"), "--engine", "openvino", "--json"])
    assert r.exit_code == 0, r.output
    assert len([json.loads(line) for line in r.output.splitlines() if line.startswith("{")]) == 8


@pytest.mark.slow
def test_a_checkpoint_is_exported_once_into_the_cache_and_old_exports_are_dropped(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("BONETUMOR_CACHE_DIR", str(tmp_path / "cache"))
    first = cached_export(tiny_run / "best.pt")
    assert first.parent == tmp_path / "cache" and load_onnx(first).classes == load_checkpoint(tiny_run / "best.pt").classes

    def no_export(*a, **k):
        raise AssertionError("exported again")

    monkeypatch.setattr(export, "export_onnx", no_export)
    assert cached_export(tiny_run / "best.pt") == first  # the same bytes: the cached file
    monkeypatch.undo()
    monkeypatch.setenv("BONETUMOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(export, "CACHE_KEEP", 1)
    other = tmp_path / "other.pt"
    other.write_bytes((tiny_run / "best.pt").read_bytes())
    update_checkpoint(other, {"temperature": 2.0})  # other bytes, another export
    second = cached_export(other)
    assert second != first and sorted((tmp_path / "cache").iterdir()) == [second]


@pytest.mark.parametrize("engine", ["onnx", "openvino", "auto"])
def test_a_missing_checkpoint_is_a_one_line_error_with_every_engine(engine, tiny_data, tmp_path):
    r = runner.invoke(app, ["predict", str(tmp_path / "nope.pt"), str(tiny_data / "test"), "--engine", engine,
                            "--device", "cpu"])
    assert r.exit_code != 0 and isinstance(r.exception, SystemExit), repr(r.exception)  # handled, not a crash
    assert f"{tmp_path / 'nope.pt'}: file not found" in r.output and "Traceback" not in r.output


def test_engine_auto_runs_openvino_on_a_cpu_for_large_or_already_exported_jobs(tiny_run, tiny_data, tmp_path, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setenv("BONETUMOR_CACHE_DIR", str(tmp_path / "cache"))
    ck, folder = tiny_run / "best.pt", [tiny_data / "test"]  # 8 images
    torch_rows = predict(ck, folder, device="cpu", precision="fp32")
    monkeypatch.setattr(engines, "AUTO_OPENVINO_MIN_IMAGES", 9)
    small = predict(ck, folder, device="cpu", engine="auto", precision="fp32")
    assert small == torch_rows and not (tmp_path / "cache").exists()  # PyTorch, nothing exported
    monkeypatch.setattr(engines, "AUTO_OPENVINO_MIN_IMAGES", 8)
    loaded = []
    monkeypatch.setattr(export, "load_openvino", lambda p: loaded.append(p) or load_openvino(p))
    large = predict(ck, folder, device="cpu", engine="auto", precision="fp32")
    assert loaded == list((tmp_path / "cache").glob("*.onnx")) and len(loaded) == 1  # exported, run in OpenVINO
    assert [r["path"] for r in large] == [r["path"] for r in torch_rows]
    assert np.abs(_probs(large) - _probs(torch_rows)).max() <= 1e-4
    # once exported, a small job runs in OpenVINO too: the export is already paid for
    monkeypatch.setattr(engines, "AUTO_OPENVINO_MIN_IMAGES", 9)
    again = predict(ck, folder, device="cpu", engine="auto", precision="fp32")
    assert len(loaded) == 2 and loaded[1] == loaded[0] and np.abs(_probs(again) - _probs(torch_rows)).max() <= 1e-4
    # the choice itself: never for a GPU, nor without OpenVINO
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert auto_engine(cpu, 10**6) == "openvino" and auto_engine(cpu, 1, exported=True) == "openvino"
    assert auto_engine(cpu, 1) == "torch" and auto_engine(cuda, 10**6, exported=True) == "torch"
    monkeypatch.setattr(engines, "openvino_available", lambda: False)
    assert auto_engine(cpu, 10**6, exported=True) == "torch"


def test_engine_auto_falls_back_to_pytorch_when_export_fails(tiny_run, tiny_data, monkeypatch):
    pytest.importorskip("openvino")
    monkeypatch.setattr(engines, "AUTO_OPENVINO_MIN_IMAGES", 1)

    def broken(path):
        raise BonetumorError(f"{path}: ONNX Runtime differs from PyTorch")

    monkeypatch.setattr(export, "cached_export", broken)
    with pytest.warns(RuntimeWarning, match="running in PyTorch"):
        rows = predict(tiny_run / "best.pt", [tiny_data / "test"], device="cpu", engine="auto", precision="fp32")
    assert rows == predict(tiny_run / "best.pt", [tiny_data / "test"], device="cpu", precision="fp32")
    r = runner.invoke(app, ["predict", str(tiny_run / "best.pt"), str(tiny_data / "test"), "--json", "--device", "cpu"])
    assert r.exit_code == 0, r.output  # the CLI's default engine, auto
