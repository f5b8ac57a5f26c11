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
