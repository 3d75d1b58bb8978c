"""The ray provider on a REAL multi-node Ray cluster on this machine: two raylets
(``alpha``: 4 GB of Ray memory, ``beta``: 2 GB), started once for the module by
``modelmora.testing.ray_cluster.local_cluster``, which fails the module if a Ray process
outlives it.  Models are tiny torch modules from a ``pkg.mod:factory`` target."""

from __future__ import annotations

import os
import signal
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

pytest.importorskip("ray", reason="the ray extra is not installed (pip install 'modelmora[ray]')")
pytest.importorskip("torch", reason="the torch extra is not installed")

from modelmora import ModelManager, ModelMoraError
from modelmora.memory import StaticProbe
from modelmora.providers.ray import RayHandle, RayProvider
from modelmora.testing.ray_cluster import local_cluster

pytestmark = [pytest.mark.anyio, pytest.mark.ray, pytest.mark.slow]
GB = 10**9
TINY = "modelmora.testing.ray_cluster:tiny_encoder"
SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny(memory: str, factory: str = "tiny_encoder", **more: Any) -> dict[str, Any]:
    """A tiny torch model; each factory is its own target, so its own actor."""
    target = f"modelmora.testing.ray_cluster:{factory}"
    return {"provider": "ray", "target": target, "device": "auto", "memory": memory, **more}


@pytest.fixture(scope="module")
def cluster() -> Iterator[Any]:
    with local_cluster({"alpha": 4 * GB, "beta": 2 * GB}) as c:
        yield c


def node_ids(cluster: Any) -> dict[str, str]:
    import ray

    return {n["NodeName"]: n["NodeID"] for n in ray.nodes() if n["Alive"]}


def manager(cluster: Any, models: dict[str, Any], **cfg: Any) -> ModelManager:
    config = {"models": models, "providers": {"ray": {"address": cluster.address}}, **cfg}
    return ModelManager(config, probe=StaticProbe({}))


async def test_planner_places_by_node_budget_and_models_run_there(cluster: Any) -> None:
    models = {
        "small": tiny("1.5GB"),  # best fit: beta (0.5 GB left) before alpha (2.5 GB left)
        "mid": tiny("1.8GB", "tiny_encoder_b"),  # beta has no room left: alpha
        "big": tiny("2.1GB", "tiny_encoder_c"),
        "huge": tiny("5GB", "tiny_encoder_b"),
    }
    async with manager(cluster, models) as mm:
        budgets = mm.budgets
        assert budgets["node-alpha/cpu"] == 4 * GB and budgets["node-beta/cpu"] == 2 * GB
        ids = node_ids(cluster)
        async with mm.use("small") as handle:
            assert isinstance(handle, RayHandle)
            assert handle.device == "node-beta/cpu"
            assert await handle.call("where") == ids["beta"]  # asked inside the actor
            assert await handle.call("encode", ["a", "bb"]) == [[1.0] * 8, [2.0] * 8]
        async with mm.use("mid") as handle:
            assert handle.device == "node-alpha/cpu"
            assert await handle.call("where") == ids["alpha"]
        # 2.1 GB is more than beta's whole budget: only alpha can hold it
        async with mm.use("big") as handle:
            assert handle.device == "node-alpha/cpu"
            assert await handle.call("where") == ids["alpha"]
        with pytest.raises(ModelMoraError, match=r"node-alpha/cpu") as refused:
            async with mm.use("huge"):
                pass
        assert "4.0 GB" in str(refused.value) or "4 GB" in str(refused.value)
        for name in ("small", "mid", "big"):
            assert await mm.unload(name)
    assert await _actors() == set()


async def test_park_and_wake_on_a_node(cluster: Any) -> None:
    models = {"warm": tiny("1GB", devices=["node-beta/cpu"], warm_tier=True)}
    events: list[str] = []
    async with manager(cluster, models) as mm:
        mm.events.subscribe(lambda e: events.append(e.kind))  # type: ignore[attr-defined]
        async with mm.use("warm") as handle:
            assert handle.device == "node-beta/cpu"
        assert await mm.park("warm")
        assert "Slept" in events
        (seen,) = await mm._core.providers["ray"].observe()
        assert seen.tier.value == "sleeping" and set(seen.memory) == {"node-beta/cpu"}
        async with mm.use("warm") as handle:
            assert "Woke" in events
            assert await handle.call("device") == "cpu"
            assert await handle.call("where") == node_ids(cluster)["beta"]
        assert await mm.unload("warm")
    assert await _actors() == set()


