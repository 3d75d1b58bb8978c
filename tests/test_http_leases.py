"""Issue 25, item 6: leases and requests over HTTP.

``POST /leases`` holds a model as ``use()`` does (taken, extended, released, expired,
capped, kept across a server restart, named when it blocks another load), and
``/requests`` lists and cancels the proxy's in-flight requests.  The app runs in the
test's event loop (its lifespan entered by the test), so ordering decides, not timing."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from test_proxy_abandoned import GUARD, Client, EndpointFaulty, Upstream, chat, group_manager, until

from modelmora import ModelManager
from modelmora import events as ev
from modelmora.memory import StaticProbe
from modelmora.providers.simulated import SimulatedProvider
from modelmora.server import create_app

pytestmark = pytest.mark.anyio


def manager(**config: Any) -> ModelManager:
    """Two 3 GB models on a 4 GB budget: one at a time, by memory (no group)."""
    cfg = {
        "budgets": {"cpu": "4GB"}, "reaper_interval": 3600, "reconcile_interval": 3600,
        "watchdog": {"interval": 3600},
        "models": {"a": {"memory": "3GB", "device": "cpu"}, "b": {"memory": "3GB", "device": "cpu"}},
        **config,
    }  # fmt: skip
    return ModelManager(cfg, providers={"simulated": SimulatedProvider()}, probe=StaticProbe({}))


@contextlib.asynccontextmanager
async def served(mm: ModelManager, state: Path, **options: Any) -> AsyncIterator[httpx.AsyncClient]:
    app: Any = create_app(mm, enter_manager=False, state_dir=state, **options)
    transport = httpx.ASGITransport(app=app)
    async with (
        mm,
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as client,
    ):
        yield client


async def test_a_lease_is_taken_extended_and_released(tmp_path: Path) -> None:
    mm = manager()
    async with served(mm, tmp_path) as http:
        taken = await http.post(
            "/leases", json={"model": "a", "holder": "ci", "reason": "eval", "ttl": "10m"}
        )
        assert taken.status_code == 200, taken.text
        lease = taken.json()
        assert lease["granted"] and lease["holder"] == "ci" and 599 <= lease["left_s"] <= 600
        assert mm.is_loaded("a") and mm.leases("a") == 1
        with pytest.raises(Exception, match="in use"):
            await mm.unload("a")  # protected as by use()
        extended = await http.post(f"/leases/{lease['id']}/extend", json={"ttl": "20m"})
        assert extended.status_code == 200 and extended.json()["expires_at"] > lease["expires_at"]
        assert [row["id"] for row in (await http.get("/leases")).json()] == [lease["id"]]
        released = await http.delete(f"/leases/{lease['id']}")
        assert released.status_code == 200 and released.json()["released"]
        assert mm.leases("a") == 0
        gone = await http.get(f"/leases/{lease['id']}")
        assert gone.status_code == 404 and "no lease" in gone.json()["error"]["message"]
        assert json.loads((tmp_path / "leases.json").read_text())["leases"] == []


async def test_a_lease_longer_than_the_cap_is_refused_naming_it(tmp_path: Path) -> None:
    mm = manager()
    async with served(mm, tmp_path, max_lease=3600) as http:
        refused = await http.post("/leases", json={"model": "a", "holder": "ci", "ttl": "2h"})
        assert refused.status_code == 422
        assert "lease cap of 1h" in refused.json()["error"]["message"]
        assert not mm.is_loaded("a")  # refused before any load
        bad = await http.post("/leases", json={"model": "a", "holder": "ci", "ttl": "soon"})
        assert bad.status_code == 422 and bad.json()["error"]["param"] == "ttl"


async def test_a_never_ending_or_zero_ttl_is_refused_in_the_users_words(tmp_path: Path) -> None:
    """``ttl: -1`` was refused as "not inf", and ``0`` as "not 0.0": words the user never wrote."""
    mm = manager()
    async with served(mm, tmp_path) as http:
        lease = (await http.post("/leases", json={"model": "a", "holder": "ci", "ttl": "1m"})).json()
        for ttl in ("-1", -1, 0, "0s"):
            for refused in (
                await http.post("/leases", json={"model": "b", "holder": "ci", "ttl": ttl}),
                await http.post(f"/leases/{lease['id']}/extend", json={"ttl": ttl}),
            ):
                assert refused.status_code == 422 and refused.json()["error"]["param"] == "ttl"
                message = refused.json()["error"]["message"]
                assert "inf" not in message and "0.0" not in message, message
                assert "-1" in message if ttl in ("-1", -1) else "0s" in message, message
        assert not mm.is_loaded("b")


async def test_an_expired_lease_is_released(tmp_path: Path) -> None:
    mm = manager()
    async with served(mm, tmp_path) as http:
        lease = (await http.post("/leases", json={"model": "a", "holder": "ci", "ttl": 0.2})).json()
        assert mm.leases("a") == 1
        with anyio.fail_after(GUARD):
            while (await http.get(f"/leases/{lease['id']}")).status_code != 404:
                await anyio.sleep(0.05)
        assert mm.leases("a") == 0


async def test_a_lease_is_kept_across_a_server_restart(tmp_path: Path) -> None:
    first = manager()
    async with served(first, tmp_path) as http:
        lease = (
            await http.post("/leases", json={"model": "a", "holder": "ci", "reason": "eval", "ttl": "1h"})
        ).json()
        short = (await http.post("/leases", json={"model": "a", "holder": "ui", "ttl": 0.1})).json()
    saved = {row["id"] for row in json.loads((tmp_path / "leases.json").read_text())["leases"]}
    assert saved == {lease["id"], short["id"]}  # the file keeps them when the server stops
    await anyio.sleep(0.15)  # the short one expires while the server is down
    second = manager()
    async with served(second, tmp_path) as http:
        with anyio.fail_after(GUARD):
            await until(lambda: second.leases("a") == 1)
        rows = (await http.get("/leases")).json()
        assert [(r["id"], r["holder"], r["reason"], r["granted"]) for r in rows] == [
            (lease["id"], "ci", "eval", True)
        ]
        assert second.is_loaded("a")
        assert (await http.delete(f"/leases/{lease['id']}")).status_code == 200


async def test_a_load_blocked_by_a_lease_names_it(tmp_path: Path) -> None:
    mm = manager(wait_timeout=0.2)
    async with served(mm, tmp_path) as http:
        assert (await http.post("/leases", json={"model": "a", "holder": "nightly-job", "reason": "eval run", "ttl": "1h"})).status_code == 200  # fmt: skip
        blocked = await http.post("/models/b/load")
        assert blocked.status_code >= 400
        message = blocked.json()["error"]["message"]
        assert "nightly-job" in message and "'eval run'" in message and "left" in message, message
        assert mm.is_loaded("a") and not mm.is_loaded("b")


async def test_a_proxied_request_names_a_lease_of_its_model(tmp_path: Path) -> None:
    mm = manager()
    async with served(mm, tmp_path) as http:
        lease = (await http.post("/leases", json={"model": "a", "holder": "ci", "ttl": "1h"})).json()
        other = await http.post(
            "/v1/chat/completions", json=chat("b"), headers={"X-Modelmora-Lease": lease["id"]}
        )
        assert other.status_code == 409 and "holds 'a', not 'b'" in other.json()["error"]["message"]
        unknown = await http.post(
            "/v1/chat/completions", json=chat("a"), headers={"X-Modelmora-Lease": "lease-x"}
        )
        assert unknown.status_code == 404
        assert not mm.is_loaded("b")


async def test_a_waiting_request_is_listed_and_cancelled(tmp_path: Path) -> None:
    """``GET /requests`` lists a request waiting for a held load (state, position); its
    cancel ends it unanswered, never forwarded, and stops the load nobody wants now."""
    runtime = Upstream()
    faulty = EndpointFaulty("http://127.0.0.1:9")  # never reached: nothing is forwarded
    mm = group_manager(faulty)
    events: list[ev.Event] = []
    mm.events.subscribe(events.append)
    faulty.hold("load", "a")
    app: Any = create_app(mm, enter_manager=False, state_dir=tmp_path)
    async with (
        mm,
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as http,
        anyio.create_task_group() as tg,
    ):
        waiting = Client(app, chat("a"))
        tg.start_soon(waiting.run)
        with anyio.fail_after(GUARD):
            await faulty.wait_pending("load", "a")
            listed = (await http.get("/requests")).json()
            assert [(r["model"], r["state"], r["position"]) for r in listed] == [("a", "loading", 1)]
            model = (await http.get("/models/a")).json()
            assert model["queue"]["waiting"] == 1 and model["queue"]["loading"]
            cancelled = await http.post(f"/requests/{listed[0]['id']}/cancel")
            assert cancelled.status_code == 200
            await waiting.done.wait()
            await until(lambda: any(isinstance(e, ev.LoadAbandoned) for e in events))
        assert waiting.status == 499
        assert (await http.get("/requests")).json() == []
        assert (await http.post(f"/requests/{listed[0]['id']}/cancel")).status_code == 404
        assert runtime.models == []
        assert [c.outcome for c in faulty.calls if c.op == "load"] == ["cancelled"]


async def test_a_load_the_lease_outlasts_is_refused_at_once(tmp_path: Path) -> None:
    """A 1 h lease holds the memory ``b`` needs; ``b``'s caller may wait 300 s: waiting
    can only end in a timeout, so it is refused now (409, Retry-After: the lease's time
    left, the lease named) instead of after 300 s (red: it waited out ``wait_timeout``)."""
    mm = manager(wait_timeout=300)
    async with served(mm, tmp_path) as http:
        taken = await http.post("/leases", json={"model": "a", "holder": "nightly-job", "reason": "eval run", "ttl": "1h"})  # fmt: skip
        assert taken.status_code == 200
        with anyio.fail_after(GUARD):  # a guard against the hang, not a timing assert
            blocked = await http.post("/models/b/load")
        assert blocked.status_code == 409, blocked.text
        assert 3500 <= int(blocked.headers["retry-after"]) <= 3600
        message = blocked.json()["error"]["message"]
        assert "nightly-job" in message and "'eval run'" in message, message
        assert mm.is_loaded("a") and not mm.is_loaded("b")


async def test_a_load_waits_for_a_lease_that_ends_within_its_wait(tmp_path: Path) -> None:
    """A lease that ends before the caller's wait bound is waited for, like any ``use()``:
    released, its model makes room and ``b`` loads."""
    mm = manager(wait_timeout=300)
    async with served(mm, tmp_path) as http:
        taken = (await http.post("/leases", json={"model": "a", "holder": "job", "ttl": 60})).json()
        waiting = anyio.Event()
        mm.events.subscribe(lambda e: waiting.set() if isinstance(e, ev.Waiting) and e.model == "b" else None)
        async with anyio.create_task_group() as tg:
            answers: list[httpx.Response] = []

            async def load_b() -> None:
                answers.append(await http.post("/models/b/load"))

            tg.start_soon(load_b)
            with anyio.fail_after(GUARD):
                await waiting.wait()
            assert (await http.delete(f"/leases/{taken['id']}")).status_code == 200
        assert answers[0].status_code == 200, answers[0].text
        assert mm.is_loaded("b")


async def test_a_ready_model_has_no_eta(tmp_path: Path) -> None:
    """``GET /models/{name}``: a model that is not loading has no time left to tell (red:
    ``eta_s`` was its whole expected load time); times are to the millisecond."""
    mm = manager(models={"a": {"memory": "3GB", "device": "cpu", "load_time": 0.01}})
    async with served(mm, tmp_path) as http:
        assert (await http.post("/models/a/load")).status_code == 200
        queue = (await http.get("/models/a")).json()["queue"]
        assert queue["loading"] is False and queue["eta_s"] is None and queue["percent"] is None, queue
