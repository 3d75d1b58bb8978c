"""The performance suite: every benchmark, one command, one results file.

    python benchmarks/run_all.py [--out benchmarks/RESULTS.md] [--quick]

Runs each benchmark in its own process with ``--json`` (each measures against its
baseline in the same run), then writes the figures with the machine, date, versions and
this command.  A benchmark whose runtime is missing here (no Docker engine, no
llama-cpp-python, no torch) is recorded as not run, with the reason.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import psutil

HERE = Path(__file__).resolve().parent


def run(cmd: list[str], timeout: float) -> tuple[dict[str, Any] | None, str, float]:
    started = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE.parent)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout:.0f}s", timeout
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return None, " | ".join(tail) or f"exit {proc.returncode}", wall
    text = proc.stdout
    return json.loads(text[text.index("{") :]), "", wall


def version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument(
        "--quick", action="store_true", help="Fewer repetitions (a smoke run, not for the record)."
    )
    args = parser.parse_args()
    py = sys.executable
    reps = ["--repeat", "2"] if args.quick else []
    jobs: dict[str, list[str]] = {
        "leases": [
            py,
            "benchmarks/bench_leases.py",
            "--json",
            *(["--n", "5000", "--repeat", "3"] if args.quick else []),
        ],
        "ollama": [py, "benchmarks/bench_ollama.py", "--json", *(["--rounds", "10"] if args.quick else [])],
        "chain": [py, "benchmarks/bench_chain.py", "--json", "--random", "50", "--large", "3", "--reference", "2"],
        "process": [py, "benchmarks/bench_process.py", "--json", *reps],
        "vllm": [py, "benchmarks/bench_vllm.py", "--json", *reps],
        "torch": [py, "-m", "modelmora.cli", "bench", "--quick", "--json"],
    }
    results: dict[str, tuple[dict[str, Any] | None, str, float]] = {}
    for name, cmd in jobs.items():
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        results[name] = run(cmd, timeout=900)
        data, why, wall = results[name]
        print(f"   {'done' if data else 'not run: ' + why} ({wall:.0f}s)", flush=True)

    lines = [
        "# modelmora performance results",
        "",
        f"Produced by `python benchmarks/run_all.py{' --quick' if args.quick else ''}` on "
        f"{dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC.",
        "",
        f"Machine: {platform.machine()}, {psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 1e9:.1f} GB RAM, "
        f"{platform.platform()}; Python {platform.python_version()}; modelmora {version('modelmora')}, "
        f"torch {version('torch')}, transformers {version('transformers')}, httpx {version('httpx')}, "
        f"anyio {version('anyio')}, llama-cpp-python {version('llama_cpp_python')}, docker SDK {version('docker')}.",
        "",
        "Every figure is measured against its baseline in the same run (interleaved where it matters); medians.",
        "",
    ]

    def missing(name: str) -> list[str]:
        _, why, _ = results[name]
        return [f"Not run here: {why}", ""]

    data = results["leases"][0]
    lines += ["## Lease hot path (`bench_leases.py`)", ""]
    if data:
        u, t, s = (
            data["use_enter_exit_us"],
            data["lease_throughput_per_s"],
            data["singleflight_1000_first_uses"],
        )
        lines += [
            "| | modelmora | asyncio.Lock + dict baseline | ratio |", "|---|---|---|---|",
            f"| `use()` enter+exit, resident model | {u['modelmora']} µs | {u['lock_dict_baseline']} µs | {u['ratio']}× |",
            f"| leases/s, {t['tasks']} concurrent tasks | {t['modelmora']:,} | {t['lock_dict_baseline']:,} | "
            f"{t['modelmora'] / t['lock_dict_baseline']:.2f}× |",
            f"| 1,000 concurrent first uses | {s['provider_loads']} provider load in {s['wall_s']} s | — | |", "",
        ]  # fmt: skip
    else:
        lines += missing("leases")

    data = results["ollama"][0]
    lines += ["## Ollama provider vs raw httpx against the emulator (`bench_ollama.py`)", ""]
    if data:
        lines += ["| | raw httpx | provider | added |", "|---|---|---|---|"]
        for op in ("load", "unload"):
            r = data[op]
            lines.append(
                f"| {op} | {r['raw_ms']} ms | {r['provider_ms']} ms | {r['added_ms']:+} ms ({r['added_percent']:+}%) |"
            )
        lines.append("")
    else:
        lines += missing("ollama")

    data = results["chain"][0]
    lines += ["## Chain residency plans (`bench_chain.py --random 50`)", ""]
    if data:
        strategies = ("optimal", "next-use (seeds)", "always-unload")
        lines += [
            "Modelled loads / switch seconds:",
            "",
            "| chain | exact plan | seeds' rule | always unload |",
            "|---|---|---|---|",
        ]
        for name, r in data["scenarios"].items():
            lines.append(
                f"| {name} | "
                + " | ".join(f"{r[k]['loads']} / {r[k]['switch_s']:.1f} s" for k in strategies)
                + " |"
            )
        t = data["random"]["totals"]
        lines.append(
            f"| {data['random']['chains']} random chains | "
            + " | ".join(f"{t[k]['loads']} / {t[k]['switch_s']:.0f} s" for k in strategies)
            + " |"
        )
        lines += ["", f"Exact plan better than the seeds' rule on {data['random']['optimal_better']} random chains, worse on "
                  f"{data['random']['optimal_worse']}.", "", "Executed on the simulated runtime (wall seconds):", "",
                  "| chain | exact + prefetch | exact | seeds' rule | always unload |", "|---|---|---|---|---|"]  # fmt: skip
        for name, row in data["executed"].items():
            cols = ("optimal+prefetch", "optimal", "next-use", "always-unload")
            lines.append(
                f"| {name} | "
                + " | ".join(f"{row[c]['wall_s']:.3f} ({row[c]['loads']} loads)" for c in cols)
                + " |"
            )
        lines.append("")
    else:
        lines += missing("chain")

    data = results["process"][0]
    lines += ["## Process provider on the real llama.cpp server (`bench_process.py`)", ""]
    if data:
        lines += ["| | by hand | manager | overhead |", "|---|---|---|---|"]
        for key, r in data.items():
            lines.append(
                f"| {key} | {r['by_hand']:.3f} s | {r['manager']:.3f} s | {r['overhead'] * 1000:+.0f} ms |"
            )
        lines.append("")
    else:
        lines += missing("process")

    data = results["vllm"][0]
    lines += ["## vLLM provider on a real Docker engine (`bench_vllm.py`)", ""]
    if data:
        lines += [
            "llama.cpp server in a container:",
            "",
            "| | by hand (docker SDK) | manager | overhead |",
            "|---|---|---|---|",
        ]
        for key, r in data["llama_cpp_container"].items():
            lines.append(
                f"| {key.replace('_', ' ')} | {r['by_hand']:.3f} s | {r['manager']:.3f} s | {r['overhead'] * 1000:+.0f} ms |"
            )
        s = data["vllm_standin"]
        lines += ["", f"vLLM stand-in (cold start set to 3 s, wake to 0.2 s): cold start {s['cold_start']:.2f} s, "
                  f"sleep {s['sleep']:.2f} s, wake {s['wake']:.2f} s.", ""]  # fmt: skip
    else:
        lines += missing("vllm")

    data = results["torch"][0]
    lines += ["## Torch provider lifecycle (`modelmora bench --quick`)", ""]
    if data:
        lines += [
            "| model | cold load | warm load | first inference | unload | reclaimed |",
            "|---|---|---|---|---|---|",
        ]
        for lc in data["lifecycles"]:
            if lc.get("error"):
                lines.append(f"| {lc['model']} | error: {lc['error']} | | | | |")
                continue
            rec = "-" if lc["reclaimed_percent"] is None else f"{lc['reclaimed_percent']:.0f} %"
            lines.append(f"| {lc['model']} | {lc['cold_load_s']:.2f} s | {ms(lc['warm_load_s'])} | "
                         f"{ms(lc['first_inference_s'])} | {ms(lc['unload_s'])} | {rec} |")  # fmt: skip
        lines += ["", "| model | unload strategy | RSS kept after unload | back in |", "|---|---|---|---|"]
        for st in data["strategies"]:
            if st.get("error"):
                continue
            kept = (st["after_rss"] - st["baseline_rss"]) / 1e6
            back = "-" if st["restore_s"] is None else ms(st["restore_s"])
            lines.append(f"| {st['model']} | {st['strategy']} | {kept:+.1f} MB | {back} |")
        lines += ["", "| model | cycles | RSS growth | verdict |", "|---|---|---|---|"]
        for model, verdicts in data["summary"]["per_model"].items():
            leak = verdicts.get("leak")
            if leak:
                cycles = next((len(c["rss_after_each"]) for c in data["cycles"] if c["model"] == model), "?")
                lines.append(
                    f"| {model} | {cycles} | {leak['growth_bytes'] / 1e6:+.1f} MB | {leak['label']} |"
                )
        lines.append("")
    else:
        lines += missing("torch")

    lines += [
        "Wall time per benchmark: " + ", ".join(f"{k} {v[2]:.0f} s" for k, v in results.items()) + ".",
        "",
    ]
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    if os.environ.get("MODELMORA_RESULTS_STRICT") and any(d is None for d, _, _ in results.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
