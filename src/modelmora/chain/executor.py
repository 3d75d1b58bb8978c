"""Multi-step, multi-model chains: each step's model is loaded when needed and let go as
soon as the chain's residency plan says keeping it no longer pays.

    chain = Chain(
        steps=[Step(model="mistral-small", instruction="Quick analysis: {input}"),
               Step(model="deepseek-r1", instruction="Deep reasoning: {input}"),
               Step(model="mistral-small", instruction="Final summary: {input}")],
        management={"provider": "ollama", "base_url": "http://127.0.0.1:11434"},
    )
    result = await chain.run("text")

The chain holds a lease on every model the plan keeps between steps, so nothing else
evicts it mid-chain; it unloads only models it loaded itself and nobody else leases.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self, TypeVar

import anyio
import anyio.abc
import anyio.from_thread
from anyio.from_thread import BlockingPortal, start_blocking_portal

from ..config import ManagerConfig
from ..core import Lease, ModelManager, Wait
from ..errors import ConfigError, ModelMoraError
from ..providers.base import Handle
from .llm import complete
from .management import Management
from .plan import PlanModel, PlannedStep, ResidencyPlan, plan_always_unload, plan_next_use, plan_residency

T = TypeVar("T")

StepCall = Callable[[Any, Any], Any]
"""``(model, input) -> output``, sync or async; ``model`` is the leased object (in-process
runtimes) or the :class:`Handle` (server runtimes), None for a step without a model.  A
callable whose first parameter is named ``handle`` gets the :class:`Handle` itself (its
endpoint, and extras such as a transformers model's tokenizer)."""


class ChainObserver:
    """Hooks for a live display of a run; every method is optional."""

    def plan_ready(self, plan: ResidencyPlan) -> None:
        pass

    def step_started(self, index: int, step: Step, planned: PlannedStep | None) -> None:
        pass

    def step_finished(self, info: StepInfo) -> None:
        pass


@dataclass
class Step:
    """One step: a model from the registry (or ``provider/target``) and what to do with it."""

    model: str | None = None
    instruction: str = "{input}"
    call: StepCall | None = None
    params: dict[str, Any] = field(default_factory=dict)  # temperature, max_tokens, timeout, stream
    name: str | None = None
    on_token: Callable[[str], Any] | None = None

    def __post_init__(self) -> None:
        if self.model is None and self.call is None:
            raise ConfigError("a step needs a model, a callable, or both")
        if "{input}" not in self.instruction and self.call is None:
            raise ConfigError(f"step instruction {self.instruction!r} has no {{input}} placeholder")

    @property
    def label(self) -> str:
        return self.name or self.model or str(getattr(self.call, "__name__", "step"))


@dataclass
class StepInfo:
    """What happened in one step; chainbreakers see it, the result keeps it."""

    index: int
    step: str
    model: str | None
    output: Any = None
    error: str | None = None
    exception: BaseException | None = field(default=None, repr=False)
    loaded: bool = False  # this step had to load its model (or take a prefetched one)
    prefetched: bool = False
    load_failed: bool = False  # the step broke getting its model, before it ran
    unloaded: tuple[str, ...] = ()
    load_s: float = 0.0
    run_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


Chainbreaker = Callable[[int, Any, StepInfo], "tuple[bool, str, Any] | Awaitable[tuple[bool, str, Any]]"]
"""``(step_index, output, step_info) -> (stop, reason, final_output)``, checked after every
step.  ``stop`` ends the chain with ``final_output``; otherwise a non-None ``final_output``
replaces the step's output (how a breaker recovers from a failed step)."""


@dataclass
class ChainResult:
    output: Any
    steps: list[StepInfo]
    plan: ResidencyPlan | None
    broken_at: int | None = None
    reason: str | None = None
    duration_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.broken_at is None

    @property
    def loads(self) -> int:
        return sum(s.loaded for s in self.steps)


class Chain:
    """A chain of steps over one :class:`ModelManager` (its own, or one shared with others).

    ``management`` is validated like the global config and applies to this chain only;
    without it and without ``manager`` the chain does no lifecycle control at all.
    """

    def __init__(
        self,
        steps: Sequence[Step],
        *,
        management: Mapping[str, Any] | Management | None = None,
        manager: ModelManager | None = None,
        config: ManagerConfig | Mapping[str, Any] | str | None = None,
        chainbreakers: Sequence[Chainbreaker] = (),
        manager_options: Mapping[str, Any] | None = None,
    ):
        if not steps:
            raise ConfigError("a chain needs at least one step")
        self.steps = list(steps)
        if isinstance(management, Management):
            self.management = management
        else:
            self.management = Management.from_dict(
                management or {}, enabled_by_default=management is not None or manager is not None
            )
        self.chainbreakers = list(chainbreakers)
        self._shared = manager
        self._config = config
        self._manager_options = dict(manager_options or {})
        self._manager: ModelManager | None = manager
        self._stack: contextlib.AsyncExitStack | None = None
        self._portal: BlockingPortal | None = None
        self._sync_stack: contextlib.ExitStack | None = None
        self.loaded_by_chain: set[str] = set()  # unloaded by cleanup, never anything else

    # -- lifecycle ----------------------------------------------------------------------

    def _build_manager(self) -> ModelManager:
        base = self._config
        if base is None or isinstance(base, Mapping):
            base = ManagerConfig.from_dict(base or {}, source="chain config")
        elif isinstance(base, str):
            base = ManagerConfig.from_yaml(base)
        return ModelManager(self.management.apply(base), **self._manager_options)

    async def __aenter__(self) -> Self:
        stack = contextlib.AsyncExitStack()
        if self._shared is None:
            self._manager = await stack.enter_async_context(self._build_manager())
        self._stack = stack
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._stack = self._stack, None
        try:
            if self.management.enabled and self.management.auto_unload:
                with anyio.CancelScope(shield=True):
                    await self.cleanup()
        finally:
            if stack is not None:
                await stack.aclose()
            if self._shared is None:
                self._manager = None

    @contextlib.asynccontextmanager
    async def _session(self) -> Any:
        """The manager, entered for this call when the chain is not entered already."""
        if self._manager is not None:
            yield self._manager
            return
        async with self:
            assert self._manager is not None
            yield self._manager

    @property
    def manager(self) -> ModelManager:
        if self._manager is None:
            raise ModelMoraError("the chain is not running: use 'async with chain:' or chain.run()")
        return self._manager

    # -- names and the plan ---------------------------------------------------------------

    def model_name(self, step: Step) -> str | None:
        """The registry name a step's model resolves to (a bare name goes to the chain's provider)."""
        name = step.model
        if name is None or self._manager is None:
            return name
        if name in self._manager.models or "/" in name or self.management.provider is None:
            return name
        return f"{self.management.provider}/{name}"

    def sequence(self) -> list[str | None]:
        return [self.model_name(s) for s in self.steps]

    async def _plan_with(self, mm: ModelManager) -> ResidencyPlan:
        sequence = self.sequence()
        names = sorted({n for n in sequence if n is not None})
        models = {}
        for name in names:
            spec = mm.spec(name)
            memory, seconds = mm.footprint(name)
            if not memory:  # ask the runtime (Ollama knows its models' sizes)
                with contextlib.suppress(ModelMoraError):
                    memory = dict((await mm.provider(spec.provider).prepare(spec)).memory)
            models[name] = PlanModel(name, memory, seconds if seconds is not None else 1.0, spec.group)
        capacity = mm.headroom(exclude=names)
        for device, limit in self.management.budget_limits().items():
            capacity[device] = min(capacity.get(device, limit), limit)
        if self.management.strategy == "next-use":
            return plan_next_use(sequence, models)
        if self.management.strategy == "always-unload":
            return plan_always_unload(sequence, models)
        plan = functools.partial(
            plan_residency,
            sequence,
            models,
            capacity,
            initial=[n for n in names if mm.is_loaded(n)],
            max_models=mm.config.max_loaded_models,
            prefetch=self.management.prefetch,
            time_budget=self.management.plan_budget,
            stop=functools.partial(_cancelled, anyio.get_cancelled_exc_class()),
        )
        return await anyio.to_thread.run_sync(plan)  # CPU work for up to plan_budget: off the loop

    async def plan(self) -> ResidencyPlan:
        """The residency plan for the next run, computed without loading anything (the
        planner runs in a worker thread: an exact plan over many models takes a while)."""
        async with self._session() as mm:
            return await self._plan_with(mm)

    # -- running --------------------------------------------------------------------------

    async def run(self, input: Any = "", *, observer: ChainObserver | None = None) -> ChainResult:
        """Run every step in order; the result says which step broke and why, if one did."""
        async with self._session() as mm:
            return await _Run(self, mm, observer or ChainObserver()).execute(input)

    # -- manual control -------------------------------------------------------------------

    async def load_model(self, name: str) -> None:
        lease = self.manager.use(name)
        async with lease:
            if lease.loaded_here:  # ownership from the lease, never guessed from the table
                self.loaded_by_chain.add(name)

    async def unload_model(self, name: str, *, force: bool = False) -> bool:
        self.loaded_by_chain.discard(name)
        return await self.manager.unload(name, force=force)

    def loaded_models(self) -> list[str]:
        """The chain's models that are resident now."""
        if self._manager is None:
            return []
        names = {n for n in self.sequence() if n is not None} | self.loaded_by_chain
        return sorted(n for n in names if self._manager.is_loaded(n))

    async def management_status(self) -> dict[str, Any]:
        status: dict[str, Any] = {
            "enabled": self.management.enabled,
            "auto_unload": self.management.auto_unload,
            "prefetch": self.management.prefetch,
            "loaded_by_chain": sorted(self.loaded_by_chain),
            "loaded": self.loaded_models(),
        }
        if self._manager is not None:
            status["manager"] = (await self._manager.status()).to_dict()
        return status

    def set_auto_unload(self, enabled: bool) -> None:
        self.management = self.management.model_copy(update={"auto_unload": enabled})

    async def cleanup(self) -> list[str]:
        """Unload what this chain loaded and nobody else leases; returns what went."""
        if self._manager is None:
            return []
        return [name for name in sorted(self.loaded_by_chain) if await self._let_go(name)]

    async def _let_go(self, name: str) -> bool:
        """Unload ``name`` if this chain loaded it and nobody leases it; True when it went.
        A model someone else leases stays on the chain's list for a later clean-up."""
        mm = self.manager
        if name not in self.loaded_by_chain or mm.leases(name):
            return False
        self.loaded_by_chain.discard(name)
        with contextlib.suppress(ModelMoraError):
            return await mm.unload(name)
        return False

    # -- sync variants --------------------------------------------------------------------

    def __enter__(self) -> Self:
        stack = contextlib.ExitStack()
        try:
            self._portal = stack.enter_context(start_blocking_portal())
            stack.enter_context(self._portal.wrap_async_context_manager(self))
        except BaseException:
            stack.close()
            self._portal = None
            raise
        self._sync_stack = stack
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        stack, self._sync_stack = self._sync_stack, None
        try:
            if stack is not None:
                stack.__exit__(exc_type, exc, tb)
        finally:
            self._portal = None

    def _call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        if self._portal is not None:
            return self._portal.call(fn, *args)
        with start_blocking_portal() as portal:
            return portal.call(fn, *args)

    def run_sync(self, input: Any = "") -> ChainResult:
        return self._call(self.run, input)

    def plan_sync(self) -> ResidencyPlan:
        return self._call(self.plan)

    def load_model_sync(self, name: str) -> None:
        self._call(self.load_model, name)

    def unload_model_sync(self, name: str, force: bool = False) -> bool:
        return self._call(self.unload_model, name, force)

    def management_status_sync(self) -> dict[str, Any]:
        return self._call(self.management_status)

    def cleanup_sync(self) -> list[str]:
        return self._call(self.cleanup)


def _cancelled(cancelled: type[BaseException]) -> bool:
    """In the planner's worker thread: whether the task that waits for the plan is cancelled
    (the search then stops at once instead of running out its budget).  ``cancelled``: the
    backend's cancellation exception, looked up on the loop (the thread has none)."""
    try:
        anyio.from_thread.check_cancelled()
    except cancelled:
        return True
    return False


class _Run:
    """One execution of a chain: the leases it holds and the plan it follows."""

    def __init__(self, chain: Chain, mm: ModelManager, observer: ChainObserver):
        self.chain = chain
        self.mm = mm
        self.observer = observer
        self.managed = chain.management.enabled
        self.held: dict[str, tuple[Lease, Handle]] = {}
        self.plan: ResidencyPlan | None = None
        self.fresh: dict[str, bool] = {}  # taken by this run and not yet counted by a step
        self.prefetching: dict[str, anyio.Event] = {}
        self.prefetch_errors: dict[str, BaseException] = {}

    async def execute(self, value: Any) -> ChainResult:
        started = time.perf_counter()
        chain = self.chain
        plan = self.plan = await chain._plan_with(self.mm) if self.managed else None
        if plan is not None:
            self.observer.plan_ready(plan)
        sequence = chain.sequence()
        infos: list[StepInfo] = []
        broken_at: int | None = None
        reason: str | None = None
        try:
            async with anyio.create_task_group() as tg:
                for i, step in enumerate(chain.steps):
                    planned = plan.steps[i] if plan else None
                    info = StepInfo(i, step.label, sequence[i])
                    infos.append(info)
                    self.observer.step_started(i, step, planned)
                    try:
                        try:
                            handle = await self._acquire(sequence[i], info)
                        except Exception:
                            info.load_failed = True
                            raise
                        if planned is not None and planned.prefetch and chain.management.prefetch:
                            self._start_prefetch(tg, planned.prefetch)
                        t0 = time.perf_counter()
                        info.output = await self._call(step, handle, value)
                        info.run_s = time.perf_counter() - t0
                    except Exception as exc:
                        info.error, info.exception = _describe(exc), exc
                    self.observer.step_finished(info)
                    if planned is None:  # no lifecycle control: the manager's TTL decides
                        await self._release([n for n in (sequence[i],) if n is not None])
                    elif chain.management.auto_unload:
                        info.unloaded = await self._release(planned.unload_after)
                    stop, why, final = await self._breakers(i, info)
                    if stop:
                        broken_at, reason, value = i, why, final
                        break
                    if info.error is not None:
                        if final is None:
                            broken_at, reason = i, info.error
                            break
                        info.output = final
                    elif final is not None:
                        info.output = final
                    value = info.output
                tg.cancel_scope.cancel()  # a prefetch the chain no longer needs
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish()
        return ChainResult(value, infos, plan, broken_at, reason, time.perf_counter() - started)

    async def _acquire(self, name: str | None, info: StepInfo) -> Handle | None:
        if name is None:
            return None
        started = time.perf_counter()
        pending = self.prefetching.pop(name, None)
        if pending is not None:
            await pending.wait()
            info.prefetched = name in self.held
            if name in self.prefetch_errors:
                raise self.prefetch_errors.pop(name)
        if name not in self.held:
            # estimates can be wrong: never let a model the plan kept block the one needed now
            verdict = self.mm.plan(name, self.plan.models[name].memory if self.plan else None)
            if isinstance(verdict, Wait):
                await self._release([b for b in verdict.blockers if b in self.held and b != name])
            await self._take(name)
        info.loaded = self.fresh.pop(name, False)
        info.load_s = time.perf_counter() - started
        return self.held[name][1]

    async def _take(self, name: str) -> None:
        """Lease ``name`` for as long as the plan keeps it, noting whether that loaded it:
        the lease says whether taking it started the load, so a model another caller is
        loading (or holds) is never counted as the chain's."""
        lease = self.mm.use(name)
        try:
            handle = await lease.__aenter__()
        finally:  # a prefetch cancelled mid-load still owns the load it started
            if lease.loaded_here and self.managed:
                self.chain.loaded_by_chain.add(name)
        self.held[name] = (lease, handle)
        self.fresh[name] = lease.loaded_here

    def _start_prefetch(self, tg: anyio.abc.TaskGroup, name: str) -> None:
        if name in self.held or name in self.prefetching:
            return
        done = self.prefetching[name] = anyio.Event()

        async def prefetch() -> None:
            try:
                await self._take(name)
            except Exception as exc:  # handed to the step that needs the model
                self.prefetch_errors[name] = exc
            finally:
                done.set()

        tg.start_soon(prefetch)

    async def _release(self, names: Sequence[str]) -> tuple[str, ...]:
        gone = []
        for name in names:
            held = self.held.pop(name, None)
            if held is not None:
                await held[0].__aexit__(None, None, None)
            if await self.chain._let_go(name):
                gone.append(name)
        return tuple(gone)

    async def _finish(self) -> None:
        for name in list(self.held):
            lease, _ = self.held.pop(name)
            await lease.__aexit__(None, None, None)
        if self.managed and self.chain.management.auto_unload:
            await self.chain.cleanup()

    async def _call(self, step: Step, handle: Handle | None, value: Any) -> Any:
        if step.call is not None:
            model: Any = None
            if handle is not None:
                model = handle if _wants_handle(step.call) or not _in_process(handle) else handle.obj
            if inspect.iscoroutinefunction(step.call):
                return await step.call(model, value)
            result = await anyio.to_thread.run_sync(step.call, model, value)
            if inspect.isawaitable(result):
                result = await result
            return result
        assert handle is not None
        prompt = step.instruction.replace("{input}", str(value))
        return await complete(handle, prompt, step.params, step.on_token)

    async def _breakers(self, index: int, info: StepInfo) -> tuple[bool, str, Any]:
        final: Any = None
        for breaker in self.chain.chainbreakers:
            verdict = breaker(index, info.output, info)
            if inspect.isawaitable(verdict):
                verdict = await verdict
            stop, why, out = verdict
            if stop:
                return True, why, out
            if out is not None:
                final = out
        return False, "", final


def _in_process(handle: Handle) -> bool:
    """Whether the handle lends a model object in this process (an isolated worker's model
    and server runtimes are reached through the handle itself)."""
    return handle.endpoint is None and not getattr(handle, "isolated", False) and handle.obj is not None


def _wants_handle(fn: Callable[..., Any]) -> bool:
    try:
        params = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return False
    return bool(params) and params[0] == "handle"


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ModelMoraError) else f"{type(exc).__name__}: {text}"


__all__ = ["Chain", "ChainObserver", "ChainResult", "Chainbreaker", "Step", "StepCall", "StepInfo"]
