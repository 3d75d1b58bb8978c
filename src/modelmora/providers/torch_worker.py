"""The isolated worker process of the torch provider: one model, one process.

Started as ``python -m modelmora.providers.torch_worker`` (never by forking or
multiprocessing spawn, which would re-run the caller's ``__main__``).  Frames on its
stdin/stdout are a 4-byte big-endian length and a pickle.  The first request is
``("load", name, target, device, options)``; then ``("call", method, args, kwargs)``,
``("sleep", device)``, ``("wake", device)`` or ``("close",)``.  Replies are
``("ok", value)`` or ``("error", type_name, message)``.  The protocol owns the original
stdout; anything the model libraries print goes to stderr.  Unloading is ending the
process, so every byte it held returns to the system.
"""

from __future__ import annotations

import os
import pickle
import struct
import sys
import traceback
from typing import IO, Any

HEADER = struct.Struct(">I")


def write_frame(stream: IO[bytes], obj: Any) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(data)) + data)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Any:
    header = stream.read(HEADER.size)
    if len(header) < HEADER.size:
        raise EOFError
    (size,) = HEADER.unpack(header)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError
    return pickle.loads(data)


def main() -> None:
    protocol_out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # library prints must not corrupt the protocol
    protocol_in = sys.stdin.buffer
    import psutil

    from .torch_loaders import cuda_allocated, footprint, load_object, move

    def rss() -> int:
        return int(psutil.Process(os.getpid()).memory_info().rss)

    try:
        _, name, target, device, options = read_frame(protocol_in)
        obj, _extras = load_object(name, target, device, options)
    except BaseException as exc:
        write_frame(protocol_out, ("error", type(exc).__name__, str(exc)))
        return
    write_frame(
        protocol_out, ("ok", {"rss": rss(), "footprint": footprint(obj), "cuda": cuda_allocated(device)})
    )
    while True:
        try:
            message = read_frame(protocol_in)
        except EOFError:
            return  # the parent is gone: so are we
        op = message[0]
        try:
            if op == "close":
                write_frame(protocol_out, ("ok", None))
                return
            if op == "call":
                _, method, args, kwargs = message
                fn = obj if method == "__call__" else getattr(obj, method)
                write_frame(protocol_out, ("ok", fn(*args, **kwargs)))
            elif op in ("sleep", "wake"):
                move(obj, message[1])
                write_frame(protocol_out, ("ok", rss()))
            else:
                write_frame(protocol_out, ("error", "ValueError", f"unknown request {op!r}"))
        except BaseException as exc:
            write_frame(
                protocol_out, ("error", type(exc).__name__, f"{exc} | {traceback.format_exc(limit=2)!r}")
            )


if __name__ == "__main__":
    main()
