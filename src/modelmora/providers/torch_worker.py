"""The isolated worker process of the torch provider: one model, one process.

Workers are forked by a pre-imported fork server (see :mod:`.torch_pool`) and talk to the
parent over a :func:`multiprocessing.Pipe` (``multiprocessing.connection``: its framing,
its pickling; nothing hand-rolled).  Every message carries the request's id:

* parent → worker: ``(id, op, *args)`` with ``op`` one of ``"load"`` (name, target,
  device, options, env), ``"call"`` (method, args, kwargs), ``"probe"`` (text: one tiny
  inference, whatever the model is: :func:`~.torch_loaders.infer_once`; answers whether
  there was one), ``"sleep"``/``"wake"`` (device) or ``"close"``;
* worker → parent: ``(id, "ok", value)`` or ``(id, "error", type_name, message)``.

The worker answers requests one at a time, in order, and echoes each id; the parent (the
:class:`~.torch_pool.Worker`) uses the id to discard answers nobody waits for any more.
Unloading is ending the process, so every byte it held returns to the system.  The worker
ends when the parent's end of the pipe closes (the parent is gone).
"""

from __future__ import annotations

import os
import traceback
from multiprocessing.connection import Connection
from typing import Any


def serve(conn: Connection) -> None:
    """The worker's main loop (the target of the forked process)."""
    from .torch_loaders import cuda_allocated, footprint, infer_once, load_object, move

    obj: Any = None
    extras: dict[str, Any] = {}
    loaded = False
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent is gone: so are we
        rid, op, *args = message
        try:
            if op == "close":
                conn.send((rid, "ok", None))
                return
            if op == "load" and not loaded:
                name, target, device, options, env = args
                os.environ.update(env)  # the parent's environment now, not the fork server's
                obj, extras = load_object(name, target, device, options)
                loaded = True
                reply: Any = {"footprint": footprint(obj), "cuda": cuda_allocated(device)}
            elif op == "call" and loaded:
                method, call_args, kwargs = args
                fn = obj if method == "__call__" else getattr(obj, method)
                reply = fn(*call_args, **kwargs)
            elif op == "probe" and loaded:
                reply = infer_once(obj, extras, *args)
            elif op in ("sleep", "wake") and loaded:
                move(obj, args[0])
                reply = None
            else:
                conn.send((rid, "error", "ValueError", f"unexpected request {op!r}"))
                continue
            conn.send((rid, "ok", reply))
        except (BrokenPipeError, ConnectionResetError):
            return
        except BaseException as exc:
            detail = str(exc) if op == "load" else f"{exc} | {traceback.format_exc(limit=2)!r}"
            try:
                conn.send((rid, "error", type(exc).__name__, detail))
            except (BrokenPipeError, ConnectionResetError):
                return
            if op == "load":
                return  # a worker that could not load has nothing to serve
