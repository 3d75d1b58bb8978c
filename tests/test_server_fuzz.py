"""Schemathesis against the live server's /openapi.json: no input makes it answer 5xx."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from modelmora.server import create_app  # noqa: E402
from modelmora.testing.threaded import ThreadedServer  # noqa: E402

CONFIG = {
    "budgets": {"cuda:0": "16GB"},
    "providers": {"simulated": {}},
    "models": {
        "llm": {"memory": "8GB", "group": "heavy"},
        "sdxl": {"memory": "10GB", "group": "heavy"},
        "tts": {"memory": "2GB"},
    },
}


@pytest.fixture(scope="module")
def live_schema() -> Iterator[Any]:
    server = ThreadedServer(create_app(CONFIG, max_body=64 * 1024)).start()
    try:
        yield schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    finally:
        server.stop()


schema = schemathesis.pytest.from_fixture("live_schema")


@pytest.mark.slow
@schema.exclude(path="/events").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case: Any) -> None:
    case.call_and_validate(checks=[not_a_server_error])
