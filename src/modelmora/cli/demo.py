"""``modelmora demo``: the README's main job, end to end with no server and no GPU.

A five-step chain over three in-process models under a CPU budget too small for all of
them, so the plan has to swap: the real all-MiniLM-L6-v2 finds the key sentence of a
text, a stand-in GPT-2 drafts from it, a stand-in image pipeline illustrates the draft,
the GPT-2 writes a title, and MiniLM scores the result against the text.  Stand-ins have
random weights (this machine reaches no model hub), so their text is noise — what is
real is every load, reuse, unload and measured byte.  ``--ollama URL`` runs the same
shape of chain on an Ollama server's models instead.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import anyio
import httpx
from rich.console import Console
from rich.markup import escape

from .. import events as ev
from ..chain import Chain, ChainResult, Step, plan_next_use
from ..chain.llm import complete
from ..chain.report import ConsoleObserver, render_plan, render_result
from ..config import ManagerConfig
from ..core import ModelManager
from ..extras import install_hint
from ..providers.base import Handle
from ..spec import format_size
from .timeline import MemoryTimeline

TEXT = (
    "Small teams run several local models on one machine. "
    "Each model fits in memory alone, but they do not fit together. "
    "A manager that loads models on demand and lets them go when a plan says so keeps the box usable. "
    "Measured memory, not guesses, decides what stays."
)

DEFAULT_BUDGET = "150MB"


@dataclass(frozen=True)
class Note:
    """What flows between the demo's steps; prints as its newest part."""

    text: str
    key: str = ""
    draft: str = ""
    image: str = ""
    title: str = ""
    score: float | None = None
    latest: str = field(default="", compare=False)

    def __str__(self) -> str:
        return self.latest or self.text


def _sentences(text: str) -> list[str]:
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]


# -- in-process steps (torch; run in worker threads by the chain) --------------------------


def find_key_sentence(model: Any, note: Note) -> Note:
    """MiniLM: the sentence closest to the text's mean embedding."""
    sentences = _sentences(note.text)
    vectors = model.encode(sentences, normalize_embeddings=True, convert_to_tensor=True)
    centre = vectors.mean(dim=0)
    best = int((vectors @ centre).argmax())
    key = sentences[best]
    return replace(note, key=key, latest=f"key sentence: {key!r}")


def _generate(handle: Handle, prompt: str, tokens: int) -> str:
    import torch

    tokenizer = handle.extras["tokenizer"]
    model = handle.obj
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **inputs, max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    return str(tokenizer.decode(out[0][inputs["input_ids"].shape[1] :], skip_special_tokens=True)).strip()


def draft(handle: Handle, note: Note) -> Note:
    text = _generate(handle, note.key, 24)
    return replace(note, draft=text, latest=f"draft (random weights): {text!r}")


def write_title(handle: Handle, note: Note) -> Note:
    text = _generate(handle, f"Title: {note.draft[:40]}", 8)
    return replace(note, title=text, latest=f"title (random weights): {text!r}")


def illustrate(pipe: Any, note: Note) -> Note:
    image = pipe(note.draft or note.key)[0]
    summary = f"{tuple(image.shape[-2:])} image, mean {float(image.mean()):+.3f}"
    return replace(note, image=summary, latest=f"illustration: {summary}")


def score(model: Any, note: Note) -> Note:
    """MiniLM again: how close the key sentence stays to the whole text (cosine)."""
    a, b = model.encode([note.text, note.key + " " + note.title], normalize_embeddings=True)
    value = float((a * b).sum())
    return replace(note, score=value, latest=f"similarity of key sentence + title to the text: {value:.3f}")


def _import_libraries() -> None:
    import sentence_transformers  # noqa: F401
    import transformers  # noqa: F401


