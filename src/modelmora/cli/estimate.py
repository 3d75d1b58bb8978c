"""``modelmora estimate NAME|FILE|FOLDER``: what a model would take, before loading it.

A path is estimated from its files (:func:`modelmora.estimate.file_estimate`); a registry
name through its provider's ``prepare`` — the estimate admission itself plans with.  The
answer: the parts (weights, KV cache, buffers) and their basis, whether it fits each
device's budget (and what is free now), and the largest context that fits.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from ..core import ModelManager
from ..errors import ModelMoraError
from ..estimate import Estimate, file_estimate, gguf_estimate, read_gguf
from ..spec import ModelSpec, format_memory, format_size
from .commands import ConfigOpt, JsonOpt, app, emit_json, fail, out, with_manager

Total = Callable[[int], Awaitable[int]]


async def largest_context(total_for: Total, budget: int, ceiling: int) -> int | None:
    """The largest context (a multiple of 256, at most ``ceiling``) whose estimated total
    fits in ``budget`` bytes, by bisection (``total_for`` grows with the context); None
    when not even 256 tokens fit."""
    lo, hi = 0, max(1, ceiling // 256)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if await total_for(mid * 256) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo * 256 if lo else None


def _with_overrides(spec: ModelSpec, ctx: int | None, parallel: int | None, device: str | None) -> ModelSpec:
    options = dict(spec.options)
    if ctx is not None:
        options["ctx_size"] = options["num_ctx"] = ctx  # llama.cpp's and Ollama's names
    if parallel is not None:
        options["parallel"] = parallel
    update: dict[str, Any] = {"options": options}
    if device is not None:
        update["device"] = device
    return spec.model_copy(update=update)


async def _for_name(
    mm: ModelManager, spec: ModelSpec, ctx: int | None, parallel: int | None
) -> tuple[Estimate, Total | None]:
    provider = mm.provider(spec.provider)
    bare = spec.model_copy(update={"memory": {}})
    prepared = await provider.prepare(bare)
    estimate = provider.estimates.get(spec.name)
    if estimate is None:
        raise ModelMoraError(
            f"{spec.name}: provider {spec.provider!r} gives no estimate for {spec.target!r} "
            f"(no model file here to read){'; the registry says ' + format_memory(spec.memory) if spec.memory else ''}"
        )
    show = getattr(provider, "estimate", None)
    if estimate.source.endswith(".gguf") and not estimate.file_size_only:
        # imported here: every `modelmora` command (serve too) imports this module, and the
        # llama.cpp provider's imports cost ~0.4 s of start-up and a heavier process
        from ..providers.llamacpp import gguf_options

        model = read_gguf(estimate.source)
        opts = gguf_options(prepared, list(getattr(provider.settings, "args", [])) + list(spec.options.get("args") or []))  # fmt: skip

        async def gguf_total(n: int) -> int:
            return gguf_estimate(model, device=estimate.device, **{**opts, "ctx": n}).total

        return estimate, gguf_total
    if callable(show) and estimate.context is not None and not estimate.file_size_only:

        async def ollama_total(n: int) -> int:
            return int((await show(prepared, estimate.weights, n)).total)

        return estimate, ollama_total
    return estimate, None


@app.command("estimate")
def estimate_command(
    what: Annotated[
        str,
        typer.Argument(
            metavar="NAME|FILE|FOLDER", help="A registry name, a GGUF or safetensors file, or a model folder."
        ),
    ],
    ctx: Annotated[
        int | None, typer.Option("--ctx", min=1, help="Context in tokens (default: the model's own).")
    ] = None,
    parallel: Annotated[
        int | None, typer.Option("--parallel", min=1, help="Parallel slots (llama.cpp --parallel).")
    ] = None,
    device: Annotated[
        str | None,
        typer.Option("--device", help="Device it would load on (default: the registry's, cpu for files)."),
    ] = None,
    dtype: Annotated[
        str | None, typer.Option("--dtype", help="safetensors: the dtype it loads as (float16, ...).")
    ] = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """What a model would take (weights, KV cache, buffers), whether it fits each device's
    budget now, and the largest context that fits."""
    path = Path(what)
    spec: ModelSpec | None = None
    if not path.exists():
        if "/" in what and what.endswith((".gguf", ".safetensors")):
            fail(f"{what}: no such file")
        try:
            from .commands import load_config

            spec = _with_overrides(load_config(config).spec(what), ctx, parallel, device)
        except ModelMoraError as exc:
            fail(str(exc))

    async def job(mm: ModelManager) -> dict[str, Any]:
        total_for: Total | None = None
        if spec is None:
            options: dict[str, Any] = {"ctx": ctx, "parallel": parallel, "dtype": dtype}
            estimate = file_estimate(path, device=device or "cpu", **options)
            if estimate.source.endswith(".gguf") and not estimate.file_size_only:
                model = read_gguf(path)

                async def file_total(n: int) -> int:
                    return gguf_estimate(model, ctx=n, parallel=parallel, device=estimate.device).total

                total_for = file_total
        else:
            estimate, total_for = await _for_name(mm, spec, ctx, parallel)
        budgets, used = mm.budgets, mm.usage()
        devices: dict[str, Any] = {}
        for name in sorted({estimate.device, *budgets}):
            budget = budgets.get(name)
            free = None if budget is None else max(0, budget - used.get(name, 0))
            row: dict[str, Any] = {"budget": budget, "free_now": free,
                                   "fits_budget": budget is None or estimate.total <= budget,
                                   "fits_now": free is None or estimate.total <= free}  # fmt: skip
            if name == estimate.device and total_for is not None and budget is not None:
                ceiling = int(estimate.fields.get("context_length") or 0) or 131072
                row["largest_context"] = await largest_context(total_for, free if free is not None else budget, ceiling)  # fmt: skip
            if name == estimate.device or budget is not None:
                devices[name] = row
        return {
            "model": spec.name if spec else str(path), "estimate": estimate.to_dict(),
            "registry_memory": dict(spec.memory) if spec and spec.memory else None, "devices": devices,
        }  # fmt: skip

    try:
        result = with_manager(config, job)  # a file needs no registry entry; budgets still do
    except (ModelMoraError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        emit_json(result)
        return
    _render(result)


def _render(result: dict[str, Any]) -> None:
    e = result["estimate"]
    table = Table(title=f"{result['model']}: {format_size(e['total'])} on {e['device']}", title_justify="left", show_header=False)  # fmt: skip
    table.add_row("weights", format_size(e["weights"]))
    table.add_row("KV cache", format_size(e["kv_cache"]) + (f" ({e['context']} tokens, {e['parallel']} slot(s))" if e["context"] else ""))  # fmt: skip
    table.add_row("buffers", format_size(e["buffers"]))
    table.add_row("basis", escape(e["basis"]))
    table.add_row("source", escape(e["source"]))
    if result["registry_memory"]:
        table.add_row("registry says", format_memory(result["registry_memory"]))
    out.print(table)
    fits = Table(title="Fits", title_justify="left")
    for col in ("device", "budget", "free now", "fits budget", "fits now", "largest context"):
        fits.add_column(col)
    for name, d in result["devices"].items():
        largest = d.get("largest_context", "-")
        fits.add_row(
            name,
            "unlimited" if d["budget"] is None else format_size(d["budget"]),
            "-" if d["free_now"] is None else format_size(d["free_now"]),
            "yes" if d["fits_budget"] else "no",
            "yes" if d["fits_now"] else "no",
            "none" if largest is None else str(largest),
        )
    out.print(fits)
    if e["basis"].startswith("file size only"):
        out.print("[yellow]file size only:[/] the KV cache and buffers are not counted for this architecture")


__all__ = ["estimate_command", "largest_context"]
