"""Property-based API testing: schemathesis generates requests from the service's own OpenAPI document and sends
them to a real server on 127.0.0.1 (anonymous; SQLite, and PostgreSQL where installed). Checks: no response is
a 5xx, and every response matches the schema (refusals are problem documents, as declared). Requests that
follow the schema and requests that break it. Bounded: a fixed number of examples per operation and mode (a
few hundred in all), derandomized, no example database."""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import pytest
import service_env as se

schemathesis = pytest.importorskip("schemathesis")
hypothesis = pytest.importorskip("hypothesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

from nvit.service.app import create_app  # noqa: E402
from nvit.service.config import ServiceSettings  # noqa: E402

EXAMPLES_PER_OPERATION = 10
CHECKS = [not_a_server_error, response_schema_conformance]


def _schema():
    """The OpenAPI document as the server publishes it (the app's own, built without serving)."""
    with tempfile.TemporaryDirectory() as state:
        app = create_app(ServiceSettings(state_dir=Path(state)))
        document = app.openapi()
        app.state.ctx.store.close()
    return schemathesis.openapi.from_dict(document)


SCHEMA = _schema()
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def server(request, tmp_path_factory):
    """A server on SQLite, and one on PostgreSQL (skipped where it is not installed): a column that holds
    less than the schema allows is a 500 on one engine only."""
    root = tmp_path_factory.mktemp(f"schema-{request.param}")
    limits = ("--max-table-mb", "1", "--max-model-mb", "1")
    with contextlib.ExitStack() as stack:
        if request.param == "postgresql":
            url = se.fresh_database(stack.enter_context(se.postgres_server()), "schema_api")
            limits = (*limits, "--db", url)
        yield stack.enter_context(se.running_server(root / "state", se.env_for(root), *limits))


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("operation", OPERATIONS, ids=[op.label for op in OPERATIONS])
def test_generated_requests_get_no_5xx_and_answers_match_the_schema(operation, mode, server) -> None:
    """Positive examples follow the schema; negative ones break it (wrong types, out-of-range ids,
    missing fields), and must be refused with a 4xx problem, never a 5xx."""

    @hypothesis.given(case=operation.as_strategy(generation_mode=mode))
    @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                         suppress_health_check=list(hypothesis.HealthCheck), phases=[hypothesis.Phase.generate])
    def check(case) -> None:
        if case.path.endswith("/lease"):
            case.query = {**(case.query or {}), "wait_s": 0}  # never a long poll
        response = case.call(base_url=server.url, timeout=30)
        case.validate_response(response, checks=CHECKS)

    try:
        check()
    except hypothesis.errors.Unsatisfiable:
        if mode is not schemathesis.GenerationMode.NEGATIVE:
            raise  # a route without parameters or body has no request that breaks its schema: nothing to send