def local_models() -> dict[str, dict[str, Any]]:
    """The demo's registry: one real pretrained model and two stand-ins made on first run."""
    from .quick import home, require_torch

    require_torch()
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..testing.models import make_tiny_causal_lm, minilm_path

    writer = make_tiny_causal_lm(home() / "demo-gpt2-6x384", layers=6, hidden=384)
    return {
        "all-MiniLM-L6-v2": {
            "provider": "torch", "target": str(minilm_path()), "device": "cpu", "memory": "91MB",
            "load_time": 3.0, "options": {"kind": "sentence-transformers"},
        },
        "tiny-gpt2-writer": {
            "provider": "torch", "target": str(writer), "device": "cpu", "memory": "45MB",
            "load_time": 1.0, "options": {"auto_class": "AutoModelForCausalLM"},
        },
        "tiny-image-pipe": {
            "provider": "torch", "target": "modelmora.testing.models:tiny_image_pipeline", "device": "cpu",
            "memory": "42MB", "load_time": 0.5,
            "options": {"kwargs": {"size": 64, "channels": 16, "text_vocab": 20000}},
        },
    }  # fmt: skip


LOCAL_KINDS = {
    "all-MiniLM-L6-v2": "real, pretrained",
    "tiny-gpt2-writer": "stand-in, random weights",
    "tiny-image-pipe": "stand-in, random weights",
}


def local_chain(budget: str) -> tuple[Chain, dict[str, str], str]:
    config = ManagerConfig.from_dict(
        {"models": local_models(), "budgets": {"cpu": budget}, "idle_ttl": 0}, source="demo"
    )
    embed, writer, pipe = "all-MiniLM-L6-v2", "tiny-gpt2-writer", "tiny-image-pipe"
    steps = [
        Step(embed, call=find_key_sentence, name="find the key sentence"),
        Step(writer, call=draft, name="draft from it"),
        Step(pipe, call=illustrate, name="illustrate the draft"),
        Step(writer, call=write_title, name="write a title"),
        Step(embed, call=score, name="score against the text"),
    ]
    return Chain(steps, config=config, management={}), LOCAL_KINDS, "cpu"


# -- Ollama steps ----------------------------------------------------------------------


async def _embed(handle: Handle, texts: list[str]) -> list[list[float]]:
    assert handle.endpoint is not None
    body: dict[str, Any] = {"model": handle.target, "input": texts}
    if handle.keep_alive is not None:
        body["keep_alive"] = handle.keep_alive
    async with httpx.AsyncClient(base_url=handle.endpoint, timeout=60) as client:
        response = await client.post("/api/embed", json=body)
        response.raise_for_status()
        return [list(map(float, v)) for v in response.json()["embeddings"]]


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=False))
    na, nb = sum(x * x for x in a) ** 0.5, sum(y * y for y in b) ** 0.5
    return dot / (na * nb) if na and nb else 0.0


async def ollama_key_sentence(handle: Handle, note: Note) -> Note:
    sentences = _sentences(note.text)
    vectors = await _embed(handle, sentences)
    centre = [sum(col) / len(vectors) for col in zip(*vectors, strict=True)]
    key = max(zip(sentences, vectors, strict=True), key=lambda sv: _cos(sv[1], centre))[0]
    return replace(note, key=key, latest=f"key sentence: {key!r}")


async def ollama_draft(handle: Handle, note: Note) -> Note:
    text = await complete(handle, f"Write two sentences that expand on: {note.key}", {"max_tokens": 96})
    return replace(note, draft=text, latest=f"draft: {text!r}")


async def ollama_title(handle: Handle, note: Note) -> Note:
    text = await complete(handle, f"A title of at most six words for: {note.draft}", {"max_tokens": 24})
    return replace(note, title=text, latest=f"title: {text!r}")


async def ollama_score(handle: Handle, note: Note) -> Note:
    a, b = await _embed(handle, [note.text, note.key + " " + note.title])
    value = _cos(a, b)
    return replace(note, score=value, latest=f"similarity of key sentence + title to the text: {value:.3f}")


