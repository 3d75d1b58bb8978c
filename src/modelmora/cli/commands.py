"""`modelmora …`: the command line (typer + rich).

Direct mode builds a :class:`ModelManager` from the config and acts on the runtimes,
whose state lives in the runtime (Ollama, Docker, processes), so ``status`` shows what
they report.  Every error is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import hashlib
import json
import logging
import logging.config
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import anyio
import anyio.abc
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from .. import events as ev
from ..config import ManagerConfig
from ..core import ModelManager
from ..errors import ConfigError, ModelMoraError, ModelNotFound
from ..extras import require_extra
from ..footprint import Footprint
from ..memory import StaticProbe
from ..providers import Factory, ProviderRegistry, check_providers
from ..providers.base import Handle
from ..providers.simulated import SimulatedProvider
from ..spec import ModelSpec, format_duration, format_memory, format_size, parse_duration
from .cache import Cleared, clear_hf_cache, clear_ollama_model, hf_cached
from .loadbar import load_bar
from .registry import RegistryFile

T = TypeVar("T")


class _UntypedArgument(TyperArgument):
    def display_type_rich(self, ctx: Any) -> str | None:
        return None  # the metavar (NAME, MODELS) says it; "<list[str]>" says nothing more

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name if self.nargs == 1 else f"{name}..."


def _untyped_help_option(option: Any) -> Any:
    if option is not None and getattr(option, "metavar", "") is None:
        option.metavar = ""  # "--help <bool>" otherwise
    return option


class _PlainCommand(TyperCommand):
    def get_help_option(self, ctx: Any) -> Any:
        return _untyped_help_option(super().get_help_option(ctx))


class _PlainGroup(TyperGroup):
    def get_help_option(self, ctx: Any) -> Any:
        return _untyped_help_option(super().get_help_option(ctx))


def _value_name(param: Any) -> str:
    """click's name for an option's value (PATH, TEXT, INTEGER), across typer versions."""
    click_type = getattr(param, "type", None)
    if click_type is not None and getattr(click_type, "name", None):
        return str(click_type.name).upper()
    if getattr(getattr(param, "type_descriptor", None), "is_path", False):
        return "PATH"
    bare = str(param.bare_type()) if hasattr(param, "bare_type") else "str"
    bare = bare.removeprefix("list[").removesuffix("]")
    return {"str": "TEXT", "int": "INTEGER", "float": "NUMBER"}.get(bare, bare.upper())


def plain_help(command: Any) -> None:
    """Help without Python type placeholders: no ``<bool>`` after flags, click's ``PATH`` /
    ``TEXT`` / ``INTEGER`` for values, and arguments named by their metavar alone."""
    for param in getattr(command, "params", None) or []:
        if isinstance(param, TyperArgument):
            param.__class__ = _UntypedArgument
        elif isinstance(param, TyperOption) and param.metavar is None:
            param.metavar = "" if param.is_flag or param.count else _value_name(param)
    if type(command) is TyperCommand:
        command.__class__ = _PlainCommand
    elif type(command) is TyperGroup:
        command.__class__ = _PlainGroup
    for sub in (getattr(command, "commands", None) or {}).values():
        plain_help(sub)


class OneLineErrors(TyperGroup):
    """Usage errors (a bad flag, value or missing argument) as one line on stderr, like every
    other error, instead of click's usage box; help without type placeholders."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        plain_help(self)

    def get_help_option(self, ctx: Any) -> Any:
        return _untyped_help_option(super().get_help_option(ctx))

    def main(  # type: ignore[override]
        self,
        args: Any = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except Exception as exc:
            # click's exceptions, which recent typer releases vendor: matched by shape
            if type(exc).__name__ == "Abort":
                err.print("[bold red]error:[/] aborted", highlight=False)
                sys.exit(1)
            code = getattr(exc, "exit_code", None)
            if not (hasattr(exc, "format_message") and isinstance(code, int)):
                raise
            message = str(exc.format_message())
            if not message.strip():  # no arguments: the help was printed instead
                sys.exit(code)
            ctx = getattr(exc, "ctx", None)
            if ctx is not None:
                command = ctx.command_path
            else:  # raised while parsing, before a context: name the sub-command from argv
                words = list(sys.argv[1:] if args is None else args)[:1]
                command = " ".join([prog_name or "modelmora", *(w for w in words if not w.startswith("-"))])
            if getattr(exc, "exit_code", 1) == 2:  # usage errors: say where the usage is
                message = f"{message.rstrip('.')} (see '{command} --help')"
            err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
            sys.exit(code)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="modelmora",
    help="Keep the right models resident in GPU/CPU memory: load, unload, plan and inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def console(*, stderr: bool = False) -> Console:
    """A rich console; when the output is not a terminal (a log, a pipe) and $COLUMNS does not
    say how wide it is, wide enough that tables keep every name whole instead of cutting them
    at rich's 80-column default."""
    made = Console(stderr=stderr)
    if made.is_terminal or os.environ.get("COLUMNS"):
        return made
    return Console(stderr=stderr, width=2000)


out = console()
err = console(stderr=True)

DEFAULT_CONFIGS = ("modelmora.yaml", "configs/modelmora.yaml")

ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="Config YAML (default: $MODELMORA_CONFIG, ./modelmora.yaml, configs/modelmora.yaml).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
UrlOpt = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="MODELMORA_URL",
        help="Act through a running `modelmora serve` (needed for in-process torch models).",
    ),
]


LOCAL_SERVER = "http://127.0.0.1:8765"  # where `modelmora serve` listens by default


def local_server() -> str | None:
    """The URL of a ``modelmora serve`` answering on :data:`LOCAL_SERVER`, else None: a quick
    ``/health`` probe (200 ok or 503 degraded, both with the server's ``status``)."""
    import httpx

    try:
        response = httpx.get(f"{LOCAL_SERVER}/health", timeout=httpx.Timeout(1.0, connect=0.3))
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    if (
        response.status_code in (200, 503)
        and isinstance(body, dict)
        and body.get("status") in ("ok", "degraded")
    ):
        return LOCAL_SERVER
    return None


def remote(url: str, job: Callable[[Any], T]) -> T:
    """Run ``job`` against the server at ``url``, turning its errors into one line."""
    from .remote import RemoteManager

    try:
        with RemoteManager(url) as client:
            return job(client)
    except ModelMoraError as exc:
        fail(str(exc))


