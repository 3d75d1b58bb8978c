"""Schemathesis against the live server's /openapi.json: no input, and no sequence of calls
along the schema's links (list → load → unload), makes it answer 5xx.

The server runs as ``modelmora serve`` runs it, in front of the Ollama emulator (chat,
completion and embedding models, one in a registry name with a ``/``) and the simulated
runtime.  ``/events`` is left out: it is an endless stream (its own tests read it)."""

from __future__ import annotations

import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from modelmora.server import create_app, server_options  # noqa: E402
from modelmora.testing.ollama import OllamaEmulator  # noqa: E402
from modelmora.testing.threaded import ThreadedServer  # noqa: E402


def config(emu: OllamaEmulator) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "16GB"},
        # leases over HTTP hold models for their TTL: a load blocked by one waits at most
        # this long (a lease held past it refuses the load at once: 409)
        "wait_timeout": 3,
        "providers": {"simulated": {}, "ollama": {"base_url": emu.url}},
        "models": {
            "llm": {"memory": "8GB", "group": "heavy"},
            "sdxl": {"memory": "10GB", "group": "heavy"},
            "tts": {"memory": "2GB"},
            "team/qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB", "group": "heavy"},
            "embed": {"provider": "ollama", "target": "nomic-embed-text", "memory": "300MB"},
        },
    }


NAMES = ["llm", "sdxl", "tts", "team/qwen", "embed"]


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    emu = OllamaEmulator(
        models={"qwen2.5:14b": "9GB", "nomic-embed-text": {"size": "300MB", "embedding": True}}
    ).start()
    server = ThreadedServer(
        create_app(config(emu), max_body=64 * 1024, read_timeout=10), options=server_options(read_timeout=10)
    ).start()
    try:
        yield server.url
    finally:
        server.stop()
        emu.stop()


@pytest.fixture(scope="module")
def live_schema(live_url: str) -> Any:
    return schemathesis.openapi.from_url(f"{live_url}/openapi.json")


schema = schemathesis.pytest.from_fixture("live_schema")


@pytest.mark.slow
@schema.exclude(path="/events").parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_input_makes_the_server_fail(case: Any) -> None:
    # random names rarely hit the registry: half the cases (a stable choice per case, so
    # Hypothesis can shrink and replay) use a registered name
    pick = zlib.crc32(repr((case.body, case.path_parameters)).encode())
    if pick % 2:
        name = NAMES[pick // 2 % len(NAMES)]
        if isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = name
        if case.path_parameters and "name" in case.path_parameters:
            case.path_parameters["name"] = name
    case.call_and_validate(checks=[not_a_server_error])


@pytest.mark.slow
def test_no_sequence_of_calls_makes_the_server_fail(live_url: str, live_schema: Any) -> None:
    base = live_schema.exclude(path="/events").as_state_machine()

    class Sequences(base):  # type: ignore[misc, valid-type]
        def setup(self) -> None:
            # every scenario starts from nothing resident, so Hypothesis can replay one: the
            # links read names from the server's answers
            httpx.post(f"{live_url}/unload-all", json={"force": True}, timeout=30).raise_for_status()

        def validate_response(
            self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any
        ) -> None:
            case.validate_response(response, checks=[not_a_server_error])

    Sequences.run(
        settings=settings(
            max_examples=30, stateful_step_count=6, deadline=None, suppress_health_check=list(HealthCheck)
        )
    )


def test_the_schema_links_names_to_load_and_unload(live_schema: Any) -> None:
    raw = live_schema.raw_schema
    listed = raw["paths"]["/models"]["get"]["responses"]["200"]["links"]
    # the schema's own links; schemathesis adds links it infers (to GET /v1/models/{model})
    # to the raw schema while the stateful test runs
    ours = [link for link in listed.values() if not link.get("x-schemathesis", {}).get("is_inferred")]
    assert {link["operationId"] for link in ours} == {"load_model", "unload_model"}
    loaded = raw["paths"]["/models/{name}/load"]["post"]["responses"]["200"]["links"]
    assert loaded["UnloadIt"]["parameters"] == {"name": "$response.body#/model"}
