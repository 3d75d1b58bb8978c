"""The benchmark's logic: thresholds, verdicts, plans and its JSON shape (never timings)."""

from __future__ import annotations

import anyio
import pytest

from modelmora.cli import bench

MB = 1_000_000


@pytest.mark.parametrize(
    ("seconds", "level"),
    [
        (0.3, "excellent"),
        (1.99, "excellent"),
        (2.0, "good"),
        (4.9, "good"),
        (5.0, "moderate"),
        (9.9, "moderate"),
        (10.0, "poor"),
        (60, "poor"),
    ],
)
def test_load_verdict_thresholds(seconds: float, level: str) -> None:
    assert bench.load_verdict(seconds).level == level


@pytest.mark.parametrize(
    ("percent", "level"),
    [
        (100, "excellent"),
        (90.1, "excellent"),
        (90, "good"),
        (70, "good"),
        (69.9, "moderate"),
        (50, "moderate"),
        (49.9, "poor"),
        (0, "poor"),
    ],
)
def test_reclamation_verdict_thresholds(percent: float, level: str) -> None:
    verdict = bench.reclamation_verdict(percent)
    assert verdict.level == level
    assert ("isolation" in verdict.advice) == (level in ("moderate", "poor"))


@pytest.mark.parametrize(
    ("growth", "label"),
    [
        (-5 * MB, "PASS"),
        (0, "PASS"),
        (9.9 * MB, "PASS"),
        (10 * MB, "CAUTION"),
        (50 * MB, "CAUTION"),
        (50.1 * MB, "FAIL"),
    ],
)
def test_leak_verdict_thresholds(growth: float, label: str) -> None:
    assert bench.leak_verdict(growth).label == label


def test_reclamation_percent() -> None:
    assert bench.reclamation_percent(100 * MB, 200 * MB, 110 * MB) == pytest.approx(90.0)
    assert bench.reclamation_percent(100 * MB, 200 * MB, 250 * MB) == 0.0  # grew further: nothing came back
    assert bench.reclamation_percent(100 * MB, 200 * MB, 50 * MB) == 100.0  # below baseline: capped
    assert bench.reclamation_percent(100 * MB, 100 * MB, 100 * MB) is None  # the load added nothing
    assert bench.reclamation_percent(100 * MB, 100 * MB + 1000, 100 * MB) is None  # noise, not a model


def test_resource_plan_uses_one_and_a_half_times_the_largest() -> None:
    plan = bench.resource_plan([90 * MB, 420 * MB, 300 * MB], n=10)
    assert plan is not None
    assert plan.largest_footprint == 420 * MB
    assert plan.per_worker_reserve == 630 * MB
    assert plan.for_n_models == 6300 * MB
    assert bench.resource_plan([]) is None


def test_summary_shape_and_recommendations() -> None:
    lifecycles = [
        {
            "model": "a",
            "warm_load_s": 1.0,
            "reclaimed_percent": 95.0,
            "loaded_rss": 200 * MB,
            "baseline_rss": 100 * MB,
            "runtime_memory": {},
        },
        {
            "model": "b",
            "warm_load_s": 7.0,
            "reclaimed_percent": 40.0,
            "loaded_rss": 100 * MB,
            "baseline_rss": 100 * MB,
            "runtime_memory": {"cuda:0": 500 * MB},
        },
        {"model": "c", "error": "boom"},
    ]
    cycles = [{"model": "a", "baseline_rss": 100 * MB, "rss_after_each": [101 * MB, 130 * MB]}]
    summary = bench.summarise(lifecycles, [], cycles)
    assert summary["per_model"]["a"]["load"]["level"] == "excellent"
    assert summary["per_model"]["b"]["reclamation"]["level"] == "poor"
    assert (
        summary["per_model"]["a"]["leak"]["label"] == "CAUTION"
        and summary["per_model"]["a"]["leak"]["growth_bytes"] == 30 * MB
    )
    assert "c" not in summary["per_model"]
    assert summary["loading"]["mean_warm_load_s"] == 4.0 and summary["loading"]["level"] == "good"
    assert summary["memory"]["mean_reclaimed_percent"] == 67.5 and summary["memory"]["level"] == "moderate"
    assert summary["resources"]["largest_footprint"] == 500 * MB  # runtime-reported beats RSS


SIM_CONFIG = {
    "models": {"tiny": {"memory": "1GB", "options": {"load_time": 0.01}}},
}


def test_worker_subprocess_runs_a_lifecycle_on_the_simulated_runtime() -> None:
    result = bench.run_in_subprocess(
        {"kind": "lifecycle", "config": SIM_CONFIG, "model": "tiny"}, timeout=120
    )
    assert result.get("error") is None, result
    assert result["model"] == "tiny" and result["provider"] == "simulated"
    assert result["cold_load_s"] > 0 and result["warm_load_s"] > 0
    assert result["runtime_memory"] == {"cuda:0": 10**9}
    assert result["reclaimed_percent"] == 100.0  # the runtime reports freeing all it held
    assert result["first_inference_s"] is None  # a string stands in for the model: nothing to call


def test_worker_cycles_and_offload_strategy() -> None:
    cycles = bench.run_in_subprocess(
        {"kind": "cycles", "config": SIM_CONFIG, "model": "tiny", "cycles": 3}, timeout=120
    )
    assert len(cycles["rss_after_each"]) == 3 and len(cycles["timeline"]) == 7
    offload = bench.run_in_subprocess(
        {"kind": "strategy", "config": SIM_CONFIG, "model": "tiny", "strategy": "offload"}, timeout=120
    )
    assert offload.get("error") is None and offload["strategy"] == "offload" and offload["restore_s"] > 0


