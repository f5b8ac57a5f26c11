"""Running the app: safe binding rules, then uvicorn with the guarded protocol."""

from __future__ import annotations

import ipaddress
import threading
from pathlib import Path

from bonetumor.errors import BonetumorError
from bonetumor.serve.guard import LOOPBACK_HOSTS, ServeLimits

GRACE_S = 3  # after SIGTERM: how long answers already being sent may take before their tasks are cancelled


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for any other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse to expose the API beyond this machine without a token."""
    if not is_loopback(host) and not token:
        raise BonetumorError(f"--host {host} makes the API reachable from other machines; pass --token T (or set "
                             "BONETUMOR_TOKEN) so that every call must send 'Authorization: Bearer T', or keep the "
                             "default --host 127.0.0.1")
    if token is not None and len(token) < 16:
        raise BonetumorError("--token is too short: use at least 16 characters (e.g. python -c "
                             "'import secrets; print(secrets.token_urlsafe(24))')")


def allowed_hosts(host: str, given: str | None) -> tuple[str, ...]:
    """The Host header values the server answers: ``given`` (comma-separated), else the loopback
    names plus the bound address. A page on another site that resolves its own name to this
    machine (DNS rebinding) sends its own name, and is refused."""
    if given:
        return tuple(h.strip().lower() for h in given.split(",") if h.strip())
    if _is_wildcard(host):
        raise BonetumorError(f"--host {host} listens on every address of this machine; say which names clients "
                             "will use with --allowed-hosts (e.g. --allowed-hosts bone-ai.example.org,10.0.0.5), "
                             "or --allowed-hosts '*' to answer any name (which lets DNS rebinding reach the API)")
    bound = f"[{host.strip('[]')}]" if ":" in host else host.lower()
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, bound]))


def create_server(app, host: str, port: int, limits: ServeLimits, stop: threading.Event | None = None,
                  log_level: str = "info"):
    """A uvicorn server for ``app`` enforcing ``limits``; on SIGTERM/SIGINT it sets ``stop`` (the
    model work checks it between batches) and exits within seconds."""
    import uvicorn

    from bonetumor.serve.protocol import create_protocol

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if stop is not None:
                stop.set()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=create_protocol(limits),
                            timeout_graceful_shutdown=GRACE_S, h11_max_incomplete_event_size=16 * 1024)
    return Server(config)


def run_server(checkpoint: str | Path, host: str, port: int, token: str | None, limits: ServeLimits,
               device: str = "auto") -> None:
    """Load the model once and serve until interrupted."""
    from bonetumor.serve.app import create_app

    app = create_app(checkpoint, token=token, limits=limits, device=device)
    create_server(app, host, port, limits, stop=app.state.service.stop).run()
