"""Isolated torch workers: a pre-imported fork server, and a request protocol that cannot
give one caller another caller's answer.

**The pool.**  Starting a fresh interpreter per model costs seconds of imports (torch,
transformers) before a single weight is read.  ``multiprocessing``'s ``forkserver`` start
method is the standard answer: one long-lived server process, started from a fresh
interpreter, imports the modules named by ``set_forkserver_preload`` once
(:mod:`.torch_preload`: torch, transformers, sentence-transformers, the loaders) and forks
a worker per request, so a new worker starts with them already in memory.  That is also
what makes it fork-safe: the server forks from a process that has started no thread and
never touched CUDA (the imports do neither; :mod:`.torch_preload` checks), never from the
manager's process, which runs an event loop, worker threads and possibly CUDA.  A
dedicated context (``multiprocessing.get_context("forkserver")``) is used, so the global
start method is left alone.  The server reaps its children (no zombie is left) and writes
each one's exit status to the parent's ``Process.sentinel``, which is how a death is
noticed at once (:meth:`Worker.wait_dead`).  It lives while a provider uses it
(:func:`acquire`/:func:`release`) and ends with the last one, so no process outlives the
managers that needed it.  Note that the preload list is process-wide (``multiprocessing``
keeps one fork server per process).

**The protocol** (:class:`Worker`).  Transport and framing are
``multiprocessing.connection``'s.  Every request carries an id and every reply echoes it.
Callers are *serialised*: one lock per worker, and at most one request inside the worker
at any time, so requests and replies cannot interleave and neither side can block the
other on a full pipe.  A caller cancelled (or timed out) after its request was sent
abandons it: the request is **allowed to finish and its answer is discarded**, by the next
caller, which reads replies and drops every one whose id is not its own before it sends.
Finishing rather than killing, because killing the worker throws away the loaded weights:
every other lease holder loses the model and the next call pays a full reload (seconds),
where letting the abandoned call finish costs only the rest of that one call.  A request
that never finishes is the exception: the callers after it wait (under their own
deadlines) until the model is unloaded, which ends the worker.  Reads and writes of a
message run to completion (shielded from cancellation), so a pipe is never left holding
half a message.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import logging
import multiprocessing
import multiprocessing.context
import os
import threading
from multiprocessing import forkserver, popen_forkserver, spawn, util
from multiprocessing.connection import Connection
from multiprocessing.context import reduction, set_spawning_popen  # type: ignore[attr-defined]
from typing import Any, TypeVar

import anyio
import psutil

from ..errors import HandleClosed, ModelMoraError, ProviderError
from . import torch_worker

log = logging.getLogger("modelmora.torch")
T = TypeVar("T")

PRELOAD = ["modelmora.providers.torch_preload"]  # never "__main__": see _Popen

_lock = threading.Lock()
_users = 0


def context() -> multiprocessing.context.ForkServerContext:
    """The dedicated forkserver context, with the torch modules preloaded."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # takes effect when the server (re)starts
    return ctx


def acquire() -> None:
    """A provider starts using the pool (the server starts with the first worker)."""
    global _users
    with _lock:
        _users += 1


def release() -> None:
    """A provider is done with the pool: the last one stops the fork server, so it does
    not outlive the managers that used it (it would also end with this process)."""
    global _users
    with _lock:
        _users = max(0, _users - 1)
        if _users:
            return
        stop = getattr(forkserver._forkserver, "_stop", None)  # stdlib's own test hook
        if stop is not None:
            with contextlib.suppress(OSError, ChildProcessError):
                stop()


class _Popen(popen_forkserver.Popen):
    """The stdlib's forkserver launch, minus one thing: the child does not re-run the
    parent's ``__main__``.  ``multiprocessing`` re-imports the main module in every child
    (as ``__mp_main__``) so that functions defined there can be targets; our target lives in
    :mod:`.torch_worker`, and re-running a user's script or server entry point in each
    model worker would be slow at best (an unguarded script would start the manager again,
    recursively, at worst).  The rest is ``popen_forkserver.Popen._launch`` as it is (the
    same in Python 3.11, 3.12 and 3.13)."""

    def _launch(self, process_obj: Any) -> None:
        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_path", None)
        prep_data.pop("init_main_from_name", None)
        buf = io.BytesIO()
        set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)  # type: ignore[attr-defined]
        parent_w = os.dup(w)  # the child's sentinel of its parent, as in the stdlib
        self.finalizer = util.Finalize(self, util.close_fds, (parent_w, self.sentinel))  # type: ignore[attr-defined]
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