@contextlib.contextmanager
def progress(message: str) -> Iterator[Callable[[str], None]]:
    """Progress of a long command: a rich spinner on a terminal; in logs and CI (stderr not a
    terminal, where a spinner shows nothing) the message and then one line per step.  Yields
    ``say(step)``."""
    if err.is_terminal:
        with err.status(f"{message} …") as spinner:
            yield lambda step: spinner.update(f"{message}: {step}")
        return
    err.print(f"{message} …", highlight=False, soft_wrap=True)
    yield lambda step: err.print(f"  {message}: {step}", highlight=False, soft_wrap=True)


def one_line(text: str) -> str:
    """``text`` with every character that is not printable (a newline, ``\x1e``,
    ``\u2028``: what ends a line for a terminal or ``str.splitlines``) written as its escape,
    so an error quoting a user's input stays one line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(one_line(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def need(extra: str, needed_by: str) -> None:
    """One line with the install command when an optional extra is missing."""
    try:
        require_extra(extra, needed_by=needed_by)
    except ModelMoraError as exc:
        fail(str(exc))


def _version(value: bool) -> None:
    if value:
        from .. import __version__

        out.print(f"modelmora {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    pass


def config_file(path: Path | None) -> Path | None:
    """The config file a command reads: --config, $MODELMORA_CONFIG or a default location."""
    if path is None:
        env = os.environ.get("MODELMORA_CONFIG")
        path = Path(env) if env else next((Path(p) for p in DEFAULT_CONFIGS if Path(p).is_file()), None)
    return path


def load_config(path: Path | None) -> ManagerConfig:
    """The config every command reads, checked alike for all of them: the file (or the
    defaults) with the environment's overrides, and what starting its providers would
    refuse (an unknown provider type, bad provider settings)."""
    path = config_file(path)
    if path is None:
        cfg = ManagerConfig.from_dict({}, source="defaults", environ=os.environ)
    else:
        cfg = ManagerConfig.from_yaml(path, environ=os.environ)
    try:
        check_providers(cfg)
    except ConfigError as exc:
        raise ConfigError(f"{path if path is not None else 'defaults'}: {exc}") from None
    return cfg


def modelmora_home() -> Path:
    return Path(os.environ.get("MODELMORA_HOME") or Path.home() / ".cache" / "modelmora")


def with_simulated_state(cfg: ManagerConfig, source: Path | None) -> tuple[ManagerConfig, list[Path]]:
    """Give each simulated runtime of a config a state file (unless it names one), so commands
    run one after another see one runtime: `load` then `list-loaded` shows the model, as it
    would with Ollama.  One file per config file and provider instance."""
    key = hashlib.sha1(str(source.resolve() if source else "defaults").encode()).hexdigest()[:12]
    providers = {name: dict(settings) for name, settings in cfg.providers.items()}
    files = []
    for name in sorted(set(providers) | {spec.provider for spec in cfg.models.values()}):
        settings = providers.setdefault(name, {})
        if settings.get("type", name) != "simulated":
            continue
        if "state_file" not in settings:
            settings["state_file"] = str(modelmora_home() / "simulated" / f"{key}-{name}.json")
        files.append(Path(str(settings["state_file"])))
    if not files:
        return cfg, []
    return cfg.model_copy(update={"providers": providers}), files


def run(fn: Callable[[], Awaitable[T]], *, uvloop: bool = False) -> T:
    """Run an async job at the CLI edge, turning every modelmora error into one line;
    ``uvloop``: on uvloop's event loop (the server, where it is installed)."""
    try:
        return anyio.run(fn, backend_options={"use_uvloop": uvloop})
    except ModelMoraError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted", 130)


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def with_manager(
    config: Path | None, job: Callable[[ModelManager], Awaitable[T]], *, verbose: bool = False
) -> T:
    try:
        cfg, _ = with_simulated_state(load_config(config), config_file(config))
    except ModelMoraError as exc:
        fail(str(exc))
    if verbose:
        cfg = cfg.model_copy(update={"verbose": True})

    async def main() -> T:
        async with ModelManager(cfg) as mm:
            if verbose:
                mm.events.subscribe(lambda e: err.print(f"  {ev.describe(e)}", highlight=False))
            return await job(mm)

    return run(main)


# -- reading ---------------------------------------------------------------------------


def expiry(m: dict[str, Any], direct: bool) -> str:
    """A row's "expires in": the runtime's own expiry says who keeps it; in ``direct`` mode
    (a manager started for this one command) no reaper runs between commands, so the
    manager's idle countdown is said to hold only while a manager runs."""
    by, left = m.get("expires_by"), m["expires_in_s"]
    runtime = m.get("runtime_expires_in_s")
    if left is None:
        return "never"
    if m.get("leases", 0) - m.get("waiting", 0) > 0 and by != "runtime":
        return f"held; {format_duration(left)} idle after"  # a lease keeps it: no countdown runs
    if by == "runtime":
        return f"{format_duration(round(left))} by {m['provider']}"
    if direct and by == "manager":
        kept = f"{format_duration(round(runtime))} by {m['provider']}; " if runtime is not None else ""
        return f"{kept}{format_duration(left)} idle, only while a manager runs"
    return format_duration(left)


