"""torch.compile for inference: when it is used, and that it changes no prediction."""

import warnings

import pytest
import torch

from bonetumor.errors import BonetumorError
from bonetumor.predict import predict
from bonetumor.runtime import forward as compiled
from bonetumor.runtime.forward import (
    COMPILE_MIN_IMAGES,
    CompiledInference,
    should_compile,
)


def test_auto_compiles_only_large_jobs():
    cpu = torch.device("cpu")
    assert not should_compile("auto", COMPILE_MIN_IMAGES - 1, cpu) and should_compile("auto", COMPILE_MIN_IMAGES, cpu)
    assert should_compile("on", 1, cpu) and not should_compile("off", 10**6, cpu)
    assert not should_compile("on", 10**6, torch.device("mps"))
    with pytest.raises(BonetumorError, match="--compile must be auto, on or off, not 'yes'"):
        should_compile("yes", 1, cpu)


@pytest.mark.slow
def test_compiled_predictions_equal_eager_with_a_padded_last_batch(tiny_run, tiny_data):
    files = sorted(str(p) for p in tiny_data.rglob("*.png"))[:7]
    eager = predict(tiny_run / "best.pt", files, device="cpu", batch_size=4, compile_mode="off")
    calls = []
    real = torch.compile
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "compile", lambda m, **kw: calls.append(kw) or real(m, **kw))
        fast = predict(tiny_run / "best.pt", files, device="cpu", batch_size=4, compile_mode="on")
    assert calls == [{"dynamic": False, "options": {"freezing": True}}]
    assert [r["path"] for r in fast] == [r["path"] for r in eager] and len(fast) == 7  # 4 + 3 (padded to 4)
    for a, b in zip(eager, fast):
        assert b["probability"] == pytest.approx(a["probability"], abs=1e-4)


def test_a_failed_compile_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(x):
        raise RuntimeError("no C++ compiler found\nlong trace")

    monkeypatch.setattr(compiled.torch, "compile", lambda m, **kw: broken)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)).eval()
    run = CompiledInference(model, batch_size=4)
    x = torch.randn(3, 3, 2, 2)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        y = run(x)
    assert torch.equal(y, model(x)) and y.shape == (3, 2)
    assert "torch.compile failed (RuntimeError: no C++ compiler found); running without it" in str(w[0].message)
    assert run.compiled is None and torch.equal(run(x), model(x))  # and is not tried again