def test_worker_reports_errors_as_data() -> None:
    result = bench.run_in_subprocess(
        {"kind": "lifecycle", "config": SIM_CONFIG, "model": "nope"}, timeout=120
    )
    assert "unknown model 'nope'" in result["error"]


def test_bench_command_json_and_plot(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json

    from typer.testing import CliRunner

    from modelmora.cli import app

    cfg = tmp_path / "mm.yaml"
    cfg.write_text("models:\n  tiny:\n    memory: 2GB\n    options: {load_time: 0.01}\n")
    png = tmp_path / "out.png"
    result = CliRunner().invoke(
        app, ["bench", "tiny", "-c", str(cfg), "--cycles", "2", "--json", "--plot", str(png)]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report) == {"machine", "lifecycles", "strategies", "cycles", "summary"}
    assert [s["strategy"] for s in report["strategies"]] == ["gc", "subprocess", "offload"]
    assert report["summary"]["resources"]["largest_footprint"] == 2 * 10**9
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    bad = CliRunner().invoke(app, ["bench", "tiny", "-c", str(cfg), "--strategies", "gc,magic"])
    assert bad.exit_code == 2 and "unknown strategy 'magic'" in bad.output


def test_a_failed_strategy_row_names_its_strategy_and_the_command_exits_non_zero(
    tmp_path, monkeypatch
) -> None:  # type: ignore[no-untyped-def]
    from typer.testing import CliRunner

    from modelmora.cli import app

    failed = anyio.run(
        bench.run_worker, {"kind": "strategy", "config": SIM_CONFIG, "model": "nope", "strategy": "gc"}
    )
    assert failed["strategy"] == "gc", failed  # the table showed '?'

    real = bench.run_in_subprocess
    reason = "AttributeError: 'GPT2LMHeadModel' object has no attribute 'encode' | the whole reason, not cut"

    def worker(task, **kw):  # type: ignore[no-untyped-def]
        if task["kind"] == "strategy" and task["strategy"] == "subprocess":
            return {"error": reason, "model": task["model"], "strategy": "subprocess"}
        return real(task, **kw)

    monkeypatch.setattr(bench, "run_in_subprocess", worker)
    cfg = tmp_path / "mm.yaml"
    cfg.write_text("models:\n  tiny:\n    memory: 2GB\n")
    result = CliRunner().invoke(
        app, ["bench", "tiny", "-c", str(cfg), "--cycles", "1"], env={"COLUMNS": "400"}
    )
    assert result.exit_code == 1, result.output
    assert reason in result.stdout.replace("\n", "")


class _Meter:
    """A deterministic stand-in for the process's memory: a load adds 20 MB, the first
    inference after it 60 MB more (weights mapped from their files become resident as
    they are touched), and each unload gives back all but 10 MB."""

    def __init__(self) -> None:
        self.bytes = 500 * MB
        self.added = 0

    def grow(self, n: int) -> None:
        self.bytes += n
        self.added += n

    def give_back(self) -> None:
        self.bytes -= self.added - 10 * MB
        self.added = 0


def test_the_lifecycle_and_gc_rows_measure_reclamation_the_same_way(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Issue 26: the first table said MiniLM's unload reclaimed 57 %, the gc row 92 % for
    the same in-process unload: one measured without an inference, the other after one."""
    from modelmora import ModelManager
    from modelmora.memory import StaticProbe
    from modelmora.providers.base import Handle
    from modelmora.providers.simulated import SimulatedProvider
    from modelmora.spec import ModelSpec

    meter = _Meter()

    class Model:
        touched = False

        def encode(self, texts: list[str]) -> list[int]:
            if not self.touched:
                self.touched = True
                meter.grow(60 * MB)
            return [len(t) for t in texts]

    class InProcess(SimulatedProvider):
        async def load(self, spec: ModelSpec) -> Handle:
            handle = await super().load(spec)
            meter.grow(20 * MB)
            return Handle(spec=spec, provider=self.name, memory=handle.memory, _obj=Model())

        async def unload(self, handle: Handle) -> dict[str, int]:
            meter.give_back()
            return await super().unload(handle)

    monkeypatch.setattr(bench, "rss", lambda: meter.bytes)
    monkeypatch.setattr(bench, "tree_memory", lambda: meter.bytes)
    monkeypatch.setattr(
        bench,
        "_worker_manager",
        lambda config: ModelManager(config, providers={"simulated": InProcess()}, probe=StaticProbe({})),
    )
    config = {"models": {"m": {"memory": "80MB", "device": "cpu"}}}
    lifecycle = anyio.run(bench._lifecycle, config, "m")
    gc_row = anyio.run(bench._strategy, config, "m", "gc")
    assert gc_row.reclaimed_percent == pytest.approx(87.5)  # 70 of the 80 MB a used model holds
    assert lifecycle.reclaimed_percent == gc_row.reclaimed_percent


@pytest.mark.torch
def test_the_isolated_worker_row_works_for_a_causal_lm(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Issue 26: `bench --quick`'s tiny GPT-2 row failed with "'GPT2LMHeadModel' object has
    no attribute 'encode'": the isolated worker was probed as a sentence encoder."""
    pytest.importorskip("torch", reason="the torch extra is not installed (pip install 'modelmora[torch]')")
    from modelmora.testing.models import make_tiny_causal_lm

    lm = make_tiny_causal_lm(tmp_path / "lm")
    spec = {"provider": "torch", "target": str(lm), "device": "cpu", "memory": "2MB",
            "options": {"auto_class": "AutoModelForCausalLM"}}  # fmt: skip
    row = bench.run_in_subprocess(
        {"kind": "strategy", "config": {"models": {"lm": spec}}, "model": "lm", "strategy": "subprocess"},
        timeout=300,
    )
    assert row.get("error") is None, row["error"]
    assert row["strategy"] == "subprocess" and row["restore_s"] > 0