def render_status(status: dict[str, Any], *, direct: bool = False) -> None:
    """Render ``ManagerStatus.to_dict()`` (local) or a server's ``/status`` (remote) alike;
    ``direct``: from a manager started for this command (see :func:`expiry`)."""
    mem = Table(title="Memory", title_justify="left")
    for col in ("device", "modelmora", "budget", "peak", "observed (total / used / free)"):
        mem.add_column(col)
    for device, d in status["devices"].items():
        used, budget, seen = d["used_by_modelmora"], d["budget"], d["observed"]
        bar = ""
        if budget:
            filled = min(20, round(20 * used / budget))
            bar = f" [{'█' * filled}{'·' * (20 - filled)}]"
        observed = (
            f"{format_size(seen['total'])} / {format_size(seen['used'])} / {format_size(seen['free'])} ({seen['source']})"
            if seen
            else "not observed"
        )
        mem.add_row(
            device,
            format_size(used) + bar,
            format_size(budget) if budget is not None else "unlimited",
            format_size(d["peak_by_modelmora"]),
            observed,
        )
    out.print(mem)
    if not status["gpu_observed"]:
        out.print(
            "[dim]GPU memory is not observed on this machine (no NVML): budgets come from the config.[/]"
        )
    models = Table(title="Resident models", title_justify="left")
    for col in ("model", "provider", "state", "device", "leases", "memory", "idle", "expires in", "flags"):
        models.add_column(col)
    for m in status["models"]:
        flags = ", ".join(f for f, on in (("pinned", m["pinned"]), ("adopted", not m["owned"])) if on)
        models.add_row(
            m["name"],
            m["provider"],
            m["state"],
            " + ".join(m.get("devices") or []) or "-",
            str(m["leases"]),
            format_memory(m["memory"]),
            format_duration(m["idle_s"]),
            expiry(m, direct),
            flags,
        )
    problems: dict[str, str] = status.get("problems") or {}
    if status["models"]:
        out.print(models)
        for m in status["models"]:  # why each placed model is where it is (device: auto, Ollama)
            if m.get("placement"):
                out.print(f"  [dim]{escape(m['name'])}: {escape(m['placement'])}[/]", soft_wrap=True)
    elif problems:
        out.print("No models known: a runtime could not be asked (see the problems below).")
    else:
        out.print("No models resident.")
    if problems:
        out.print(f"[bold red]Problems[/] ({len(problems)}): what is shown may be incomplete or stale")
        for component, error in problems.items():
            out.print(f"  [red]{escape(component)}[/]: {escape(str(error))}", soft_wrap=True)
    for name, f in status["failures"].items():
        out.print(
            f"[yellow]{escape(name)}[/]: {f['failures']} failed load(s), retry in {format_duration(f['retry_in_s'])}: {escape(str(f['error']))}"
        )


def render_hardware(hardware: dict[str, Any]) -> None:
    """Render ``Hardware.to_dict()`` (local) or a server's ``/hardware`` (remote) alike."""
    table = Table(title="Hardware", title_justify="left")
    for col in ("device", "name", "total", "others", "modelmora", "reserve", "budget", "available", "source"):
        table.add_column(col)

    def size(n: int | None) -> str:
        return "-" if n is None else format_size(n)

    for d in hardware["devices"]:
        if not d["allowed"]:
            budget = "not used (devices)"
        elif d["budget"] is None:
            budget = "unlimited"
        else:
            budget = f"{format_size(d['budget'])} ({d['budget_source']})"
        processes = len(d["processes"])
        others = size(d["used_by_others"] if d["total"] is not None else None)
        if processes:
            others += f" ({processes} process{'es' if processes != 1 else ''})"
        table.add_row(
            d["device"],
            escape(d["name"]) or "-",
            size(d["total"]),
            others,
            format_size(d["used_by_modelmora"]),
            format_size(d["reserve"]),
            budget,
            size(d["available"]),
            d["source"] or "not observed",
        )
    out.print(table)
    if hardware["restricted_to"] is not None:
        gpus = ", ".join(hardware["restricted_to"]) or "none"
        out.print(f"modelmora may use: {gpus} (and cpu)")
    if not hardware["gpu_observed"]:
        out.print(
            "[dim]GPU memory is not observed on this machine (no NVML): budgets come from the config.[/]"
        )


@app.command()
def status(
    config: ConfigOpt = None,
    url: UrlOpt = None,
    as_json: JsonOpt = False,
    hardware: Annotated[
        bool,
        typer.Option(
            "--hardware",
            help="The devices instead: totals, what other processes hold, reserves, budgets.",
        ),
    ] = False,
) -> None:
    """Memory per device, resident models, leases, idle time and expiry.  Without --url or
    --config, a `modelmora serve` running on this machine's default port answers (and the
    output says so); otherwise a manager started for this command does."""

    async def job(mm: ModelManager) -> dict[str, Any]:
        return (await mm.hardware() if hardware else await mm.status()).to_dict()

    via = None if url or config is not None else local_server()
    if via:
        url = via
        (err if as_json else out).print(f"(via {via})", highlight=False)
    if url:
        result = remote(url, lambda c: c.hardware() if hardware else c.status())
    else:
        result = with_manager(config, job)
    if as_json:
        emit_json(result)
    elif hardware:
        render_hardware(result)
    else:
        render_status(result, direct=not url)


