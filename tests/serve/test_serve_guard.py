"""The server under hostile clients: stalled headers and bodies, oversized and unauthenticated
bodies refused before they are read, foreign Host names, too many connections, the time limit,
security headers, and a stop within seconds. A real uvicorn server on loopback, raw sockets."""

import contextlib
import socket
import threading
import time

import numpy as np
import pytest
from conftest import serving as serve_app
from fastapi.testclient import TestClient

from bonetumor.data.writers import write_nifti
from bonetumor.serve import protocol
from bonetumor.serve.app import create_app
from bonetumor.serve.guard import ServeLimits
from bonetumor.serve.run import allowed_hosts

pytestmark = pytest.mark.bad_input  # the bad-input corpus: counted in the README

TOKEN = "a-long-enough-test-token-123"


@contextlib.contextmanager
def serving(tiny_run, token=None, **limits):
    """A real server (the CLI's protocol and middleware) for the tiny run: (port, app)."""
    app = create_app(tiny_run / "best.pt", token=token, device="cpu", limits=ServeLimits(**limits))
    with serve_app(app, ServeLimits(**limits)) as port:
        yield port, app


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _answer(sock: socket.socket) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    t0, data = time.perf_counter(), b""
    while chunk := sock.recv(65536):
        data += chunk
    return data, time.perf_counter() - t0


def _status(data: bytes) -> int:
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else -1


def test_stalled_headers_are_closed_within_the_header_timeout(tiny_run):
    with serving(tiny_run, header_timeout=1.0) as (port, _):
        silent, partial, trickle = _connect(port), _connect(port), _connect(port)
        partial.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\n")
        for _ in range(3):  # a byte now and then does not restart the clock
            trickle.sendall(b"G")
            time.sleep(0.3)
        for sock in (silent, partial, trickle):
            data, waited = _answer(sock)
            assert _status(data) == 408 and waited < 2.5 and b"within 1 s" in data
        ok = _connect(port)  # a prompt client on the same server is served
        ok.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert _status(_answer(ok)[0]) == 200


def test_a_body_that_stalls_gets_408_and_the_connection_closes(tiny_run):
    with serving(tiny_run, body_timeout=1.0) as (port, _):
        sock = _connect(port)
        sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                     b"Content-Length: 100000\r\n\r\n--b\r\n")  # 100,000 bytes announced, 6 sent
        data, waited = _answer(sock)
        assert _status(data) == 408 and b"stalled for 1 s" in data and waited < 3


def _chunked_upload(port: int, headers: bytes, chunks: int, size: int = 16384) -> socket.socket:
    """A chunked multipart upload of ``chunks`` chunks that is never finished."""
    sock = _connect(port)
    sock.sendall(b"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n"
                 b"Content-Type: multipart/form-data; boundary=b\r\n" + headers + b"\r\n")
    part = b'--b\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG\r\n\x1a\n'
    sock.sendall(f"{len(part):x}\r\n".encode() + part + b"\r\n")
    for _ in range(chunks):
        sock.sendall(f"{size:x}\r\n".encode() + b"\0" * size + b"\r\n")
    return sock


def test_a_chunked_body_is_cut_off_at_the_limit_not_read_to_its_end(tiny_run):
    with serving(tiny_run, max_upload_mb=0.1, body_timeout=30) as (port, _):
        # 0.1 MB + 64 KB of form framing allowed; 11 x 16 KB sent, then the client stalls:
        # the server answers 413 without waiting for the end (a stall of 30 s, or more bytes).
        data, waited = _answer(_chunked_upload(port, b"", chunks=11))
        assert _status(data) == 413 and b"the limit is 0.1 MB" in data and waited < 5


def test_unauthenticated_and_oversized_bodies_are_refused_before_one_byte_is_read(tiny_run):
    with serving(tiny_run, token=TOKEN, max_upload_mb=1) as (port, _):
        data, waited = _answer(_chunked_upload(port, b"", chunks=0))
        assert _status(data) == 401 and b"bearer token" in data and waited < 2
        sock = _connect(port)
        sock.sendall(f"POST /api/predict HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Length: 1000000000\r\n\r\n".encode())
        data, waited = _answer(sock)
        assert _status(data) == 413 and b"953.7 MB; the limit is 1 MB" in data and waited < 2


