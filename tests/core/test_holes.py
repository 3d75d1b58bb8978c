"""Issue 22, the core's last holes: a park that overfills the warm tier, loads of unknown
size, leaving the manager with a load in flight, callers waiting on a model that are not
counted as its leases, the failure cool-down's window, admission past the caller's
deadline, and a refusal that blames other processes for this process's leak.

Each test's docstring says what it checks and what was red on 906aebf."""

from __future__ import annotations

import contextlib
from typing import Any

import anyio
import pytest

from modelmora import (
    InsufficientMemory,
    ManagerClosed,
    ModelInUse,
    ModelManager,
    ModelMoraError,
    ModelMoraTimeout,
    ModelSpec,
    RecentlyFailed,
)
from modelmora.core import Admit
from modelmora.core.planner import Candidate, Plan, Resident, plan_admission
from modelmora.memory import StaticProbe
from modelmora.providers import ProviderRegistry
from modelmora.providers.base import Handle, Observed, Provider
from modelmora.testing.faulty import Call, FaultyProvider, gb, over_budget

from .support import GB, faulty_manager, hold, model, overcommits, release_all, settle

pytestmark = pytest.mark.anyio


def calls(faulty: FaultyProvider, op: str, target: str) -> list[Call]:
    return [c for c in faulty.calls if c.op == op and c.target == target]


# -- 1. a park that overfills the warm tier ----------------------------------------------------

WARM_BUDGETS = {"cuda:0": 16 * GB, "cpu": 10 * GB}


def applied(plan: Plan, residents: list[Resident], candidate: Candidate) -> dict[str, int]:
    """Bytes per device once ``plan`` is carried out and ``candidate`` loaded."""
    assert isinstance(plan, Admit), plan
    used: dict[str, int] = dict(candidate.memory)
    for r in residents:
        if r.name in plan.evict:
            continue
        memory = r.sleep_memory if r.name in plan.sleep else r.memory
        for device, n in (memory or {}).items():
            used[device] = used.get(device, 0) + n
    return used


def test_01_the_planner_never_parks_into_a_full_warm_tier() -> None:
    """Item 1, the planner alone: parking ``s`` (8 GB to RAM) fits the 10 GB RAM budget
    only while ``v`` (2 GB GPU + 6 GB RAM) is counted as a victim; the plan then gives ``v``
    back (it is not needed on the GPU) without checking RAM again.

    Red on 906aebf: ``Admit(evict=(), sleep=('s',))``, which holds 14 GB on the 10 GB cpu
    budget."""
    residents = [
        Resident("v", {"cuda:0": 2 * GB, "cpu": 6 * GB}, last_used=1.0),
        Resident("s", {"cuda:0": 8 * GB}, last_used=2.0, sleep_memory={"cpu": 8 * GB}),
    ]
    candidate = Candidate("x", {"cuda:0": 10 * GB})
    plan = plan_admission(residents, candidate, WARM_BUDGETS)
    after = applied(plan, residents, candidate)
    assert over_budget(after, WARM_BUDGETS) == {}, f"{plan} leaves {after} on budgets {WARM_BUDGETS}"


async def test_01_a_park_never_overfills_the_ram_budget() -> None:
    """Item 1 through the manager: ``load("x")`` parks ``s`` to RAM and keeps ``v``.

    Red on 906aebf: 14 GB held on the 10 GB cpu budget, in the table and in the runtime."""
    faulty = FaultyProvider()
    models = {
        "v": {"provider": "faulty", "memory": {"cuda:0": "2GB", "cpu": "6GB"}},
        "s": model(8, warm_tier=True),
        "x": model(10),
    }
    async with faulty_manager(faulty, models, budgets={"cuda:0": "16GB", "cpu": "10GB"}) as mm:
        await mm.load("v")
        await mm.load("s")
        await mm.load("x")
        table = mm.usage()
        truth = faulty.describe()
    assert over_budget(faulty.held(), WARM_BUDGETS) == {}, f"the runtime is over budget: {truth}"
    assert over_budget(table, WARM_BUDGETS) == {}, f"the table counts {table}: {truth}"


# -- 2. loads of unknown size ------------------------------------------------------------------