async def test_a_restarted_manager_adopts_the_actors_a_killed_one_left(cluster: Any, tmp_path: Path) -> None:
    models = {"one": tiny("1.5GB"), "two": tiny("1.8GB", "tiny_encoder_b")}
    script = textwrap.dedent(
        f"""
        import anyio, sys
        from modelmora import ModelManager
        from modelmora.memory import StaticProbe

        async def main():
            config = {{"models": {models!r}, "providers": {{"ray": {{"address": {cluster.address!r}}}}}}}
            async with ModelManager(config, probe=StaticProbe({{}})) as mm:
                for name in ("one", "two"):
                    async with mm.use(name):
                        pass
                print("ready", flush=True)
                await anyio.sleep(600)

        anyio.run(main)
        """
    )
    env = {**os.environ, "PYTHONPATH": SRC}
    async with await anyio.open_process([sys.executable, "-c", script], env=env) as proc:
        try:
            assert proc.stdout is not None
            out = b""
            with anyio.fail_after(240):
                while b"\n" not in out:
                    out += await proc.stdout.receive()
            assert out.strip() == b"ready", out
            os.kill(proc.pid, signal.SIGKILL)  # no unload, no clean-up: the actors are detached
        finally:
            proc.kill()
            await proc.wait()
    assert await _actors() == {"ray:" + TINY, "ray:" + TINY + "_b"}
    async with manager(cluster, models) as mm:
        assert set(mm.loaded()) == {"one", "two"}  # adopted at start-up
        async with mm.use("one") as handle:
            assert handle.device == "node-beta/cpu"
            assert await handle.call("where") == node_ids(cluster)["beta"]
        assert await mm.unload("one") and await mm.unload("two")
    assert await _actors() == set()


async def test_a_lost_node_takes_its_models_out_and_the_next_use_loads_elsewhere(cluster: Any) -> None:
    node = cluster.add_node(num_cpus=1, memory=1 * GB, node_name="gamma")
    cluster.wait_for_nodes()
    models = {"m": tiny("0.5GB", devices=["node-gamma/cpu", "node-alpha/cpu"])}
    vanished: list[Any] = []
    async with manager(cluster, models) as mm:
        mm.events.subscribe(lambda e: vanished.append(e) if e.kind == "Vanished" else None)  # type: ignore[attr-defined]
        async with mm.use("m") as handle:
            assert handle.device == "node-gamma/cpu"  # best fit: the smaller node
        cluster.remove_node(node, allow_graceful=False)  # its raylet and workers are killed
        with anyio.fail_after(60):
            while not vanished:
                await anyio.sleep(0.1)
        assert "m" not in mm.loaded() and vanished[0].model == "m"
        with pytest.raises(ModelMoraError, match="died"):
            await handle.call("where")  # the old handle says why
        async with mm.use("m") as handle:
            assert handle.device == "node-alpha/cpu"
            assert await handle.call("where") == node_ids(cluster)["alpha"]
        assert await mm.unload("m")
    assert await _actors() == set()


async def test_an_unreachable_address_is_one_line_naming_it() -> None:
    provider = RayProvider("ray", RayProvider.Settings(address="127.0.0.1:9"))
    with pytest.raises(ModelMoraError, match=r"'127\.0\.0\.1:9' is unreachable"):
        await provider.devices()


async def _actors() -> set[str]:
    import ray

    names = await anyio.to_thread.run_sync(lambda: ray.util.list_named_actors(all_namespaces=True))
    return {a["name"] for a in names if a["namespace"] == "modelmora"}


def test_the_proxy_answers_embeddings_from_a_ray_hosted_model(cluster: Any) -> None:
    import httpx

    from modelmora.server import create_app
    from modelmora.testing.threaded import ThreadedServer

    config = {"models": {"emb": tiny("1GB")}, "providers": {"ray": {"address": cluster.address}}}
    server = ThreadedServer(create_app(config)).start()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            reply = c.post("/v1/embeddings", json={"model": "emb", "input": ["a", "bbb"]})
            assert reply.status_code == 200, reply.text
            assert [d["embedding"] for d in reply.json()["data"]] == [[1.0] * 8, [3.0] * 8]
            assert (
                c.post(
                    "/v1/chat/completions",
                    json={"model": "emb", "messages": [{"role": "user", "content": "hi"}]},
                ).status_code
                == 400
            )
    finally:
        server.stop()  # the server's manager leaves its models running, for the next to adopt

    async def adopt_and_unload() -> set[str]:
        async with manager(cluster, config["models"]) as mm:
            assert mm.loaded() == ["emb"]
            assert await mm.unload("emb")
        return await _actors()

    assert anyio.run(adopt_and_unload) == set()