def _keep_uploading(sock: socket.socket, seconds: float, ended: list[float]) -> None:
    """Send chunks of 16 KB for ``seconds``, as curl does with a large file; note when the server stops taking them."""
    t0 = time.perf_counter()
    try:
        while time.perf_counter() - t0 < seconds:
            sock.sendall(b"4000\r\n" + b"\0" * 16384 + b"\r\n")
    except OSError:
        ended.append(time.perf_counter() - t0)


def test_a_client_still_uploading_reads_the_refusal_not_a_connection_reset(tiny_run):
    # Refused before its body was read, a client that went on sending found the socket closed under
    # it and got a reset instead of the 401 in roughly one try in five (and "connection reset by
    # peer" in CI); the server now lingers, so every try reads its answer.
    with serving(tiny_run, token=TOKEN, max_upload_mb=1) as (port, _):
        for _ in range(20):
            sock = _chunked_upload(port, b"", chunks=0)
            sender = threading.Thread(target=_keep_uploading, args=(sock, 0.2, []))
            sender.start()
            data, waited = _answer(sock)
            sender.join()
            assert _status(data) == 401 and waited < 2


def test_lingering_after_a_refusal_ends_after_its_limit(tiny_run, monkeypatch):
    monkeypatch.setattr(protocol, "LINGER_S", 1.0)
    with serving(tiny_run, token=TOKEN) as (port, _):
        sock, ended = _chunked_upload(port, b"", chunks=0), []
        sender = threading.Thread(target=_keep_uploading, args=(sock, 10, ended))
        sender.start()
        data, _ = _answer(sock)
        sender.join(10)
        assert _status(data) == 401 and len(ended) == 1 and 0.7 < ended[0] < 4  # closed after 1 s, not 10


