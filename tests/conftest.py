"""Shared fixtures: tiny synthetic data and a tiny trained run, made once per test session."""

from __future__ import annotations

import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bonetumor import TrainConfig, create_synthetic_dataset, fit

TINY = dict(image_size=32, epochs=2, batch_size=8, lr=1e-3, weights="none", freeze="none",
            patience=5, seed=3, device="cpu", workers=0, precision="fp32")


def tiny_config(data, **kw) -> TrainConfig:
    """A config that trains ResNet50 at 32 px in about a second per epoch."""
    return dataclasses.replace(TrainConfig(data=str(data) if data else None), **{**TINY, **kw})


@pytest.fixture(scope="session", autouse=True)
def export_cache(tmp_path_factory) -> Path:
    """Checkpoints exported on the way to an engine go to a folder of this session, not ~/.cache."""
    folder = tmp_path_factory.mktemp("export-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BONETUMOR_CACHE_DIR", str(folder))
        yield folder


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """12 synthetic patients x 4 slices at 32 px, in the {split}/{class}/ layout with a manifest."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    create_synthetic_dataset(root, n_patients=12, size=32, seed=1)
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_data) -> Path:
    """A finished 2-epoch run on ``tiny_data``."""
    out = tmp_path_factory.mktemp("runs") / "run"
    fit(tiny_config(tiny_data), out, verbose=False)
    return out


def chromium_executable() -> str:
    """Debian's (or any) Chromium for the browser tests; skipped without one, unless
    BONETUMOR_REQUIRE_BROWSER is set (CI installs it and sets that)."""
    import os
    import shutil

    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        if os.environ.get("BONETUMOR_REQUIRE_BROWSER"):
            pytest.fail("headless Chromium is required here but not installed")
        pytest.skip("no Chromium on this machine (CI installs it)")
    return exe


def write_image(path: Path, size: int = 24, value: int | None = None, mode: str = "L", seed: int = 0) -> Path:
    """Write a small random image (for layout tests)."""
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size, size, 3) if mode == "RGB" else (size, size), dtype=np.uint8)
    if value is not None:
        arr[:] = value
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def make_class_tree(root: Path, classes=("cancer", "normal"), n: int = 6, size: int = 24, mode: str = "L") -> Path:
    """root/<class>/img_i.png with ``n`` images per class."""
    for c in classes:
        for i in range(n):
            write_image(root / c / f"img_{i}.png", size, mode=mode, seed=hash((c, i)) % 1000)
    return root


@contextlib.contextmanager
def serving(app, limits=None):
    """``app`` served by the server ``bonetumor serve`` runs (its protocol and limits) on a free
    loopback port, in a thread; yields the port."""
    from bonetumor.serve.guard import ServeLimits
    from bonetumor.serve.run import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = create_server(app, "127.0.0.1", port, limits or ServeLimits(), log_level="critical")
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.time() + 30
    while not srv.started:
        assert time.time() < deadline, "server did not start"
        time.sleep(0.02)
    try:
        yield port
    finally:
        srv.should_exit = True
        t.join(10)