@app.command("list-loaded")
def list_loaded(config: ConfigOpt = None, url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Names of resident models, one per line."""

    async def job(mm: ModelManager) -> list[str]:
        return mm.loaded()

    names = remote(url, lambda c: c.loaded()) if url else with_manager(config, job)
    if as_json:
        emit_json(names)
    else:
        for name in names:
            out.print(name, highlight=False)


models_app = typer.Typer(
    help="The model registry (the config file): list, show, add, remove, set-default.", no_args_is_help=False
)
app.add_typer(models_app, name="models")


def config_path(path: Path | None) -> Path:
    """The config file that registry edits write to."""
    if path is not None:
        return path
    env = os.environ.get("MODELMORA_CONFIG")
    if env:
        return Path(env)
    found = next((Path(p) for p in DEFAULT_CONFIGS if Path(p).is_file()), None)
    if found is None:
        fail("no config file found; pass --config PATH (it is created if missing)")
    return found


@models_app.callback(invoke_without_command=True)
def models_default(ctx: typer.Context, config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """The model registry; without a sub-command, lists it."""
    if ctx.invoked_subcommand is None:
        models_list(config, as_json)


@models_app.command("list")
def models_list(config: ConfigOpt = None, as_json: JsonOpt = False) -> None:
    """List registered models."""
    try:
        cfg = load_config(config)
    except ModelMoraError as exc:
        fail(str(exc))
    if as_json:
        emit_json({n: s.model_dump(mode="json") for n, s in cfg.models.items()})
        return
    table = Table(title="Registered models", title_justify="left")
    for col in ("model", "provider", "target", "memory", "group", "keep alive", ""):
        table.add_column(col)
    for name, s in cfg.models.items():
        table.add_row(
            name,
            s.provider,
            s.target,
            format_memory(s.memory),
            s.group or "-",
            format_duration(s.keep_alive if s.keep_alive is not None else cfg.idle_ttl),
            " ".join(f for f, on in (("default", name == cfg.default_model), ("pinned", s.pinned)) if on),
        )
    out.print(table)


@models_app.command("show")
def models_show(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name.")],
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Everything the registry says about one model."""
    try:
        cfg = load_config(config)
        spec = cfg.spec(name)
    except ModelMoraError as exc:
        fail(str(exc))
    data = spec.model_dump(mode="json")
    data["default"] = name == cfg.default_model
    if as_json:
        emit_json(data)
        return
    table = Table(show_header=False, title=name, title_justify="left")
    for key, value in data.items():
        table.add_row(key, _shown(spec, cfg, key, value))
    out.print(table)


def _shown(spec: ModelSpec, cfg: ManagerConfig, key: str, value: Any) -> str:
    """One registry field as people write it: sizes in GB, durations as '5m', 'never'."""
    if key == "memory":
        return format_memory(spec.memory, empty="none")
    if key == "keep_alive":
        if spec.keep_alive is None:
            return f"{format_duration(cfg.idle_ttl)} (idle_ttl)"
        return format_duration(spec.keep_alive)
    if key in ("load_timeout", "load_time"):
        seconds = getattr(spec, key)
        return "-" if seconds is None else format_duration(seconds)
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "-"
    if isinstance(value, dict | list):
        return json.dumps(value) if value else "-"
    return str(value)


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name, e.g. qwen-14b.")],
    provider: Annotated[str, typer.Option("--provider", "-p", help="Provider instance, e.g. ollama.")],
    target: Annotated[
        str | None, typer.Option("--target", "-t", help="What the runtime calls it (default: NAME).")
    ] = None,
    memory: Annotated[str | None, typer.Option("--memory", "-m", help="Estimate, e.g. 11.5GB.")] = None,
    device: Annotated[
        str | None, typer.Option("--device", help="Device the estimate applies to (default cuda:0).")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", "-g", help="Exclusive group, e.g. heavy.")] = None,
    keep_alive: Annotated[str | None, typer.Option("--keep-alive", help="Idle time before unload.")] = None,
    pinned: Annotated[bool, typer.Option("--pinned", help="Never evict or reap it.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite an existing entry.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Register a model (validated, then written atomically; comments are kept)."""
    path = config_path(config)
    fields: dict[str, Any] = {
        "provider": provider, "target": target, "memory": memory, "device": device,
        "group": group, "keep_alive": keep_alive, "pinned": True if pinned else None,
    }  # fmt: skip
    try:
        with RegistryFile.edit(path, environ=os.environ) as reg:
            reg.add(name, fields, replace=replace)
            cfg = reg.save()
    except ModelMoraError as exc:
        fail(str(exc))
    spec = cfg.models[name]
    out.print(f"added {name} ({spec.provider}: {spec.target}) to {path}")


@models_app.command("remove")
def models_remove(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name.")],
    new_default: Annotated[
        str | None, typer.Option("--new-default", help="Required when removing the default model.")
    ] = None,
    clear_cache: Annotated[
        bool, typer.Option("--clear-cache", help="Also delete its files from the runtime's cache.")
    ] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting files.")] = False,
    config: ConfigOpt = None,
) -> None:
    """Remove a model from the registry (refuses to remove the default without a new one)."""
    path = config_path(config)
    try:
        if clear_cache:  # asks first, so outside the edit lock
            before = RegistryFile(path).validate()
            if name in before.models:
                _clear_cache(before, name, yes)
        with RegistryFile.edit(path, environ=os.environ) as reg:
            reg.remove(name, new_default=new_default)
            reg.save()
    except ModelMoraError as exc:
        fail(str(exc))
    out.print(f"removed {name} from {path}" + (f"; default is now {new_default}" if new_default else ""))


@models_app.command("set-default")
def models_set_default(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name.")], config: ConfigOpt = None
) -> None:
    """Make NAME the model `use()` takes when none is named."""
    path = config_path(config)
    try:
        with RegistryFile.edit(path, environ=os.environ) as reg:
            reg.set_default(name)
            reg.save()
    except ModelMoraError as exc:
        fail(str(exc))
    out.print(f"default model is now {name}")


@app.command("clear-cache")
def clear_cache(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask before deleting files.")] = False,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete a model's downloaded files: the Hugging Face cache, or Ollama's store."""
    try:
        cfg = load_config(config)
        cfg.spec(name)
        result = _clear_cache(cfg, name, yes)
    except ModelMoraError as exc:
        fail(str(exc))
    if as_json:
        emit_json(
            {
                "model": name,
                "target": result.target,
                "where": result.where,
                "freed_bytes": result.freed_bytes,
                "revisions": result.revisions,
            }
        )
        return
    freed = "" if result.freed_bytes is None else f", freed {format_size(result.freed_bytes)}"
    out.print(f"cleared {result.target} from {result.where}{freed}")


def _clear_cache(cfg: ManagerConfig, name: str, yes: bool) -> Cleared:
    spec = cfg.spec(name)
    settings = cfg.providers.get(spec.provider, {})
    kind = str(settings.get("type", spec.provider))
    if kind == "ollama":
        base_url = str(settings.get("base_url", os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434")))
        if not base_url.startswith("http"):
            base_url = f"http://{base_url}"
        if not yes and not typer.confirm(
            f"Delete {spec.target} from the Ollama server at {base_url}?", err=True
        ):
            fail("nothing deleted")
        return clear_ollama_model(base_url, spec.target)
    repo = str(spec.options.get("hf_repo", spec.target))
    if kind not in ("torch", "vllm") and "hf_repo" not in spec.options:
        fail(
            f"{name}: provider {spec.provider!r} ({kind}) keeps no cache modelmora can clear; set options.hf_repo for a Hugging Face model"
        )
    cache_dir = spec.options.get("cache_dir")
    size, revisions = hf_cached(repo, cache_dir)
    if not revisions:
        raise ModelNotFound(f"{repo!r} is not in the Hugging Face cache", model=name)
    if not yes and not typer.confirm(
        f"Delete {repo} ({len(revisions)} revision(s), {format_size(size)}) from the Hugging Face cache?",
        err=True,
    ):
        fail("nothing deleted")
    return clear_hf_cache(repo, cache_dir)


# -- acting ----------------------------------------------------------------------------


@app.command()
def load(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name of the model.")],
    config: ConfigOpt = None,
    pin: Annotated[bool, typer.Option("--pin", help="Keep it until unpinned or force-unloaded.")] = False,
    keep_alive: Annotated[
        str | None, typer.Option("--keep-alive", help="Idle time before unload, e.g. 10m; -1 = never.")
    ] = None,
    retry: Annotated[
        bool, typer.Option("--retry", help="Ignore the cool-down after a recent failure.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print lifecycle events.")] = False,
    url: UrlOpt = None,
) -> None:
    """Load a model (evicting idle ones if needed)."""
    ttl = _duration_opt("--keep-alive", keep_alive)
    if url:
        result = _load_remote(url, name, pin=pin, keep_alive=ttl)
        mem = format_memory(result["memory"], "no memory reported")
        out.print(f"loaded {name} ({mem})")
        return

    async def job(mm: ModelManager) -> None:
        spec = mm.spec(name)  # an unknown model is refused before "loading …" is said
        took: list[float] = []
        evicted: list[str] = []

        started: list[float] = []

        def on_event(e: ev.Event) -> None:
            if isinstance(e, ev.Loading) and e.model == name:
                started.append(time.monotonic())
            elif isinstance(e, ev.Loaded) and e.model == name:
                took.append(e.duration_s)
            elif isinstance(e, ev.Evicted):
                evicted.append(e.model)

        mm.events.subscribe(on_event)
        got: list[Handle] = []
        failed: list[BaseException] = []
        done = anyio.Event()

        async def run_load() -> None:
            try:
                got.append(await mm.load(name, pin=pin, keep_alive=ttl, retry=retry))
            except Exception as exc:  # raised below, once the bar is gone
                failed.append(exc)
            finally:
                done.set()

        with load_bar(err, f"loading {name}", _finite(mm.footprint(name)[1])) as update:
            async with anyio.create_task_group() as tg:
                tg.start_soon(run_load)
                while not done.is_set():
                    with anyio.move_on_after(0.1):
                        await done.wait()
                    if started:
                        update(time.monotonic() - started[0])
        if failed:
            raise failed[0]
        handle = got[0]
        when = f" in {format_duration(took[-1])}" if took else " (already loaded)"
        gone = f"; evicted {', '.join(evicted)}" if evicted else ""
        out.print(
            f"loaded {handle.name} ({format_memory(handle.memory, 'no memory reported')}){when}{gone}",
            highlight=False,
        )
        alive = (
            ttl if ttl is not None else spec.keep_alive if spec.keep_alive is not None else mm.config.idle_ttl
        )
        if alive == 0 and not pin:
            source = "--keep-alive 0" if ttl is not None else "keep_alive: 0"
            err.print(
                f"[yellow]warning:[/] {name} has {source}: it is unloaded as soon as it is idle, so at "
                "once after `load`; pass --keep-alive 10m or --pin to keep it resident",
                highlight=False,
            )
        provider = mm.provider(handle.provider)
        if isinstance(provider, SimulatedProvider) and provider.state_file is not None:
            err.print(
                f"[dim]{handle.provider} is the simulated runtime: nothing was really loaded; it keeps "
                f"what is resident in {provider.state_file} for the next commands[/]",
                highlight=False,
            )

    with _quiet_load_failures(enabled=not verbose):  # the error line says why, once
        with_manager(config, job, verbose=verbose)


def _finite(seconds: float | None) -> float | None:
    return seconds if seconds is not None and math.isfinite(seconds) and seconds > 0 else None


def _load_remote(url: str, name: str, *, pin: bool, keep_alive: float | None) -> dict[str, Any]:
    """``POST /models/{name}/load`` on the server, with a progress bar fed by polling ``GET
    /models/{name}`` (the load under way: seconds elapsed and expected) from this thread
    while the load request runs in another."""
    from .remote import RemoteManager

    answer: list[dict[str, Any]] = []
    failed: list[BaseException] = []

    def call() -> None:
        try:
            with RemoteManager(url) as client:
                answer.append(client.load(name, pin=pin, keep_alive=keep_alive))
        except Exception as exc:  # raised in this thread below
            failed.append(exc)

    worker = threading.Thread(target=call, name="modelmora-load", daemon=True)
    try:
        with RemoteManager(url, timeout=5.0) as poll:
            queue = poll.model(name).get("queue", {})
            worker.start()
            with load_bar(err, f"loading {name} on {url}", _finite(queue.get("expected_s"))) as update:
                while worker.is_alive():
                    worker.join(0.25)
                    with contextlib.suppress(ModelMoraError):
                        queue = poll.model(name).get("queue", {})
                        if queue.get("loading") and queue.get("elapsed_s") is not None:
                            update(float(queue["elapsed_s"]))
        if failed:
            raise failed[0]
    except ModelMoraError as exc:
        fail(str(exc))
    return answer[0]


@app.command()
def unload(
    name: Annotated[str, typer.Argument(metavar="NAME", help="Registry name of the model.")],
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Unload even while leased.")] = False,
    url: UrlOpt = None,
) -> None:
    """Unload a model."""

    async def job(mm: ModelManager) -> bool:
        return await mm.unload(name, force=force)

    done = remote(url, lambda c: c.unload(name, force=force)) if url else with_manager(config, job)
    out.print(f"unloaded {name}" if done else f"{name} was not loaded")


@app.command("unload-all")
def unload_all(
    config: ConfigOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Also unload leased and pinned models.")] = False,
    url: UrlOpt = None,
) -> None:
    """Unload every resident model (leased and pinned ones stay unless --force)."""

    async def job(mm: ModelManager) -> dict[str, list[str]]:
        return dataclasses.asdict(await mm.unload_all(force=force))

    result = remote(url, lambda c: c.unload_all(force=force)) if url else with_manager(config, job)
    out.print(f"unloaded: {', '.join(result['unloaded']) or 'nothing'}")
    if result["in_use"] or result["pinned"]:
        out.print(
            f"kept (in use: {', '.join(result['in_use']) or '-'}; pinned: {', '.join(result['pinned']) or '-'}); use --force"
        )


# Ollama's words, for those who type them by habit: `ollama ps` shows what is loaded (with
# memory and when it expires: our `status`), `ollama list` what is registered locally (our
# `models list`), `ollama stop NAME` unloads one (our `unload`).
app.command("ps", help="Same as `status` (as in `ollama ps`).")(status)
app.command("list", help="Same as `models list` (as in `ollama list`).")(models_list)
app.command("stop", help="Same as `unload` (as in `ollama stop`).")(unload)


# -- planning --------------------------------------------------------------------------


def simulate_config(cfg: ManagerConfig) -> tuple[ManagerConfig, SimulatedProvider]:
    """The same registry and policy with every model on one simulated runtime."""
    models = {n: s.model_copy(update={"provider": "simulated"}) for n, s in cfg.models.items()}
    sim_cfg = cfg.model_copy(update={"models": models, "providers": {}})
    return sim_cfg, SimulatedProvider("simulated")


def _dry_run(cfg: ManagerConfig, sequence: list[str], budgets: dict[str, int]) -> list[dict[str, Any]]:
    """Each use of ``sequence`` decided by the admission planner, as the manager decides it
    (LRU among idle models, exclusive groups, the model cap, warm tiers), without loading:
    the steps, then a summary ``{"peak", "budgets", "loads"}``."""
    from ..core.planner import (
        Admit,
        Candidate,
        Resident,
        on_devices,
        placement_options,
        plan_admission,
        share_of,
    )

    residents: dict[str, Resident] = {}  # in order of last use
    peak: dict[str, int] = {}
    steps: list[dict[str, Any]] = []
    loads = 0
    for i, name in enumerate(sequence, 1):
        spec = cfg.spec(name)
        memory = dict(spec.memory)
        current = residents.pop(name, None)
        action, evicted, placed = "reuse", [], ""
        if current is None or current.sleeping:
            key = f"simulated/{spec.target}"
            # device: auto / devices: the planner chooses, as admission lets it
            options = placement_options(spec, budgets) if current is None else ()
            device = options[0] if options else spec.device
            decision = plan_admission(
                residents.values(),
                Candidate(
                    name,
                    memory,
                    spec.group,
                    key=key,
                    unknown=() if memory else (device,),
                    options=options,
                    gpus=spec.gpus if options else 1,
                ),
                budgets,
                max_loaded=cfg.max_loaded_models,
            )
            if not isinstance(decision, Admit):
                fail(f"step {i}: {name}: {decision.reason}")
            if decision.device is not None:
                chosen = decision.devices or (decision.device,)
                memory = on_devices(share_of(memory, options, spec.gpus), chosen)
                placed = f"{' + '.join(chosen)}: {decision.placement}"
            for gone in decision.sleep:
                residents[gone] = residents[gone].parked()
            for gone in decision.evict:
                residents.pop(gone, None)
            evicted = list(decision.evict)
            action = "load" if current is None else "wake"
            loads += current is None
            warm = Footprint(memory).parked().as_dict() if spec.warm_tier else None
            current = Resident(name, memory, pinned=spec.pinned, group=spec.group, key=key, sleep_memory=warm)
        residents[name] = dataclasses.replace(current, last_used=float(i))
        used: dict[str, int] = {}
        for r in residents.values():
            for device, n in r.memory.items():
                used[device] = used.get(device, 0) + n
        for device, n in used.items():
            peak[device] = max(peak.get(device, 0), n)
        steps.append(
            {
                "step": i,
                "model": name,
                "action": action,
                "modelled_load_s": (spec.load_time or 0.0) if action == "load" else 0.0,
                "evicted": evicted,
                "placed": placed,
                "resident": list(residents),
                "memory": used,
            }
        )
    steps.append({"peak": peak, "budgets": budgets, "loads": loads})
    return steps


@app.command()
def plan(
    sequence: Annotated[
        list[str] | None, typer.Argument(metavar="MODELS", help="Models in the order they will be used.")
    ] = None,
    chain_file: Annotated[
        Path | None, typer.Option("--chain", help="Plan a chain YAML instead: its residency plan.")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Dry-run model uses on a simulated runtime: loads, evictions, peak memory.

    Example: modelmora plan qwen-14b sdxl-base gpt-sovits qwen-14b -c configs/modelmora.yaml
    """
    if chain_file is not None:
        _plan_chain(chain_file, config, as_json)
        return
    if not sequence:
        fail("name the models in the order they will be used, or give --chain chain.yaml")
    try:
        cfg = load_config(config)
        unknown = [m for m in sequence if m not in cfg.models]
        if unknown:
            cfg.spec(unknown[0])
    except ModelMoraError as exc:
        fail(str(exc))
    sim_cfg, sim = simulate_config(cfg)

    async def budgets() -> dict[str, int]:
        # the manager reads the budgets as `load` would; nothing is loaded: a plan decides
        # each step with the admission planner alone (no runtime, no load, no sleeping)
        async with ModelManager(sim_cfg, providers={"simulated": sim}, probe=StaticProbe({})) as mm:
            return mm.budgets

    steps = _dry_run(cfg, sequence, run(budgets))
    summary = steps.pop()
    if as_json:
        emit_json({"steps": steps, **summary})
        return
    table = Table(title="Plan (simulated)", title_justify="left")
    for col in ("#", "model", "action", "evicted", "resident after", "memory in use"):
        table.add_column(col)
    for s in steps:
        table.add_row(
            str(s["step"]),
            s["model"],
            s["action"] + (f" (~{format_duration(s['modelled_load_s'])})" if s["modelled_load_s"] else ""),
            ", ".join(s["evicted"]) or "-",
            ", ".join(s["resident"]),
            format_memory(s["memory"]),
        )
    out.print(table)
    for s in steps:
        if s["placed"]:
            out.print(f"{s['step']}. {s['model']} placed on {s['placed']}")
    total_load = sum(s["modelled_load_s"] for s in steps)
    peaks = ", ".join(
        f"{d} {format_size(p)}"
        + (f" of {format_size(summary['budgets'][d])}" if d in summary["budgets"] else "")
        for d, p in summary["peak"].items()
    )
    out.print(
        f"{summary['loads']} loads, modelled load time {format_duration(total_load)}, peak {peaks or '-'}"
    )


@app.command()
def bench(
    models_: Annotated[
        list[str] | None, typer.Argument(metavar="MODELS", help="Registry names to measure.")
    ] = None,
    quick: Annotated[
        bool, typer.Option("--quick", help="The built-in set: real all-MiniLM-L6-v2 and tiny local models.")
    ] = False,
    cycles: Annotated[
        int, typer.Option("--cycles", min=1, help="Load/unload cycles for leak detection.")
    ] = 5,
    strategies: Annotated[
        str, typer.Option("--strategies", help="Unload strategies to compare: gc,subprocess,offload.")
    ] = "gc,subprocess,offload",
    plot_path: Annotated[Path | None, typer.Option("--plot", help="Write a PNG with the figures.")] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The lifecycle benchmark: load times, footprint, first inference, reclamation, leaks."""
    from . import bench as bench_mod
    from .bench_report import plot, render

    if plot_path is not None:
        need("bench", "modelmora bench --plot")
    chosen = [s.strip() for s in strategies.split(",") if s.strip()]
    bad = [s for s in chosen if s not in ("gc", "subprocess", "offload")]
    if bad:
        raise typer.BadParameter(
            f"unknown strategy {bad[0]!r} (use gc, subprocess, offload)", param_hint="--strategies"
        )
    try:
        if quick:
            from .quick import quick_config, require_torch

            require_torch()  # a missing extra is the one line, with no progress line before it
            with progress("preparing the built-in models (the first run makes the small ones)"):
                cfg_dict, names = quick_config()
        else:
            cfg = load_config(config)
            names = list(models_ or [])
            if not names:
                fail("name the models to measure, or pass --quick for the built-in set")
            for name in names:
                cfg.spec(name)
            cfg_dict = cfg.model_dump(mode="json")
    except ModelMoraError as exc:
        fail(str(exc))
    with progress(f"benchmarking {', '.join(names)}") as say:
        report = bench_mod.run_benchmark(
            cfg_dict, names, cycles=cycles, strategies=chosen, progress=say
        ).to_dict()
    if plot_path is not None:
        plot(report, plot_path)
    if as_json:
        emit_json(report)
    else:
        render(report, out)
        if plot_path is not None:
            out.print(f"figure written to {plot_path}")
    failed = [
        f"{row.get('model')}" + (f" ({row['strategy']})" if row.get("strategy") else "")
        for part in ("lifecycles", "strategies", "cycles")
        for row in report[part]
        if row.get("error")
    ]
    if failed:
        fail(f"{len(failed)} benchmark row(s) failed: {', '.join(failed)}")


# -- chains and the demo ---------------------------------------------------------------


def _chain_config(chain_file: Path, config: Path | None) -> ManagerConfig | Path | None:
    """--config wins; else the chain file's own ``config:``; else the usual default lookup."""
    from ..chain.files import read_chain_file

    if config is not None:
        return load_config(config)
    if read_chain_file(chain_file).config:
        return None
    return load_config(None)


class _DryRunRegistry(ProviderRegistry):
    """Every provider type builds a simulated runtime: a plan asks no real one (no Ollama, no
    Docker), so it is quick and works offline.  Sizes come from the registry alone."""

    def get(self, name: str) -> Factory:
        return lambda instance, settings: SimulatedProvider(instance)


def _plan_chain(chain_file: Path, config: Path | None, as_json: bool) -> None:
    from ..chain import load_chain
    from ..chain.report import plan_to_dict, render_plan

    try:
        chain, _ = load_chain(
            chain_file,
            config=_chain_config(chain_file, config),
            manager_options={"registry": _DryRunRegistry()},
        )
    except ModelMoraError as exc:
        fail(str(exc))
    residency = run(chain.plan)
    if as_json:
        emit_json(plan_to_dict(residency))
    else:
        render_plan(out, residency)


@contextlib.contextmanager
def _quiet_load_failures(*, enabled: bool) -> Iterator[None]:
    """Keep the manager's "failed to load" log warning off stderr while an observer prints
    the same failure in its place."""

    def keep(record: logging.LogRecord) -> bool:
        return not isinstance(getattr(record, "modelmora_event", None), ev.LoadFailed)

    logger = logging.getLogger("modelmora")
    if enabled:
        logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


@app.command("run")
def run_chain(
    chain_file: Annotated[
        Path, typer.Argument(metavar="CHAIN.yaml", help="Chain file (see examples/chains).")
    ],
    input_: Annotated[str | None, typer.Option("--input", "-i", help="The chain's input text.")] = None,
    config: ConfigOpt = None,
    no_prefetch: Annotated[
        bool, typer.Option("--no-prefetch", help="Load each model only when its step starts.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a chain: each step's model is loaded when needed and unloaded once the plan lets it go.

    Example: modelmora run examples/chains/analysis.yaml --input "the quarterly numbers"
    """
    from ..chain import load_chain
    from ..chain.report import ConsoleObserver, render_plan, render_result, result_to_dict

    try:
        chain, spec = load_chain(chain_file, config=_chain_config(chain_file, config))
    except ModelMoraError as exc:
        fail(str(exc))
    if no_prefetch:
        chain.management = chain.management.model_copy(update={"prefetch": False})
    text = input_ if input_ is not None else spec.input
    if text is None:
        fail(f"{chain_file}: give the chain an input with --input (the file has no 'input:')")
    if any(step.call is None for step in chain.steps):  # LLM steps call the runtime through litellm
        need("chain", f"modelmora run {chain_file}")

    observer: ConsoleObserver | None = None

    async def main() -> Any:
        nonlocal observer
        async with chain:
            residency = await chain.plan()
            if not as_json:
                render_plan(out, residency)
                observer = ConsoleObserver(out, chain.manager, len(chain.steps))
            return await chain.run(text, observer=observer)

    with _quiet_load_failures(enabled=not as_json):  # the observer prints them
        result = run(main)
    if as_json:
        emit_json(result_to_dict(result))
    else:
        render_result(out, result, shown=observer.shown if observer else ())
        if result.ok:
            out.print(str(result.output), highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def demo(
    ollama: Annotated[
        str | None,
        typer.Option(
            "--ollama", help="Run on this Ollama server's models instead, e.g. http://127.0.0.1:11434."
        ),
    ] = None,
    llm: Annotated[str, typer.Option("--llm", help="With --ollama: the chat model.")] = "llama3.2:3b",
    embed: Annotated[
        str, typer.Option("--embed", help="With --ollama: the embedding model.")
    ] = "nomic-embed-text",
    budget: Annotated[
        str | None,
        typer.Option("--budget", help="Memory budget (default 150MB on the CPU; with --ollama, none)."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="With --ollama: the device its budget applies to.")
    ] = "cuda:0",
    text: Annotated[str | None, typer.Option("--text", help="The text the chain works on.")] = None,
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Where to write the memory timeline PNG.")
    ] = Path("modelmora-demo.png"),
    no_plot: Annotated[bool, typer.Option("--no-plot", help="Do not write the PNG.")] = False,
) -> None:
    """The main job: a multi-model chain on in-process models under a budget that forces swaps.

    Real all-MiniLM-L6-v2 plus small stand-ins made on first run; prints every load, reuse and
    eviction with measured memory and writes a PNG of the memory timeline.
    """
    if ollama:
        need("chain", "modelmora demo --ollama")  # its LLM steps go through litellm
    else:
        need("demo", "modelmora demo")
    from ..spec import parse_size
    from .demo import TEXT, run_demo

    if budget is not None:
        try:
            parse_size(budget)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="--budget") from None

    async def main() -> Any:
        return await run_demo(
            out, text=text or TEXT, budget=budget, plot=None if no_plot else plot_path,
            ollama=ollama, llm=llm, embed=embed, device=device,
        )  # fmt: skip

    report = run(main)
    if not report.result.ok:
        raise typer.Exit(1)


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Bind address; other than loopback needs MODELMORA_TOKEN.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=1, max=65535, help="TCP port.")] = 8765,
    queue_limit: Annotated[
        int,
        typer.Option(
            "--queue-limit",
            min=0,
            help="Proxy requests that may wait for each model not yet loading before 503s.",
        ),
    ] = 16,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted.")] = "1MiB",
    read_timeout: Annotated[
        str, typer.Option("--read-timeout", help="Time a client has to send its headers, and its body.")
    ] = "30s",
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-origin",
            metavar="ORIGIN",
            help="A web app allowed to call the server, e.g. http://localhost:3000 (repeatable).",
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-host",
            metavar="NAME",
            help="Another host name the token-less server answers to, e.g. gpu-box.local (repeatable).",
        ),
    ] = None,
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level",
            case_sensitive=False,
            help="info: a line per proxied request and per load, eviction, park and failure; "
            "debug: leases and uvicorn's own lines too; warning: failures only.",
        ),
    ] = LogLevel.info,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Same as --log-level debug.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Same as --log-level warning.")] = False,
) -> None:
    """Serve the REST API, the OpenAI-compatible proxy (/v1), /metrics and a status page (/).

    Logs each proxied request and each lifecycle event on stderr; Ctrl-C or SIGTERM stops it
    (ending open event streams, within about a second), a second Ctrl-C at once."""
    need("server", "modelmora serve")
    from ..server import create_app, is_loopback, server_options, token_from_env
    from ..server.security import api_keys
    from ..server.serving import Server, bind, log_config, uvloop_available
    from ..spec import parse_size

    if verbose and quiet:
        raise typer.BadParameter("-v and -q contradict each other", param_hint="--verbose/--quiet")
    level = (
        logging.DEBUG if verbose else logging.WARNING if quiet else getattr(logging, log_level.name.upper())
    )
    token = token_from_env()
    timeout = _duration_opt("--read-timeout", read_timeout)
    if timeout is None or not 0 < timeout < math.inf:
        raise typer.BadParameter("must be a positive, finite duration", param_hint="--read-timeout")
    try:
        cfg = load_config(config)
        limit = parse_size(max_body)
        keys = api_keys(cfg, os.environ)
    except (ModelMoraError, ValueError) as exc:
        fail(str(exc))
    if not is_loopback(host) and token is None and not keys:
        fail(
            f"binding {host} exposes the server beyond this machine: set MODELMORA_TOKEN to a secret "
            "(or configure api_keys) first"
        )
    # the lifecycle events at INFO (the manager reads its logger's level when it starts)
    cfg = cfg.model_copy(update={"verbose": True})
    import uvicorn

    try:
        sockets = bind(host, port)  # before anything claims to serve
    except OSError as exc:
        fail(f"cannot serve on {host}:{port}: {(exc.strerror or str(exc)).lower()}")
    logging.config.dictConfig(log_config(level))

    async def main() -> str:
        stopped_by = ""
        server: Server | None = None
        serving = False
        with anyio.CancelScope() as everything:
            async with anyio.create_task_group() as tg:

                async def on_signals(*, task_status: anyio.abc.TaskStatus[None]) -> None:
                    nonlocal stopped_by
                    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                        task_status.started()
                        async for sig in signals:
                            first, stopped_by = not stopped_by, stopped_by or signal.Signals(sig).name
                            if server is None or not serving:  # starting, or the manager stopping
                                everything.cancel()
                            elif first:  # uvicorn's graceful shutdown, bounded
                                server.should_exit = True
                            else:  # stop waiting for requests still running
                                server.force_exit = True

                await tg.start(on_signals)
                try:
                    # the manager starts here, not in uvicorn's lifespan, so a runtime or budget
                    # problem is one line like everywhere else instead of a lifespan traceback
                    async with ModelManager(cfg) as mm:
                        app_ = create_app(
                            mm, token=token, queue_limit=queue_limit, max_body=limit, title=f"{host}:{port}",
                            read_timeout=timeout, allow_hosts=[host, *(allow_host or [])],
                            allow_origins=allow_origin or [], enter_manager=False, keys=keys,
                        )  # fmt: skip
                        server = Server(
                            uvicorn.Config(
                                app_, log_config=None, access_log=level <= logging.DEBUG,
                                timeout_graceful_shutdown=1, **server_options(read_timeout=timeout),
                            ),
                            on_stop=app_.state.event_streams.end,
                        )  # fmt: skip
                        err.print(
                            f"modelmora serving {cfg.describe()} on http://{host}:{port} (OpenAI proxy at /v1)",
                            highlight=False,
                        )
                        serving = True
                        await server.serve(sockets=sockets)
                        if server.force_exit:  # uvicorn skips the app's shutdown then: it is quick
                            with anyio.move_on_after(1):
                                await server.lifespan.shutdown()
                        serving = False
                finally:
                    tg.cancel_scope.cancel()
        return stopped_by

    try:
        stopped_by = run(main, uvloop=uvloop_available())
    finally:
        for sock in sockets:
            sock.close()
    err.print(f"modelmora stopped ({stopped_by or 'done'})", highlight=False)


def _duration_opt(flag: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None


from . import estimate as _estimate  # noqa: E402, F401  (registers `modelmora estimate` on app)
from . import lease as _lease  # noqa: E402, F401  (registers `modelmora lease` on app)


def main() -> None:
    app(prog_name="modelmora")


if __name__ == "__main__":
    main()
