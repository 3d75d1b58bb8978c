"""`modelmora …`: the command line (typer + rich).

Direct mode builds a :class:`ModelManager` from the config and acts on the runtimes,
whose state lives in the runtime (Ollama, Docker, processes), so ``status`` shows what
they report.  Every error is one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import anyio
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from . import events as ev
from .cache import Cleared, clear_hf_cache, clear_ollama_model, hf_cached
from .config import ManagerConfig
from .core import ModelManager
from .errors import ModelMoraError, ModelNotFound
from .extras import require_extra
from .memory import StaticProbe
from .providers.simulated import SimulatedProvider
from .registry import RegistryFile
from .spec import ModelSpec, format_duration, format_memory, format_size, parse_duration

T = TypeVar("T")

app = typer.Typer(
    name="modelmora",
    help="Keep the right models resident in GPU/CPU memory: load, unload, plan and inspect.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

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


def remote(url: str, job: Callable[[Any], T]) -> T:
    """Run ``job`` against the server at ``url``, turning its errors into one line."""
    from .remote import RemoteManager

    try:
        with RemoteManager(url) as client:
            return job(client)
    except ModelMoraError as exc:
        fail(str(exc))


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def need(extra: str, needed_by: str) -> None:
    """One line with the install command when an optional extra is missing."""
    try:
        require_extra(extra, needed_by=needed_by)
    except ModelMoraError as exc:
        fail(str(exc))


def _version(value: bool) -> None:
    if value:
        from . import __version__

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


def load_config(path: Path | None) -> ManagerConfig:
    if path is None:
        env = os.environ.get("MODELMORA_CONFIG")
        path = Path(env) if env else next((Path(p) for p in DEFAULT_CONFIGS if Path(p).is_file()), None)
    if path is None:
        return ManagerConfig.from_dict({}, source="defaults", environ=os.environ)
    return ManagerConfig.from_yaml(path, environ=os.environ)


def run(fn: Callable[[], Awaitable[T]]) -> T:
    """Run an async job at the CLI edge, turning every modelmora error into one line."""
    try:
        return anyio.run(fn)
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
        cfg = load_config(config)
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


def render_status(status: dict[str, Any]) -> None:
    """Render ``ManagerStatus.to_dict()`` (local) or a server's ``/status`` (remote) alike."""
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
    for col in ("model", "provider", "state", "leases", "memory", "idle", "expires in", "flags"):
        models.add_column(col)
    for m in status["models"]:
        flags = ", ".join(f for f, on in (("pinned", m["pinned"]), ("adopted", not m["owned"])) if on)
        models.add_row(
            m["name"],
            m["provider"],
            m["state"],
            str(m["leases"]),
            format_memory(m["memory"]),
            format_duration(m["idle_s"]),
            "never" if m["expires_in_s"] is None else format_duration(m["expires_in_s"]),
            flags,
        )
    if status["models"]:
        out.print(models)
    else:
        out.print("No models resident.")
    for name, f in status["failures"].items():
        out.print(
            f"[yellow]{escape(name)}[/]: {f['failures']} failed load(s), retry in {format_duration(f['retry_in_s'])}: {escape(str(f['error']))}"
        )


@app.command()
def status(config: ConfigOpt = None, url: UrlOpt = None, as_json: JsonOpt = False) -> None:
    """Memory per device, resident models, leases, idle time and expiry."""

    async def job(mm: ModelManager) -> dict[str, Any]:
        return (await mm.status()).to_dict()

    result = remote(url, lambda c: c.status()) if url else with_manager(config, job)
    if as_json:
        emit_json(result)
    else:
        render_status(result)


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
    name: Annotated[str, typer.Argument(help="Registry name.")],
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
        table.add_row(key, json.dumps(value) if isinstance(value, dict | list) else str(value))
    out.print(table)