async def test_02_two_loads_of_unknown_size_never_overcommit() -> None:
    """Item 2: two models with no ``memory:`` and no past measurement, each really 10 GB,
    asked for at once on a 16 GB GPU.  A load with nothing to go on must not reserve
    nothing.

    Red on 906aebf: both loads run together: "load of b started with 20 GB committed on
    cuda:0 against a 16 GB budget"."""
    faulty = FaultyProvider()
    unknown = {"provider": "faulty", "options": {"actual_memory": {"cuda:0": 10 * GB}}}
    async with faulty_manager(faulty, {"a": unknown, "b": unknown}) as mm:
        faulty.hold("load")
        async with anyio.create_task_group() as tg:
            a, b = hold(tg, mm, "a"), hold(tg, mm, "b")
            await settle()
            overcommitted = overcommits(faulty, {"cuda:0": 16 * GB})
            truth = faulty.describe()
            faulty.unhold()
            faulty.release("load")
            with anyio.fail_after(10):  # a hang detector: one of them may wait for the other
                await release_all(a, b)
    assert overcommitted == [], f"{overcommitted} ({truth})"


# -- 3 and 4. leaving `async with ModelManager(...)` with a load in flight ---------------------


class Server:
    """A runtime behind a client, like Ollama: a load it was asked for runs to its end on
    the server even when the client's request is cancelled."""

    def __init__(self) -> None:
        self.models: set[str] = set()
        self.asked = anyio.Event()


class ServerClient(Provider):
    """A provider over :class:`Server` whose client, once closed by ``aclose()``, refuses
    every call (as a closed httpx client does)."""

    def __init__(self, name: str, server: Server):
        super().__init__(name)
        self.server = server
        self.closed = False

    def _client(self) -> Server:
        if self.closed:
            raise RuntimeError("Cannot send a request, as the client has been closed.")
        return self.server

    async def load(self, spec: ModelSpec) -> Handle:
        server = self._client()
        server.models.add(spec.target)  # the server will finish this load whatever we do
        server.asked.set()
        await anyio.sleep_forever()  # its answer comes after the manager is left
        raise AssertionError("unreachable")

    async def unload(self, handle: Handle) -> dict[str, int]:
        self._client().models.discard(handle.target)
        handle.close()
        return {}

    async def discard(self, spec: ModelSpec) -> None:
        self._client().models.discard(spec.target)

    async def observe(self) -> list[Observed]:
        return [
            Observed(target=t, memory={"cuda:0": 4 * GB}, owned=True) for t in sorted(self._client().models)
        ]

    async def aclose(self) -> None:
        self.closed = True


async def test_03_leaving_the_manager_cleans_up_a_load_in_flight_before_closing_providers() -> None:
    """Item 3: the manager is left while a load runs; the load is cancelled, and its
    cleanup (``Provider.discard``) must run before the providers the manager built are
    closed, or the runtime keeps the model after exit.

    Red on 906aebf: the cleanup meets a closed client and the server still holds ``m``."""
    server = Server()
    registry = ProviderRegistry()
    registry.register("server-client", lambda name, settings: ServerClient(name, server))
    config = {
        "budgets": {"cuda:0": "16GB"},
        "reaper_interval": 3600,
        "reconcile_interval": 3600,
        "providers": {"srv": {"type": "server-client"}},
        "models": {"m": {"provider": "srv", "target": "m", "memory": "4GB"}},
    }
    answers: list[BaseException | None] = []
    exit_error: BaseException | None = None

    async def caller(mm: ModelManager) -> None:
        try:
            await mm.load("m")
            answers.append(None)
        except ModelMoraError as exc:
            answers.append(exc)

    with anyio.fail_after(10):  # a hang detector
        async with anyio.create_task_group() as tg:
            mm = ModelManager(config, registry=registry, probe=StaticProbe({}))
            await mm.__aenter__()
            tg.start_soon(caller, mm)
            await server.asked.wait()
            try:
                await mm.__aexit__(None, None, None)
            except Exception as exc:  # reported below
                exit_error = exc
    assert server.models == set(), (
        f"the server still holds {sorted(server.models)} after the manager exited "
        f"(the caller got {answers}; __aexit__ raised {exit_error!r})"
    )
    assert exit_error is None, repr(exit_error)
    assert len(answers) == 1 and isinstance(answers[0], ManagerClosed), answers


