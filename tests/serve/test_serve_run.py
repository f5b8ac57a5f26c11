"""Binding rules for `bonetumor serve`."""

import pytest
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.errors import BonetumorError
from bonetumor.serve.run import check_bind, is_loopback


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.5", "::", "example.org"]))


@pytest.mark.bad_input
def test_non_loopback_needs_a_token():
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "x" * 16)
    with pytest.raises(BonetumorError, match="--host 0.0.0.0 makes the API reachable from other machines; pass --token"):
        check_bind("0.0.0.0", None)
    with pytest.raises(BonetumorError, match="--token is too short"):
        check_bind("0.0.0.0", "short")


@pytest.mark.bad_input
def test_cli_refuses_before_loading_anything(tmp_path):
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.pt"), "--host", "0.0.0.0"], env={"BONETUMOR_TOKEN": ""})
    assert r.exit_code == 2 and "pass --token" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing.pt"), "--host", "0.0.0.0", "--token", "t" * 16])
    assert r.exit_code == 2 and "--allowed-hosts" in r.output and "Traceback" not in r.output


@pytest.mark.bad_input
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
                             "--device", "cpu", "--header-timeout", "60", "--body-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
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
        # Clients that hold their connections (headers or body never finished) do not hold the server
        # open: SIGTERM stops it within seconds, where it once waited for them for ever.
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
        stalled[1].sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
        stalled[2].sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                           b"Content-Length: 100000\r\n\r\n--b\r\n")
        time.sleep(0.5)
    finally:
        t0 = time.perf_counter()
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
        stopped_in = time.perf_counter() - t0
    assert stopped_in < 8, f"SIGTERM took {stopped_in:.1f} s"
    squeeze = lambda t: "".join(t.split())  # noqa: E731 - the console wraps long lines
    assert squeeze(f"serving {tiny_run / 'best.pt'} on http://127.0.0.1:{port}/") in squeeze(out)