@models_app.command("add")
def models_add(
    name: Annotated[str, typer.Argument(help="Registry name, e.g. qwen-14b.")],
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
        reg = RegistryFile(path)
        reg.add(name, fields, replace=replace)
        cfg = reg.save()
    except ModelMoraError as exc:
        fail(str(exc))
    spec = cfg.models[name]
    out.print(f"added {name} ({spec.provider}: {spec.target}) to {path}")


@models_app.command("remove")
def models_remove(
    name: Annotated[str, typer.Argument(help="Registry name.")],
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
        reg = RegistryFile(path)
        before = reg.validate()
        if clear_cache and name in before.models:
            _clear_cache(before, name, yes)
        reg.remove(name, new_default=new_default)
        reg.save()
    except ModelMoraError as exc:
        fail(str(exc))
    out.print(f"removed {name} from {path}" + (f"; default is now {new_default}" if new_default else ""))


@models_app.command("set-default")
def models_set_default(
    name: Annotated[str, typer.Argument(help="Registry name.")], config: ConfigOpt = None
) -> None:
    """Make NAME the model `use()` takes when none is named."""
    path = config_path(config)
    try:
        reg = RegistryFile(path)
        reg.set_default(name)
        reg.save()
    except ModelMoraError as exc:
        fail(str(exc))
    out.print(f"default model is now {name}")


@app.command("clear-cache")
def clear_cache(
    name: Annotated[str, typer.Argument(help="Registry name.")],
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
    name: Annotated[str, typer.Argument(help="Registry name of the model.")],
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
        with err.status(f"loading {name} on {url} …"):
            result = remote(url, lambda c: c.load(name, pin=pin, keep_alive=ttl))
        mem = format_memory(result["memory"], "no memory reported")
        out.print(f"loaded {name} ({mem})")
        return

    async def job(mm: ModelManager) -> None:
        with err.status(f"loading {name} …"):
            handle = await mm.load(name, pin=pin, keep_alive=ttl, retry=retry)
        out.print(f"loaded {handle.name} ({format_memory(handle.memory, 'no memory reported')})")

    with_manager(config, job, verbose=verbose)


@app.command()
def unload(
    name: Annotated[str, typer.Argument(help="Registry name of the model.")],
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


# -- planning --------------------------------------------------------------------------


def simulate_config(cfg: ManagerConfig) -> tuple[ManagerConfig, SimulatedProvider]:
    """The same registry and policy with every model on one simulated runtime."""
    models = {n: s.model_copy(update={"provider": "simulated"}) for n, s in cfg.models.items()}
    sim_cfg = cfg.model_copy(update={"models": models, "providers": {}})
    return sim_cfg, SimulatedProvider("simulated")


@app.command()
def plan(
    sequence: Annotated[
        list[str] | None, typer.Argument(metavar="[MODELS]...", help="Models in the order they will be used.")
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

    async def main() -> list[dict[str, Any]]:
        steps: list[dict[str, Any]] = []
        evicted: list[str] = []

        def on_event(e: ev.Event) -> None:
            if isinstance(e, ev.Evicted):
                evicted.append(e.model)

        async with ModelManager(sim_cfg, providers={"simulated": sim}, probe=StaticProbe({})) as mm:
            mm.events.subscribe(on_event)
            for i, name in enumerate(sequence, 1):
                evicted.clear()
                resident = mm.is_loaded(name)
                async with mm.use(name):
                    used = mm.usage()
                spec: ModelSpec = mm.spec(name)
                steps.append(
                    {
                        "step": i,
                        "model": name,
                        "action": "reuse" if resident else "load",
                        "modelled_load_s": 0.0 if resident else (spec.load_time or 0.0),
                        "evicted": list(evicted),
                        "resident": mm.loaded(),
                        "memory": used,
                    }
                )
            peak = dict(mm.monitor.peak)
            budgets = mm.budgets
        steps.append({"peak": peak, "budgets": budgets, "loads": sim.stats.loads})
        return steps

    steps = run(main)
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
        list[str] | None, typer.Argument(metavar="[MODELS]...", help="Registry names to measure.")
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
            from .quick import quick_config

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
    with err.status("benchmarking …") as spinner:
        report = bench_mod.run_benchmark(
            cfg_dict,
            names,
            cycles=cycles,
            strategies=chosen,
            progress=lambda msg: spinner.update(f"benchmarking: {msg}"),
        ).to_dict()
    if plot_path is not None:
        plot(report, plot_path)
    if as_json:
        emit_json(report)
    else:
        render(report, out)
        if plot_path is not None:
            out.print(f"figure written to {plot_path}")


# -- chains and the demo ---------------------------------------------------------------


def _chain_config(chain_file: Path, config: Path | None) -> ManagerConfig | Path | None:
    """--config wins; else the chain file's own ``config:``; else the usual default lookup."""
    from .chain.files import read_chain_file

    if config is not None:
        return load_config(config)
    if read_chain_file(chain_file).config:
        return None
    return load_config(None)


def _plan_chain(chain_file: Path, config: Path | None, as_json: bool) -> None:
    from .chain import load_chain
    from .chain.report import plan_to_dict, render_plan

    try:
        chain, _ = load_chain(chain_file, config=_chain_config(chain_file, config))
    except ModelMoraError as exc:
        fail(str(exc))
    residency = run(chain.plan)
    if as_json:
        emit_json(plan_to_dict(residency))
    else:
        render_plan(out, residency)


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
    from .chain import load_chain
    from .chain.report import ConsoleObserver, render_plan, render_result, result_to_dict

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

    async def main() -> Any:
        async with chain:
            residency = await chain.plan()
            if not as_json:
                render_plan(out, residency)
            observer = None if as_json else ConsoleObserver(out, chain.manager, len(chain.steps))
            return await chain.run(text, observer=observer)

    result = run(main)
    if as_json:
        emit_json(result_to_dict(result))
    else:
        render_result(out, result)
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
    from .demo import TEXT, run_demo
    from .spec import parse_size

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


@app.command()
def serve(
    config: ConfigOpt = None,
    host: Annotated[
        str, typer.Option("--host", help="Bind address; other than loopback needs MODELMORA_TOKEN.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", help="TCP port.")] = 8765,
    queue_limit: Annotated[
        int,
        typer.Option("--queue-limit", min=0, help="Proxy requests that may wait for a model before 503s."),
    ] = 16,
    max_body: Annotated[str, typer.Option("--max-body", help="Largest request body accepted.")] = "1MiB",
) -> None:
    """Serve the REST API, the OpenAI-compatible proxy (/v1), /metrics and a status page (/)."""
    need("server", "modelmora serve")
    from .server import create_app, is_loopback, token_from_env
    from .spec import parse_size

    token = token_from_env()
    if not is_loopback(host) and token is None:
        fail(f"binding {host} exposes the server beyond this machine: set MODELMORA_TOKEN to a secret first")
    try:
        cfg = load_config(config)
        limit = parse_size(max_body)
    except (ModelMoraError, ValueError) as exc:
        fail(str(exc))
    import uvicorn

    app_ = create_app(cfg, token=token, queue_limit=queue_limit, max_body=limit, title=f"{host}:{port}")
    err.print(
        f"modelmora serving {cfg.describe()} on http://{host}:{port} (OpenAI proxy at /v1)", highlight=False
    )
    uvicorn.run(app_, host=host, port=port, log_level="warning")


def _duration_opt(flag: str, value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
