"""A blocking facade for synchronous callers, over one anyio blocking portal.

    with SyncModelManager("configs/modelmora.yaml") as mm:
        with mm.use("qwen-14b") as model:
            ...

The async manager runs in the portal's event-loop thread for the facade's whole life;
each call crosses into it.  No ``asyncio.run`` per call, so it also works where an event
loop is already running in the caller's thread (Jupyter), as long as the caller does not
block that loop on purpose.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from types import TracebackType
from typing import Any, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from .core import ManagerStatus, ModelManager, Plan, UnloadAllResult
from .providers.base import Handle

T = TypeVar("T")


class SyncModelManager:
    """The same operations as :class:`ModelManager`, blocking."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.manager = ModelManager(*args, **kwargs)
        self._stack: contextlib.ExitStack | None = None
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> Self:
        stack = contextlib.ExitStack()
        try:
            self._portal = stack.enter_context(start_blocking_portal())
            stack.enter_context(self._portal.wrap_async_context_manager(self.manager))
        except BaseException:
            stack.close()
            raise
        self._stack = stack
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(exc_type, exc, tb)
        self._portal = None

    @property
    def portal(self) -> BlockingPortal:
        if self._portal is None:
            raise RuntimeError("use SyncModelManager inside a `with` block")
        return self._portal

    @contextlib.contextmanager
    def use(self, name: str | None = None, **kwargs: Any) -> Iterator[Handle]:
        with self.portal.wrap_async_context_manager(self.manager.use(name, **kwargs)) as handle:
            yield handle

    def load(self, name: str | None = None, **kwargs: Any) -> Handle:
        return self.portal.call(lambda: self.manager.load(name, **kwargs))

    def unload(self, name: str, *, force: bool = False) -> bool:
        return self.portal.call(lambda: self.manager.unload(name, force=force))

    def unload_all(self, *, force: bool = False) -> UnloadAllResult:
        return self.portal.call(lambda: self.manager.unload_all(force=force))

    def status(self) -> ManagerStatus:
        return self.portal.call(self.manager.status)

    def reconcile(self) -> None:
        self.portal.call(self.manager.reconcile)

    def loaded(self) -> list[str]:
        return self._in_loop(self.manager.loaded)

    def is_loaded(self, name: str) -> bool:
        return self._in_loop(lambda: self.manager.is_loaded(name))

    def plan(self, name: str) -> Plan:
        return self._in_loop(lambda: self.manager.plan(name))

    def can_fit(self, name: str) -> bool:
        return self._in_loop(lambda: self.manager.can_fit(name))

    @property
    def models(self) -> Mapping[str, Any]:
        return self.manager.models

    def _in_loop(self, fn: Callable[[], T]) -> T:
        """Run a synchronous read in the loop thread, so it never races the manager."""

        async def call() -> T:
            return fn()

        return self.portal.call(call)


__all__ = ["SyncModelManager"]
