"""`modelmora bench`: the lifecycle benchmark, for any configured model.

What engineers planning a serving architecture need from one box: how long a model takes
to load cold and warm, what it really costs in memory, how fast the first inference is,
how much of that memory comes back on unload (in-process GC vs subprocess isolation vs a
warm offload), and whether load/unload cycles leak.  Each measurement that must be "cold"
runs in a fresh subprocess (``python -m modelmora.cli.bench worker``), so imports, allocator
state and caches of one measurement never flatter the next.

Verdicts and recommendations follow the seed benchmark's thresholds; they are pure
functions of the numbers, tested on their own.
"""

from __future__ import annotations

import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import anyio
import psutil

from .. import events
from ..config import ManagerConfig
from ..errors import ModelMoraError
from ..spec import format_size

MB = 1_000_000

# -- verdicts (pure) -------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    level: str  # "excellent" | "good" | "moderate" | "poor" | "pass" | "caution" | "fail"
    label: str
    advice: str

    @property
    def ok(self) -> bool:
        return self.level in ("excellent", "good", "pass")


def load_verdict(warm_load_s: float) -> Verdict:
    """Lazy loading vs pre-warming, from the cached (warm) load time."""
    if warm_load_s < 2:
        return Verdict("excellent", "Excellent", "lazy loading viable: load on first request")
    if warm_load_s < 5:
        return Verdict("good", "Good", "lazy loading acceptable")
    if warm_load_s < 10:
        return Verdict("moderate", "Moderate", "pre-warm popular models")
    return Verdict("poor", "Slow", "pre-warm at start-up")


def reclamation_verdict(percent: float) -> Verdict:
    """GC-based unload vs subprocess isolation, from the share of memory that came back."""
    if percent > 90:
        return Verdict("excellent", "Excellent", "GC-based unload is enough")
    if percent >= 70:
        return Verdict("good", "Good", "GC acceptable; monitor long-running processes")
    if percent >= 50:
        return Verdict("moderate", "Moderate", "consider subprocess isolation for critical apps")
    return Verdict("poor", "Poor", "use subprocess isolation (isolation: process)")


def leak_verdict(growth_bytes: float) -> Verdict:
    """Growth over the load/unload cycles, against the baseline."""
    if growth_bytes < 10 * MB:
        return Verdict("pass", "PASS", "no significant leak")
    if growth_bytes <= 50 * MB:
        return Verdict("caution", "CAUTION", "monitor in production")
    return Verdict("fail", "FAIL", "leak detected: use subprocess isolation")


NOISE_FLOOR = 1 * MB  # RSS moves this much from allocator noise alone


def reclamation_percent(baseline: int, loaded: int, after: int) -> float | None:
    """Share of what the load added that the unload gave back (None when the load added
    less than the noise floor: nothing to reclaim, e.g. a model living in another process)."""
    added = loaded - baseline
    if added < NOISE_FLOOR:
        return None
    return max(0.0, min(100.0, 100.0 * (loaded - after) / added))


@dataclass(frozen=True)
class ResourcePlan:
    largest_footprint: int
    per_worker_reserve: int
    for_n_models: int
    n: int


def resource_plan(footprints: Sequence[int], n: int = 10) -> ResourcePlan | None:
    """Seed rule: reserve 1.5 × the largest footprint per worker; N models need N × that."""
    if not footprints:
        return None
    largest = max(footprints)
    return ResourcePlan(largest, int(largest * 1.5), int(n * largest * 1.5), n)


# -- measurements ----------------------------------------------------------------------


@dataclass
class Lifecycle:
    """One model, one fresh process: cold load, first inference, unload, warm reload."""

    model: str
    provider: str
    cache_hit: bool | None = None
    baseline_rss: int = 0
    cold_load_s: float | None = None
    warm_load_s: float | None = None
    loaded_rss: int = 0
    runtime_memory: dict[str, int] = field(default_factory=dict)
    first_inference_s: float | None = None
    unload_s: float | None = None
    after_unload_rss: int = 0
    reclaimed_percent: float | None = None
    error: str | None = None

    @property
    def footprint(self) -> int:
        """What the model costs: process RSS added, or what the runtime reports if larger."""
        return max(self.loaded_rss - self.baseline_rss, sum(self.runtime_memory.values()))


