"""``modelmora lease``: hold a model on a running ``modelmora serve`` over HTTP (issue 25).

A lease taken here protects its model as ``use()`` does — loaded if needed, never evicted
while held — until it expires (``--ttl``), is extended or is released; the server keeps it
across restarts.  Other programs tie requests to it with ``X-Modelmora-Lease: ID``.
"""

from __future__ import annotations

import datetime
import getpass
import math
import socket
from typing import Annotated, Any

import typer

from ..spec import format_duration
from .commands import JsonOpt, UrlOpt, _duration_opt, app, emit_json, fail, local_server, out, remote


def _holder() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "someone"
    return f"{user}@{socket.gethostname()}"


def _until(lease: dict[str, Any]) -> str:
    when = datetime.datetime.fromtimestamp(float(lease["expires_at"])).astimezone()
    return f"until {when:%Y-%m-%d %H:%M:%S %Z} ({format_duration(float(lease['left_s']))} left)"


@app.command()
def lease(
    name: Annotated[
        str | None, typer.Argument(metavar="NAME", help="Registry name of the model to hold.")
    ] = None,
    ttl: Annotated[
        str | None,
        typer.Option("--ttl", help="How long it lasts, e.g. 1h (default 1h; with --extend: from now)."),
    ] = None,
    reason: Annotated[str, typer.Option("--reason", help="Why, for whoever it blocks.")] = "",
    holder: Annotated[str | None, typer.Option("--holder", help="Who holds it (default: user@host).")] = None,
    release: Annotated[str | None, typer.Option("--release", metavar="ID", help="Release a lease.")] = None,
    extend: Annotated[
        str | None, typer.Option("--extend", metavar="ID", help="Extend a lease to --ttl from now.")
    ] = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Hold a model on a running server: `lease NAME --ttl 1h --reason …`; `--extend ID
    --ttl 2h`; `--release ID`.  Prints the lease's id and when it expires."""
    chosen = [flag for flag, given in (("NAME", name), ("--release", release), ("--extend", extend)) if given]
    if len(chosen) != 1:
        fail("give one of NAME (take a lease), --extend ID or --release ID")
    if release is not None and ttl is not None:
        fail("--release takes no --ttl")
    if extend is not None and ttl is None:
        fail("--extend needs --ttl (how long from now)")
    seconds = _duration_opt("--ttl", ttl)
    if seconds is not None and (seconds <= 0 or math.isinf(seconds)):
        fail(
            f"--ttl must be a positive duration; an HTTP lease always ends, so -1 (never) is refused (got {ttl})"
        )
    url = url or local_server()
    if url is None:
        fail("no modelmora server: start `modelmora serve` or pass --url (leases live on the server)")
    if release is not None:
        result = remote(url, lambda c: c.release_lease(release))
        said = f"released {result['id']} on {result['model']}"
    elif extend is not None:
        assert seconds is not None
        result = remote(url, lambda c: c.extend_lease(extend, ttl=seconds))
        said = f"extended {result['id']} on {result['model']} {_until(result)}"
    else:
        assert name is not None
        who = holder or _holder()
        result = remote(url, lambda c: c.take_lease(name, holder=who, reason=reason, ttl=seconds or 3600.0))
        said = f"{result['id']}: {result['model']} held by {result['holder']} {_until(result)}"
    if as_json:
        emit_json(result)
    else:
        out.print(said, highlight=False, soft_wrap=True)
