"""Binding rules for `bonetumor serve`."""

import pytest
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.errors import BonetumorError
from bonetumor.serve.run import check_bind, is_loopback


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "::", "example.org"]))


def test_non_loopback_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "x" * 16)
    with pytest.raises(BonetumorError, match="--host 0.0.0.0 makes the API reachable from other machines; pass --token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(BonetumorError, match="--token is too short"):
        check_bind("0.0.0.0", "short")


def test_cli_refuses_before_loading_anything(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.pt"), "--host", "0.0.0.0"], env={"BONETUMOR_TOKEN": ""})
    assert r.exit_code == 2 and "pass --token" in r.output and "Traceback" not in r.output


def test_serve_command_serves_until_stopped(tiny_run):
    import json
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "bonetumor.cli", "serve", str(tiny_run / "best.pt"), "--port", str(port),
                             "--device", "cpu"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while True:
            try:
                health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).read())
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.2)
        assert health == {"status": "ok", "model": "resnet50 (run)", "device": "cpu"}
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    squeeze = lambda t: "".join(t.split())  # noqa: E731 - the console wraps long lines
    assert squeeze(f"serving {tiny_run / 'best.pt'} on http://127.0.0.1:{port}/") in squeeze(out)
