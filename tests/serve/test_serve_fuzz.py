"""The API fuzzed from its own OpenAPI schema (schemathesis): no input gives a server error."""

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402  (schemathesis brings hypothesis)

from bonetumor.serve.app import create_app  # noqa: E402
from bonetumor.serve.guard import ServeLimits  # noqa: E402

TOKEN = "fuzz-token-0123456789"


@pytest.mark.bad_input
def test_no_input_gives_a_server_error(tiny_run):
    # schemathesis calls the app as the host "testserver"
    app = create_app(tiny_run / "best.pt", token=TOKEN, device="cpu",
                     limits=ServeLimits(max_upload_mb=1, allowed_hosts=("testserver",)))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [r.ok() for r in schema.get_all_operations()]
    assert {f"{o.method.upper()} {o.path}" for o in operations} == {"GET /api/health", "GET /api/model", "POST /api/predict"}
    seen: dict[str, set] = {}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def fuzz(case):
            for headers in ({"Authorization": f"Bearer {TOKEN}"}, {}):  # with and without the token
                response = case.call_and_validate(headers=headers, checks=[schemathesis.checks.not_a_server_error])
                seen.setdefault(op.path, set()).add(response.status_code)
        fuzz()
    assert seen["/api/predict"] >= {401, 415} and 200 in seen["/api/health"]