class _Process(multiprocessing.context.ForkServerProcess):
    @staticmethod
    def _Popen(process_obj: Any) -> Any:
        return _Popen(process_obj)


class RemoteError(ProviderError):
    """The model raised inside its worker; ``remote_type`` names the exception."""

    def __init__(self, message: str, remote_type: str, **kwargs: Any):
        super().__init__(message, **kwargs)
        self.remote_type = remote_type


class Worker:
    """One forked worker process and the parent's end of its pipe (see the module doc)."""

    def __init__(
        self, name: str, provider: str, process: multiprocessing.process.BaseProcess, conn: Connection
    ):
        self.name = name
        self.provider = provider
        self.process = process
        self.conn = conn
        self.pid = int(process.pid or 0)
        self.closed = False
        self.exitcode: int | None = None
        self._lock = anyio.Lock()
        self._ids = itertools.count(1)
        self._outstanding: int | None = None  # a request sent whose reply has not been read
        self.discarded = 0  # replies read for requests their callers had abandoned
        self._busy = False  # a thread is sending or receiving on the pipe

    @classmethod
    async def start(cls, name: str, provider: str) -> Worker:
        ctx = context()
        parent, child = ctx.Pipe(duplex=True)
        process = _Process(
            target=torch_worker.serve, args=(child,), name=f"modelmora-worker-{name}", daemon=True
        )
        try:
            with anyio.CancelScope(shield=True):  # the first start waits for the preload
                await anyio.to_thread.run_sync(process.start)
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the worker has its copy: EOF on ours means it is gone
        return cls(name, provider, process, parent)

    # -- requests ---------------------------------------------------------------------

    async def request(self, op: str, *args: Any) -> Any:
        """Send one request and return its answer; raises :class:`RemoteError` when the
        model raised, :class:`ProviderError` when the worker died."""
        async with self._lock:
            if self._outstanding is not None:
                await self._receive(self._outstanding)  # an abandoned answer: read, dropped
                self.discarded += 1
            rid = next(self._ids)
            await self._send((rid, op, *args))
            reply = await self._receive(rid)
        if reply[1] == "ok":
            return reply[2]
        _, _, kind, message = reply
        raise RemoteError(f"{self.name}: {kind}: {message}", kind, model=self.name, provider=self.provider)

    async def _send(self, message: tuple[Any, ...]) -> None:
        if self.closed:
            raise self._gone()
        with anyio.CancelScope(shield=True):
            try:
                await self._io(self.conn.send, message)
            except OSError as exc:
                raise await self._died() from exc
            self._outstanding = message[0]

    async def _io(self, fn: Any, *args: Any) -> Any:
        """A blocking send or receive in a thread; the pipe is not closed under it (a
        :meth:`release` meanwhile leaves the closing to the end of the transfer)."""
        self._busy = True
        try:
            return await anyio.to_thread.run_sync(fn, *args)
        finally:
            self._busy = False
            if self.closed:
                self.conn.close()

    async def _receive(self, rid: int) -> tuple[Any, ...]:
        while True:
            if self.closed:
                raise self._gone()
            try:
                await anyio.wait_readable(self.conn.fileno())  # cancellable: consumes nothing
            except (anyio.ClosedResourceError, OSError, ValueError):
                raise self._gone() from None
            with anyio.CancelScope(shield=True):
                try:
                    message: tuple[Any, ...] = await self._io(self.conn.recv)
                except (EOFError, OSError) as exc:
                    raise await self._died() from exc
            if message[0] == self._outstanding:
                self._outstanding = None
            if message[0] == rid:
                return message
            self.discarded += 1
            log.debug("%s: discarded the answer to abandoned request %s", self.name, message[0])

    # -- life and death ---------------------------------------------------------------

    def alive(self) -> bool:
        if self.closed or self.process.exitcode is not None:
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    def death(self) -> str:
        code = self.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit code {code}"
        return f"the worker process of {self.name!r} (pid {self.pid}) died ({how})"

    def _gone(self) -> ModelMoraError:
        if self.exitcode is not None:
            return ProviderError(self.death(), model=self.name, provider=self.provider)
        return HandleClosed(f"{self.name!r} has been unloaded", model=self.name, provider=self.provider)

    async def _died(self) -> ProviderError:
        await self.wait_exit(1.0)  # EOF comes as it dies; its status a moment later
        return ProviderError(self.death(), model=self.name, provider=self.provider)

    async def wait_exit(self, timeout: float) -> int | None:
        """The exit code, waiting up to ``timeout`` seconds for it (None: still running)."""
        with anyio.move_on_after(timeout):
            while self.exitcode is None and not self.closed:
                code = self.process.exitcode
                if code is not None:
                    self.exitcode = code
                    break
                await anyio.sleep(0.01)
        return self.exitcode

    async def wait_dead(self) -> str:
        """Return the reason as soon as the worker exits (the fork server reaps it and writes
        its status to our sentinel).  Raises ``ClosedResourceError`` when it is closed here."""
        await anyio.wait_readable(self.process.sentinel)
        await self.wait_exit(1.0)
        return self.death()

    async def stop(self, grace: float) -> None:
        """Ask an idle worker to exit; else (or if it does not) SIGTERM, then SIGKILL after
        ``grace``; then close our ends.  No orphan survives."""
        with anyio.CancelScope(shield=True):
            if self.alive() and not self._lock.locked() and self._outstanding is None:
                # idle: let it exit on its own, so its exit handlers run (multiprocessing's
                # finalizers unregister what it made, e.g. tqdm's semaphore)
                with anyio.move_on_after(min(grace, 2.0)), contextlib.suppress(ModelMoraError):
                    await self.request("close")
            for signal_it in (self.process.terminate, self.process.kill):
                if await self.wait_exit(0) is not None:
                    break
                with contextlib.suppress(ProcessLookupError, OSError, ValueError):
                    signal_it()
                await self.wait_exit(grace)
            self.release()

    def release(self) -> None:
        """Close the parent's ends (pipe, sentinel); waiters get ``ClosedResourceError``."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(OSError, ValueError):
            anyio.notify_closing(self.conn.fileno())
        if not self._busy:  # else the transfer in flight closes it when it ends
            self.conn.close()
        if self.process.exitcode is not None:
            self.exitcode = self.process.exitcode
            with contextlib.suppress(OSError, ValueError):
                anyio.notify_closing(self.process.sentinel)
            with contextlib.suppress(ValueError):
                self.process.close()

    # -- memory -----------------------------------------------------------------------

    def measure(self, device: str, cuda_reported: int = 0) -> dict[str, int]:
        """The worker's memory as the parent sees it: its private resident bytes on the CPU
        (USS: what comes back when it ends; the pages of torch it shares with the fork
        server are the server's, not this model's; RSS where USS cannot be read) and NVML's
        per-process bytes on a GPU (what the worker reported allocating where NVML cannot
        see it, e.g. from inside a container's PID namespace)."""
        try:
            proc = psutil.Process(self.pid)
            try:
                cpu = int(proc.memory_full_info().uss)
            except (psutil.AccessDenied, AttributeError):
                cpu = int(proc.memory_info().rss)
        except psutil.NoSuchProcess:
            cpu = 0
        if not device.startswith("cuda"):
            return {"cpu": cpu}
        return {device: nvml_process_bytes(self.pid) or cuda_reported, "cpu": cpu}


def nvml_process_bytes(pid: int) -> int:
    """GPU bytes NVML attributes to ``pid`` over all devices (0 when NVML is unavailable)."""
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
    except Exception:
        return 0
    total = 0
    try:
        for index in range(pynvml.nvmlDeviceGetCount()):
            device = pynvml.nvmlDeviceGetHandleByIndex(index)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(device):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += int(proc.usedGpuMemory)
    except Exception:
        return total
    finally:
        with contextlib.suppress(Exception):
            pynvml.nvmlShutdown()
    return total


def environment() -> dict[str, str]:
    """The environment a worker adopts before loading (the fork server's is older)."""
    return dict(os.environ)


__all__ = ["PRELOAD", "RemoteError", "Worker", "acquire", "context", "nvml_process_bytes", "release"]