async def test_04_a_failed_loads_cleanup_during_shutdown_answers_its_caller_and_raises_nothing() -> None:
    """Item 4: a load of ``b`` fails partway (the runtime holds it) and its cleanup is
    still running when the manager is left; the cleanup then fails, so the failed load
    reconciles, finds ``b`` and adopts it, after the task group is gone.

    Red on 906aebf: ``__aexit__`` raises ``ExceptionGroup([ManagerClosed])`` and the caller
    waiting for ``b`` is never answered (it waits on the adoption row's attempt)."""
    faulty = FaultyProvider()
    mm = faulty_manager(faulty, {"b": model(4)})
    outcome: dict[str, Any] = {}
    entered, leave, left = anyio.Event(), anyio.Event(), anyio.Event()

    async def lifespan() -> None:  # enters and leaves the manager in one task
        try:
            async with mm:
                entered.set()
                await leave.wait()
        except Exception as exc:  # asserted below
            outcome["exit"] = exc
        finally:
            left.set()

    async with anyio.create_task_group() as tg:
        tg.start_soon(lifespan)
        await entered.wait()
        faulty.fail_partway("b")
        faulty.hold("unload", "b", times=1)  # the cleanup of what the failed load left behind
        caller = hold(tg, mm, "b")
        await faulty.wait_pending("unload", "b")
        leave.set()
        await settle()  # the manager is shutting down: it waits for the shielded cleanup
        faulty.release("unload", "b", error=RuntimeError("the runtime will not let go"))
        with anyio.move_on_after(10):  # a hang detector, not a timing
            await left.wait()
            await caller.done.wait()
        exited, answered, seen = left.is_set(), caller.done.is_set(), repr(caller)
        tg.cancel_scope.cancel()
    raised = outcome.get("exit")
    assert exited, "__aexit__ did not return within 10 s"
    assert answered and raised is None, (
        f"the caller waiting for b: {seen} 10 s after the manager was left; __aexit__ raised {raised!r}"
    )
    assert isinstance(caller.error, ModelMoraError), caller


# -- 5. callers waiting on a model are leases --------------------------------------------------


async def _quietly(call: Any, *args: Any) -> None:
    with contextlib.suppress(ModelMoraError):
        await call(*args)