def ollama_chain(
    url: str, llm: str, embed: str, budget: str | None, device: str
) -> tuple[Chain, dict[str, str], str]:
    management: dict[str, Any] = {"provider": "ollama", "base_url": url, "idle_ttl": 0}
    if budget is not None:
        management["budgets"] = {device: budget}
    management["providers"] = {"ollama": {"device": device}}
    steps = [
        Step(embed, call=ollama_key_sentence, name="find the key sentence"),
        Step(llm, call=ollama_draft, name="draft from it"),
        Step(llm, call=ollama_title, name="write a title"),
        Step(embed, call=ollama_score, name="score against the text"),
    ]
    kinds = {f"ollama/{llm}": "Ollama", f"ollama/{embed}": "Ollama"}
    return Chain(steps, management=management), kinds, device


# -- the job ---------------------------------------------------------------------------


@dataclass
class DemoReport:
    result: ChainResult
    peak: int
    budget: int | None
    plot: Path | None
    loads: int
    seed_loads: int
    memory: Mapping[str, dict[str, int]]


async def run_demo(
    console: Console,
    *,
    text: str = TEXT,
    budget: str | None = None,
    plot: Path | None = Path("modelmora-demo.png"),
    ollama: str | None = None,
    llm: str = "llama3.2:3b",
    embed: str = "nomic-embed-text",
    device: str = "cuda:0",
) -> DemoReport:
    if ollama is None:
        chain, kinds, dev = local_chain(budget or DEFAULT_BUDGET)
        # import the libraries first, so the RSS line shows models rather than imports
        await anyio.to_thread.run_sync(_import_libraries)
    else:
        chain, kinds, dev = ollama_chain(ollama, llm, embed, budget, device)
    memory: dict[str, dict[str, int]] = {}
    async with chain:
        mm: ModelManager = chain.manager
        mm.events.subscribe(
            lambda e: memory.__setitem__(e.model, dict(e.memory)) if isinstance(e, ev.Loaded) else None
        )
        plan = await chain.plan()
        limit = mm.budgets.get(dev)
        console.print(
            f"[bold]modelmora demo[/]: {len(chain.steps)} steps over {len(plan.models)} models, "
            f"{dev} budget {format_size(limit) if limit else 'none'}",
            highlight=False,
        )
        for name in plan.models:
            console.print(
                f"  {name}: {kinds.get(name, '')}, estimate {format_size(sum(plan.models[name].memory.values()))}",
                highlight=False,
            )
        render_plan(console, plan)
        timeline = MemoryTimeline(mm, device=dev).attach()
        observer = ConsoleObserver(console, mm, len(chain.steps), kinds=kinds, timeline=timeline)
        async with anyio.create_task_group() as tg:
            await tg.start(timeline.poll, 0.05)
            result = await chain.run(Note(text), observer=observer)
            timeline.sample("end")
            tg.cancel_scope.cancel()
        left = mm.loaded()
    render_result(console, result, kinds=kinds)
    seed = plan_next_use([s.model for s in plan.steps], plan.models)
    peak = timeline.peak()
    console.print(
        f"peak measured use {format_size(peak)}"
        + (f" of the {format_size(limit)} {dev} budget" if limit else "")
        + f"; {result.loads} loads where the keep-only-if-the-next-step-reuses rule needs {seed.loads}; "
        f"left loaded: {', '.join(left) or 'nothing'}",
        highlight=False,
        soft_wrap=True,
    )
    written = None
    if plot is not None:
        try:
            written = timeline.plot(plot, budget=limit, title=f"modelmora demo: {dev} memory per model")
        except ImportError:
            console.print(
                f"[yellow]no plot: matplotlib is not installed ({escape(install_hint('bench'))})[/]"
            )
        else:
            console.print(f"memory timeline written to {written}", highlight=False)
    return DemoReport(result, peak, limit, written, result.loads, seed.loads, memory)


__all__ = ["DEFAULT_BUDGET", "TEXT", "DemoReport", "Note", "local_models", "run_demo"]