def test_connections_beyond_the_cap_get_503_and_are_closed(tiny_run):
    with serving(tiny_run, max_connections=3, header_timeout=30) as (port, _):
        held = [_connect(port) for _ in range(3)]
        time.sleep(0.2)
        data, _ = _answer(_connect(port))
        assert _status(data) == 503 and b"too many open connections" in data
        held.pop().close()
        time.sleep(0.2)
        ok = _connect(port)
        ok.sendall(b"GET /api/health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert _status(_answer(ok)[0]) == 200
        for sock in held:
            sock.close()


def test_only_the_allowed_host_names_are_answered():
    assert allowed_hosts("127.0.0.1", None) == ("localhost", "127.0.0.1", "[::1]")
    assert allowed_hosts("10.1.2.3", None)[-1] == "10.1.2.3" and allowed_hosts("::1", None)[-1] == "[::1]"
    assert allowed_hosts("0.0.0.0", "Bone-AI.example.org, 10.0.0.5") == ("bone-ai.example.org", "10.0.0.5")
    with pytest.raises(Exception, match="--host 0.0.0.0 listens on every address.*--allowed-hosts"):
        allowed_hosts("0.0.0.0", None)


def test_a_foreign_host_header_is_refused(tiny_run):
    client = TestClient(create_app(tiny_run / "best.pt", device="cpu"), base_url="http://localhost:8000")
    assert client.get("/api/health").status_code == 200
    assert client.get("/api/health", headers={"Host": "127.0.0.1:8000"}).status_code == 200
    assert client.get("/api/health", headers={"Host": "[::1]:8000"}).status_code == 200
    r = client.get("/api/health", headers={"Host": "attacker.example:8000"})  # DNS rebinding
    assert r.status_code == 400 and r.headers["x-frame-options"] == "DENY"
    anyone = TestClient(create_app(tiny_run / "best.pt", device="cpu", limits=ServeLimits(allowed_hosts=("*",))),
                        base_url="http://attacker.example")
    assert anyone.get("/api/health").status_code == 200


def test_every_answer_carries_the_security_headers(tiny_run):
    client = TestClient(create_app(tiny_run / "best.pt", device="cpu", max_upload_mb=0.01), base_url="http://localhost")
    answers = {"page": client.get("/"), "script": client.get("/static/app.js"), "api": client.get("/api/model"),
               "404": client.get("/nothing"), "415": client.post("/api/predict", files={"file": ("a", b"x")}),
               "413": client.post("/api/predict", files={"file": ("a.png", b"\0" * 200_000)}), "docs": client.get("/docs")}
    assert [r.status_code for r in answers.values()] == [200, 200, 200, 404, 415, 413, 200]
    for name, r in answers.items():
        h = r.headers
        assert h["x-content-type-options"] == "nosniff" and h["x-frame-options"] == "DENY", name
        assert h["referrer-policy"] == "no-referrer" and "frame-ancestors 'none'" in h["content-security-policy"], name
    assert "script-src 'self';" in answers["page"].headers["content-security-policy"]  # no inline script on the page
    assert "'unsafe-inline'" in answers["docs"].headers["content-security-policy"]  # Swagger UI starts inline
    assert answers["api"].headers["cache-control"] == "no-store" and "cache-control" not in answers["script"].headers


def _post(port: int, name: str, data: bytes) -> tuple[int, dict, dict]:
    """One multipart upload over a real socket: (status, JSON answer, headers)."""
    import json
    import urllib.error
    import urllib.request

    body = (f'--b\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n').encode() + data + b"\r\n--b--\r\n"
    req = urllib.request.Request(f"http://localhost:{port}/api/predict", data=body, method="POST",
                                 headers={"Content-Type": "multipart/form-data; boundary=b"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def test_time_limit_and_stop_give_503_and_free_the_model(tiny_run, tiny_data):
    png = sorted(tiny_data.rglob("*.png"))[0].read_bytes()
    with serving(tiny_run, request_timeout=1.0) as (port, app):
        service = app.state.service
        service.lock.acquire()  # another request holds the model for longer than the time limit
        t0 = time.perf_counter()
        status, answer, _ = _post(port, "a.png", png)
        assert status == 503 and "time limit" in answer["detail"] and time.perf_counter() - t0 < 3
        service.lock.release()
        assert _post(port, "a.png", png)[0] == 200
        service.stop.set()  # SIGTERM: work stops at its next check
        status, answer, headers = _post(port, "a.png", png)
        assert status == 503 and "shutting down" in answer["detail"] and headers["retry-after"] == "10"
        assert service.lock.acquire(timeout=0)  # released after the refusal
        service.lock.release()


def test_past_the_deadline_a_volume_stops_between_batches(tiny_run, tmp_path):
    from bonetumor.serve.app import Service, Unavailable

    rng = np.random.default_rng(0)
    vol = write_nifti(tmp_path / "v.nii.gz", [rng.random((32, 32)) for _ in range(40)])
    service, batches = Service(tiny_run / "best.pt", "cpu"), []
    check = service.check
    service.check = lambda deadline: (batches.append(1), check(deadline))  # type: ignore[method-assign]
    with pytest.raises(Unavailable, match="time limit"):
        service.predict_file(vol, deadline=time.monotonic() - 1)
    assert len(batches) == 1  # refused at the first check, before any slice was scored
    assert service.predict_file(vol, deadline=time.monotonic() + 60)["kind"] == "study" and len(batches) > 3


def test_an_all_zero_volume_is_a_clear_422(tiny_run, tmp_path):
    client = TestClient(create_app(tiny_run / "best.pt", device="cpu"), base_url="http://localhost")
    vol = write_nifti(tmp_path / "zero.nii.gz", [np.zeros((32, 32))] * 5, scale=0)
    r = client.post("/api/predict", files={"file": ("zero.nii.gz", vol.read_bytes())})
    assert r.status_code == 422 and "holds no image: every voxel is 0" in r.json()["detail"]
