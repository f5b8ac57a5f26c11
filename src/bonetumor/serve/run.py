"""Running the app: safe binding rules, then uvicorn."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from bonetumor.errors import BonetumorError


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost; False for any other name or address."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
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


def run_server(checkpoint: str | Path, host: str, port: int, token: str | None, max_upload_mb: float,
               device: str = "auto") -> None:
    """Load the model once and serve until interrupted."""
    import uvicorn

    from bonetumor.serve.app import create_app

    app = create_app(checkpoint, token=token, max_upload_mb=max_upload_mb, device=device)
    uvicorn.run(app, host=host, port=port, log_level="info")