async def test_05_a_failed_park_keeps_a_model_a_caller_waits_for() -> None:
    """Item 5: ``p`` is parking when a caller asks for it, then the park fails; the park's
    fallback ("warm tier failed") must not unload a model a caller waits for: the caller
    gets the model it asked for, not a second, fresh load.

    Red on 906aebf: the caller waiting on a parking model is not counted as a lease, so
    ``p`` is unloaded and loaded again for it."""
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"p": model(8, warm_tier=True)}) as mm:
        first = faulty.instance_id(await mm.load("p"))
        faulty.hold("sleep", "p", times=1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(_quietly, mm.park, "p")
            await faulty.wait_pending("sleep", "p")
            caller = hold(tg, mm, "p")
            await settle()
            faulty.release("sleep", "p", error=RuntimeError("the warm tier is full"))
            with anyio.fail_after(10):  # a hang detector
                await caller.granted.wait()
            got = faulty.instance_id(caller.handle) if caller.handle is not None else None
            await release_all(caller)
        truth = faulty.describe()
    unloads, loads = calls(faulty, "unload", "p"), calls(faulty, "load", "p")
    assert not unloads, f"p was unloaded although a caller waited for it ({len(loads)} loads; {truth})"
    assert len(loads) == 1 and got == first, f"{len(loads)} loads; the caller got instance {got}, not {first}"


async def test_05_a_caller_queued_behind_the_lease_bypass_limit_is_a_lease() -> None:
    """Item 5: ``b`` waits for the memory of a leased ``a``, so new leases on ``a`` queue
    behind it (``lease_bypass_limit: 0``); a caller queued so waits for ``a`` and must
    count as one of its leases: an unload without force is refused.

    Red on 906aebf: ``unload("a")`` unloads ``a`` under the queued caller (no ModelInUse)."""
    faulty = FaultyProvider()
    models = {"a": model(10), "b": model(10)}
    async with faulty_manager(faulty, models, lease_bypass_limit=0) as mm:
        lease = mm.use("a")
        await lease.__aenter__()
        async with anyio.create_task_group() as tg:
            waiting = hold(tg, mm, "b")  # waits for a's memory: a is leased
            await settle()
            queued = hold(tg, mm, "a")  # queues behind b: no lease may bypass it
            await settle()
            assert not queued.granted.is_set() and not waiting.granted.is_set()
            lease.release()  # a's last holder goes; the queued caller still waits for a
            try:
                outcome: BaseException | str = "unloaded" if await mm.unload("a") else "not resident"
            except ModelInUse as exc:
                outcome = exc
            tg.cancel_scope.cancel()
    assert isinstance(outcome, ModelInUse), f"unload('a') without force: {outcome} under a queued caller"


# -- 6. the failure cool-down's window ---------------------------------------------------------


async def test_06_a_load_right_after_a_failure_is_refused_before_the_first_caller_is_answered() -> None:
    """Item 6: the load of ``b`` fails, its cleanup fails too, and the failed load then
    reconciles (held here): ``b`` has left the table but its failure is not recorded yet.
    A new ``load("b")`` in that window must be refused (RecentlyFailed), not load again.

    Red on 906aebf: the second ``load("b")`` starts a second load (2 load calls), no
    RecentlyFailed."""
    faulty = FaultyProvider()
    async with faulty_manager(faulty, {"b": model(4)}) as mm:
        faulty.fail_next("load", "b")
        faulty.fail_next("observe", error=RuntimeError("the runtime does not answer"))  # the cleanup's
        faulty.hold("observe", times=1)  # the reconcile after the failed cleanup
        outcomes: dict[str, Any] = {}

        async def load(key: str) -> None:
            try:
                await mm.load("b")
                outcomes[key] = "loaded"
            except ModelMoraError as exc:
                outcomes[key] = exc

        async with anyio.create_task_group() as tg:
            tg.start_soon(load, "first")
            await faulty.wait_pending("observe")
            await settle()
            tg.start_soon(load, "second")
            await settle()
            loads = len(calls(faulty, "load", "b"))
            second = outcomes.get("second", "still waiting")
            faulty.release("observe")
    assert isinstance(second, RecentlyFailed), f"a load right after b failed: {second} ({loads} load calls)"
    assert loads == 1, f"{loads} load calls"
    assert isinstance(outcomes["first"], ModelMoraError), outcomes


# -- 7. admission bounded by the caller's deadline ---------------------------------------------


async def test_07_a_load_that_must_evict_is_answered_by_its_wait_timeout_when_observe_hangs() -> None:
    """Item 7: with ``wait_timeout: 1s`` and ``load_timeout: 2s``, a load that must evict
    reconciles first, and the runtime's ``observe()`` hangs: the caller must get
    ModelMoraTimeout by its deadline (5 s here: a hang detector, not a timing).

    Red on 906aebf: no answer while ``observe()`` hangs."""
    faulty = FaultyProvider()
    models = {"a": model(10), "b": model(10, load_timeout="2s")}
    async with faulty_manager(faulty, models, wait_timeout="1s") as mm:
        await mm.load("a")  # idle: b must evict it
        faulty.hold("observe")
        outcome: BaseException | str = "no answer within 5 s"
        with anyio.move_on_after(5):
            try:
                await mm.load("b")
                outcome = "loaded"
            except ModelMoraError as exc:
                outcome = exc
        faulty.unhold()
        faulty.release("observe")
    assert isinstance(outcome, ModelMoraTimeout), f"load('b') with observe() hanging: {outcome}"


# -- 9. the refusal names this process's leak --------------------------------------------------


async def test_09_a_refusal_names_the_model_whose_unload_left_memory_held() -> None:
    """Item 9: ``leaky``'s unload leaves 10 GB held by this process (``leaked()``, as a
    torch model object still referenced); the refusal of the next load must say so and
    name ``leaky``, not blame other processes.

    Red on 906aebf: "next-model needs 10 GB on cuda:0 but the budget is 16 GB (10 GB used by
    other processes) (resident: nothing)"."""
    faulty = FaultyProvider()

    def leak(call: Call) -> None:
        if call.op == "unload" and call.target == "leaky":
            faulty.leak("leaky", {"cuda:0": gb(10)})  # the provider knows whose unload left it

    async with faulty_manager(faulty, {"leaky": model(10), "next-model": model(10)}) as mm:
        await mm.load("leaky")
        faulty.listeners.append(leak)
        await mm.unload("leaky")
        with pytest.raises(InsufficientMemory) as refused:
            await mm.load("next-model")
    message = str(refused.value)
    assert "leaky" in message, message
    assert "other processes" not in message, message