@dataclass
class Cycles:
    model: str
    baseline_rss: int
    rss_after_each: list[int]
    timeline: list[tuple[float, int]] = field(default_factory=list)  # (seconds, rss)
    error: str | None = None

    @property
    def growth(self) -> int:
        return (self.rss_after_each[-1] - self.baseline_rss) if self.rss_after_each else 0


@dataclass
class Strategy:
    """How much memory one unload strategy gives back, and how fast the model returns."""

    model: str
    strategy: str  # "gc" | "subprocess" | "offload"
    baseline_rss: int
    loaded_rss: int
    after_rss: int
    reclaimed_percent: float | None
    restore_s: float | None  # load again (gc/subprocess) or wake (offload)
    error: str | None = None


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


def tree_memory() -> int:
    """RSS of this process plus the proportional memory (PSS) of the processes it started:
    an isolated model's weights live in a worker, and its reclamation is the worker's exit.
    PSS, because a forked worker shares the fork server's pages (the imported libraries):
    each process's USS would move those pages out of the server's figure and count them
    nowhere, while their PSS shares always add up to the memory really in use."""
    total = rss()
    for child in psutil.Process().children(recursive=True):
        try:
            info = child.memory_full_info()
            total += int(getattr(info, "pss", info.uss))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return total


async def first_inference(handle: Any) -> float | None:
    """Time one tiny inference through whatever the handle offers, or None if it offers none."""
    import httpx

    from ..providers.torch_loaders import infer_once  # imports torch only when it runs

    started = time.perf_counter()
    probe = handle.spec.options.get("probe")  # a method to call instead, e.g. "embed"
    if getattr(handle, "isolated", False):
        if probe is not None:
            await handle.call(str(probe), ["hello world"])
        elif not await handle.request("probe", "hello world"):  # whatever the model is
            return None
    elif handle.endpoint is None:
        obj = handle.obj
        if obj is None or isinstance(obj, str | bytes):  # the simulated runtime's stand-in
            return None
        if probe is not None:
            await anyio.to_thread.run_sync(lambda: getattr(obj, str(probe))(["hello world"]))
        elif not await anyio.to_thread.run_sync(infer_once, obj, handle.extras):
            return None
    elif handle.api == "ollama":
        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(
                f"{handle.endpoint}/api/generate",
                json={"model": handle.target, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
            )
            r.raise_for_status()
    elif handle.api == "openai":
        base = handle.endpoint.rstrip("/")
        base = base if base.endswith("/v1") else f"{base}/v1"
        async with httpx.AsyncClient(timeout=120) as client:
            r = await client.post(
                f"{base}/completions", json={"model": handle.target, "prompt": "hi", "max_tokens": 1}
            )
            r.raise_for_status()
    else:
        return None
    return time.perf_counter() - started


def _worker_manager(config: dict[str, Any]) -> Any:
    from ..core import ModelManager

    return ModelManager(ManagerConfig.from_dict(config, source="bench"))


async def _lifecycle(config: dict[str, Any], model: str) -> Lifecycle:
    """Cold load (libraries and weights, first time in this process), first inference and
    unload; then a warm cycle, whose memory delta is the model's and not its libraries'."""
    cfg = ManagerConfig.from_dict(config, source="bench")
    spec = cfg.spec(model)
    result = Lifecycle(model=model, provider=spec.provider, cache_hit=_cache_hit(spec))
    async with _worker_manager(config) as mm:
        freed: dict[str, int] = {}

        def on_event(e: events.Event) -> None:
            if isinstance(e, events.Unloaded) and e.model == model:
                freed.update(e.freed)

        mm.events.subscribe(on_event)
        started = time.perf_counter()
        async with mm.use(model) as handle:
            result.cold_load_s = time.perf_counter() - started
            result.first_inference_s = await first_inference(handle)
            in_process = handle.endpoint is None and not getattr(handle, "isolated", False)
            if in_process and isinstance(handle.obj, str):
                in_process = False  # the simulated runtime holds nothing here
        started = time.perf_counter()
        await mm.unload(model)
        result.unload_s = time.perf_counter() - started
        # warm cycle: weights in the page cache, libraries imported.  Measured as the gc
        # row is (_strategy): after one inference, since weights mapped from their files
        # become resident only as they are touched; without it the same unreturned bytes
        # were divided by less, and the two tables disagreed (57 % vs 92 % for MiniLM)
        result.baseline_rss = rss()
        started = time.perf_counter()
        async with mm.use(model) as handle:
            result.warm_load_s = time.perf_counter() - started
            await first_inference(handle)
            result.loaded_rss = rss()
            result.runtime_memory = dict(handle.memory)
        freed.clear()
        await mm.unload(model)
        result.after_unload_rss = rss()
        held = sum(result.runtime_memory.values())
        if in_process:
            result.reclaimed_percent = reclamation_percent(
                result.baseline_rss, result.loaded_rss, result.after_unload_rss
            )
        elif held:
            # a runtime in another process: what it reports freeing, of what it reported holding
            result.reclaimed_percent = min(100.0, 100.0 * sum(freed.values()) / held)
    return result


async def _cycles(config: dict[str, Any], model: str, n: int) -> Cycles:
    async with _worker_manager(config) as mm:
        # one load first, so libraries imported once are not counted as a leak
        await mm.load(model)
        await mm.unload(model)
        t0 = time.perf_counter()
        result = Cycles(model=model, baseline_rss=rss(), rss_after_each=[], timeline=[(0.0, rss())])
        for _ in range(n):
            await mm.load(model)
            result.timeline.append((time.perf_counter() - t0, rss()))
            await mm.unload(model)
            after = rss()
            result.rss_after_each.append(after)
            result.timeline.append((time.perf_counter() - t0, after))
    return result


async def _strategy(config: dict[str, Any], model: str, strategy: str) -> Strategy:
    cfg = ManagerConfig.from_dict(config, source="bench")
    spec = cfg.spec(model)
    options = dict(spec.options)
    if strategy == "subprocess":
        options["isolation"] = "process"
    models = {**config.get("models", {})}
    models[model] = {
        **spec.model_dump(mode="json", exclude={"name"}),
        "options": options,
        "warm_tier": strategy == "offload",
    }
    config = {**config, "models": models}
    async with _worker_manager(config) as mm:
        # import libraries once, those of an inference included; measure the second round
        await first_inference(await mm.load(model))
        await mm.unload(model)
        baseline = tree_memory()
        # one inference: weights mapped from their files become resident as they are touched
        await first_inference(await mm.load(model))
        loaded = tree_memory()
        if strategy == "offload":
            if not await mm.park(model):
                raise ModelMoraError(f"{model}: provider {spec.provider!r} has no warm tier to offload to")
        else:
            await mm.unload(model)
        after = tree_memory()
        started = time.perf_counter()
        await mm.load(model)
        restore = time.perf_counter() - started
        await mm.unload(model)
    # offload keeps the weights in RAM on purpose: its "reclaimed" is about the device it left
    pct = reclamation_percent(baseline, loaded, after)
    return Strategy(model, strategy, baseline, loaded, after, pct, restore)


def _cache_hit(spec: Any) -> bool | None:
    if spec.provider != "torch" and "hf_repo" not in spec.options:
        return None
    from .cache import hf_cached

    target = str(spec.options.get("hf_repo", spec.target))
    if os.path.isdir(target):
        return True  # a local directory is always "cached"
    return bool(hf_cached(target, spec.options.get("cache_dir"))[1])


async def run_worker(task: dict[str, Any]) -> dict[str, Any]:
    kind = task["kind"]
    try:
        if kind == "lifecycle":
            return asdict(await _lifecycle(task["config"], task["model"]))
        if kind == "cycles":
            return asdict(await _cycles(task["config"], task["model"], int(task["cycles"])))
        if kind == "strategy":
            return asdict(await _strategy(task["config"], task["model"], task["strategy"]))
    except ModelMoraError as exc:
        return _failed(task, str(exc))
    except Exception as exc:  # reported as data: one failing model must not end the run
        return _failed(task, f"{type(exc).__name__}: {exc}")
    raise ValueError(f"unknown bench task {kind!r}")


def _failed(task: dict[str, Any], error: str) -> dict[str, Any]:
    """A row that failed, named as its table shows it (model, and strategy for those rows)."""
    row = {"error": error, "model": task.get("model")}
    if "strategy" in task:
        row["strategy"] = task["strategy"]
    return row


def run_in_subprocess(task: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its last stdout line is the JSON result."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    proc = subprocess.run(
        [sys.executable, "-m", "modelmora.cli.bench", "worker"],
        input=json.dumps(task), capture_output=True, text=True, timeout=timeout, env=env,
    )  # fmt: skip
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return _failed(task, f"benchmark worker failed (exit {proc.returncode}): {' | '.join(tail)}")
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# -- the report ------------------------------------------------------------------------


@dataclass
class Report:
    machine: dict[str, Any]
    lifecycles: list[dict[str, Any]]
    strategies: list[dict[str, Any]]
    cycles: list[dict[str, Any]]
    summary: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarise(
    lifecycles: list[dict[str, Any]], strategies: list[dict[str, Any]], cycles: list[dict[str, Any]]
) -> dict[str, Any]:
    """Verdicts per model and the seed's three recommendations."""
    ok = [lc for lc in lifecycles if not lc.get("error")]
    warm = [lc["warm_load_s"] for lc in ok if lc.get("warm_load_s") is not None]
    reclaimed = [lc["reclaimed_percent"] for lc in ok if lc.get("reclaimed_percent") is not None]
    footprints = [
        max(lc["loaded_rss"] - lc["baseline_rss"], sum(lc.get("runtime_memory", {}).values())) for lc in ok
    ]
    per_model = {}
    for lc in ok:
        entry: dict[str, Any] = {}
        if lc.get("warm_load_s") is not None:
            entry["load"] = asdict(load_verdict(lc["warm_load_s"]))
        if lc.get("reclaimed_percent") is not None:
            entry["reclamation"] = asdict(reclamation_verdict(lc["reclaimed_percent"]))
        per_model[lc["model"]] = entry
    for cy in cycles:
        if not cy.get("error") and cy.get("rss_after_each"):
            growth = cy["rss_after_each"][-1] - cy["baseline_rss"]
            per_model.setdefault(cy["model"], {})["leak"] = {
                **asdict(leak_verdict(growth)),
                "growth_bytes": growth,
            }
    avg_load = statistics.mean(warm) if warm else None
    avg_reclaimed = statistics.mean(reclaimed) if reclaimed else None
    plan = resource_plan(footprints)
    return {
        "per_model": per_model,
        "loading": None
        if avg_load is None
        else {"mean_warm_load_s": avg_load, **asdict(load_verdict(avg_load))},
        "memory": None
        if avg_reclaimed is None
        else {"mean_reclaimed_percent": avg_reclaimed, **asdict(reclamation_verdict(avg_reclaimed))},
        "resources": None if plan is None else asdict(plan),
    }


def machine_info() -> dict[str, Any]:
    import platform

    from .. import __version__

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "modelmora": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch"] = torch.__version__
    return info


def run_benchmark(
    config: dict[str, Any],
    models: Sequence[str],
    *,
    cycles: int = 5,
    strategies: Sequence[str] = ("gc", "subprocess", "offload"),
    progress: Callable[[str], None] | None = None,
) -> Report:
    """Every measurement in its own fresh subprocess; ``progress`` hears each step."""
    say = progress or (lambda _msg: None)
    lifecycles, strats, cycs = [], [], []
    for model in models:
        say(f"{model}: cold/warm load, first inference, unload")
        lifecycles.append(run_in_subprocess({"kind": "lifecycle", "config": config, "model": model}))
        for strategy in strategies:
            say(f"{model}: unload by {strategy}")
            strats.append(
                run_in_subprocess(
                    {"kind": "strategy", "config": config, "model": model, "strategy": strategy}
                )
            )
        say(f"{model}: {cycles} load/unload cycles")
        cycs.append(run_in_subprocess({"kind": "cycles", "config": config, "model": model, "cycles": cycles}))
    return Report(machine_info(), lifecycles, strats, cycs, summarise(lifecycles, strats, cycs))


def fmt_mb(n: float | None) -> str:
    return "-" if n is None or (isinstance(n, float) and math.isnan(n)) else format_size(n)


def main() -> None:
    if sys.argv[1:] == ["worker"]:
        task = json.loads(sys.stdin.read())
        result = anyio.run(run_worker, task)
        sys.stdout.write("\n" + json.dumps(result) + "\n")
        return
    raise SystemExit("usage: python -m modelmora.cli.bench worker  (use `modelmora bench` instead)")


if __name__ == "__main__":
    main()
