"""Presenting a benchmark :class:`~modelmora.cli.bench.Report`: rich tables and a matplotlib figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..spec import format_duration, format_size

_MARK = {
    "excellent": "✅",
    "good": "✅",
    "pass": "✅",
    "moderate": "⚠️",
    "caution": "⚠️",
    "poor": "❌",
    "fail": "❌",
}


def _s(value: float | None) -> str:
    return "-" if value is None else format_duration(value)


def _b(value: float | None) -> str:
    return "-" if value is None else format_size(value)


def render(report: dict[str, Any], console: Console) -> None:
    machine = report["machine"]
    console.print(
        f"[bold]modelmora lifecycle benchmark[/] — {machine['cpus']} CPUs, {format_size(machine['ram_bytes'])} RAM, "
        f"Python {machine['python']}"
        + (f", torch {machine['torch']}" if "torch" in machine else "")
        + f", {machine['date']}"
    )
    t = Table(title="1. Load / unload", title_justify="left")
    for col in (
        "model",
        "cache",
        "cold load",
        "warm load",
        "footprint",
        "first inference",
        "unload",
        "reclaimed",
    ):
        t.add_column(col)
    for lc in report["lifecycles"]:
        if lc.get("error"):
            t.add_row(str(lc.get("model")), "[red]error[/]", escape(lc["error"]), "", "", "", "", "")
            continue
        footprint = max(lc["loaded_rss"] - lc["baseline_rss"], sum(lc.get("runtime_memory", {}).values()))
        cache = {True: "hit", False: "miss", None: "-"}[lc.get("cache_hit")]
        pct = lc.get("reclaimed_percent")
        t.add_row(
            lc["model"], cache, _s(lc["cold_load_s"]), _s(lc["warm_load_s"]), _b(footprint),
            _s(lc.get("first_inference_s")), _s(lc.get("unload_s")), "-" if pct is None else f"{pct:.0f}%",
        )  # fmt: skip
    console.print(t)
    if report["strategies"]:
        t = Table(
            title="2. Unload strategies (RSS of the managing process and its workers)", title_justify="left"
        )
        for col in ("model", "strategy", "loaded +", "after unload +", "reclaimed", "back in"):
            t.add_column(col)
        for st in report["strategies"]:
            if st.get("error"):
                t.add_row(
                    str(st.get("model")),
                    st.get("strategy", "?"),
                    f"[red]{escape(st['error'])}[/]",
                    "",
                    "",
                    "",
                )
                continue
            pct = st.get("reclaimed_percent")
            t.add_row(
                st["model"], st["strategy"], _b(st["loaded_rss"] - st["baseline_rss"]), _b(st["after_rss"] - st["baseline_rss"]),
                "-" if pct is None else f"{pct:.0f}%", _s(st.get("restore_s")),
            )  # fmt: skip
        console.print(t)
    t = Table(title="3. Leak detection", title_justify="left")
    for col in ("model", "cycles", "RSS after each cycle (vs baseline)", "growth", "verdict"):
        t.add_column(col)
    for cy in report["cycles"]:
        if cy.get("error"):
            t.add_row(str(cy.get("model")), "-", f"[red]{escape(cy['error'])}[/]", "", "")
            continue
        base = cy["baseline_rss"]
        series = ", ".join(f"{(r - base) / 1e6:+.1f}" for r in cy["rss_after_each"]) + " MB"
        leak = report["summary"]["per_model"].get(cy["model"], {}).get("leak", {})
        t.add_row(
            cy["model"], str(len(cy["rss_after_each"])), series, _b(cy["rss_after_each"][-1] - base) if cy["rss_after_each"] else "-",
            f"{_MARK.get(leak.get('level', ''), '')} {leak.get('label', '-')}",
        )  # fmt: skip
    console.print(t)
    summary = report["summary"]
    console.print("[bold]4. Recommendations[/]")
    if summary["loading"]:
        lo = summary["loading"]
        console.print(
            f"  Loading: {_MARK[lo['level']]} {lo['label']} (mean warm load {_s(lo['mean_warm_load_s'])}): {lo['advice']}"
        )
    if summary["memory"]:
        me = summary["memory"]
        console.print(
            f"  Memory: {_MARK[me['level']]} {me['label']} (mean reclaimed {me['mean_reclaimed_percent']:.0f}%): {me['advice']}"
        )
    if summary["resources"]:
        rp = summary["resources"]
        console.print(
            f"  Resources: largest footprint {_b(rp['largest_footprint'])}; reserve {_b(rp['per_worker_reserve'])} per worker; "
            f"{rp['n']} models need ~{_b(rp['for_n_models'])}"
        )


def plot(report: dict[str, Any], path: str | Path) -> Path:
    """Load time, first inference and footprint per model, and the memory trace of the cycles."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [lc for lc in report["lifecycles"] if not lc.get("error")]
    names = [lc["model"] for lc in ok]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    ax = axes[0][0]
    xs = range(len(ok))
    ax.bar([x - 0.2 for x in xs], [lc["cold_load_s"] or 0 for lc in ok], width=0.4, label="cold")
    ax.bar([x + 0.2 for x in xs], [lc["warm_load_s"] or 0 for lc in ok], width=0.4, label="warm")
    ax.set_xticks(list(xs), names, rotation=20, ha="right")
    ax.set_ylabel("seconds")
    ax.set_title("Load time")
    ax.legend()
    ax = axes[0][1]
    ax.bar(names, [(lc.get("first_inference_s") or 0) * 1000 for lc in ok], color="tab:green")
    ax.set_ylabel("ms")
    ax.set_title("First inference")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[1][0]
    ax.bar(
        names,
        [
            max(lc["loaded_rss"] - lc["baseline_rss"], sum(lc.get("runtime_memory", {}).values())) / 1e6
            for lc in ok
        ],
        color="tab:purple",
    )
    ax.set_ylabel("MB")
    ax.set_title("Footprint")
    ax.tick_params(axis="x", rotation=20)
    ax = axes[1][1]
    for cy in report["cycles"]:
        if cy.get("timeline"):
            ts = [t for t, _ in cy["timeline"]]
            ax.plot(
                ts, [(r - cy["baseline_rss"]) / 1e6 for _, r in cy["timeline"]], marker="o", label=cy["model"]
            )
    ax.axhline(10, color="orange", linestyle="--", linewidth=1, label="10 MB (caution)")
    ax.set_xlabel("seconds")
    ax.set_ylabel("RSS vs baseline, MB")
    ax.set_title("Memory over load/unload cycles")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


__all__ = ["plot", "render"]
