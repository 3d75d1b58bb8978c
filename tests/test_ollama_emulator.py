"""The emulator speaks Ollama's protocol: the official `ollama` client (and the `openai`
client for `/v1`) parses every answer, and each behaviour modelmora depends on follows the
real server's source (github.com/ollama/ollama), named in the test."""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta

import httpx
import ollama
import openai
import pytest
from conftest import stream_in_background, wait_for

from modelmora.testing.ollama import (
    GIB,
    MIB,
    ModelName,
    OllamaEmulator,
    parse_go_duration,
    parse_keep_alive,
    vram_default_context,
)

OLLAMA_STRICT = True  # the make_ollama fixture gives this module the real-like emulator
Start = Callable[..., OllamaEmulator]
KV = 131072  # bytes per token of context for the default architecture (32 x 8 x 128 x 2 x 2)


def test_official_client_parses_every_endpoint(make_ollama: Start) -> None:
    emu = make_ollama()
    with ollama.Client(host=emu.url) as client:
        check_every_endpoint(emu, client)


def check_every_endpoint(emu: OllamaEmulator, client: ollama.Client) -> None:
    loaded = client.generate(model="mistral-small:22b", prompt="")
    assert (loaded.done, loaded.done_reason, loaded.response) == (True, "load", "")
    ps = client.ps()
    [m] = ps.models
    # a "24GB" card is 22.4 GiB: the 4096-token tier; the KV cache of 4096 tokens is in `size`
    assert m.model == "mistral-small:22b" and m.size == 13_000_000_000 + 4096 * KV == m.size_vram
    assert m.details is not None and m.details.family == "llama" and m.context_length == 4096
    assert m.expires_at is not None and m.expires_at > datetime.now(m.expires_at.tzinfo)
    streamed = list(client.generate(model="mistral-small:22b", prompt="hello there", stream=True))
    assert streamed[-1].done and streamed[-1].done_reason == "stop"
    assert "".join(c.response or "" for c in streamed).endswith(" hello there")
    reply = client.chat(model="mistral-small:22b", messages=[{"role": "user", "content": "hi you"}])
    assert reply.message.role == "assistant" and reply.message.content.endswith(" hi you")
    chunks = list(
        client.chat(model="mistral-small:22b", messages=[{"role": "user", "content": "x"}], stream=True)
    )
    assert chunks[-1].done
    emb = client.embed(model="nomic-embed-text", input=["a", "b"])
    assert len(emb.embeddings) == 2 and len(emb.embeddings[0]) == 8
    assert client.embed(model="nomic-embed-text", input=[]).embeddings == []  # loads, embeds nothing
    listing = client.list()
    assert {x.model for x in listing.models} == {
        "mistral-small:22b",
        "qwen2.5:14b",
        "nomic-embed-text:latest",
    }
    shown = client.show("qwen2.5:14b")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 8192
    assert shown.capabilities == ["completion"]
    unloaded = client.generate(model="mistral-small:22b", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    assert [x.model for x in client.ps().models] == ["nomic-embed-text:latest"]
    assert client.delete("qwen2.5:14b").status == "success"
    with pytest.raises(ollama.ResponseError) as info:
        client.generate(model="nope", prompt="")
    assert info.value.status_code == 404 and "not found" in info.value.error
    assert httpx.get(f"{emu.url}/api/version").json() == {"version": "0.5.7"}
    assert httpx.get(emu.url).text == "Ollama is running"


def test_the_simpler_mode_still_parses(make_ollama: Start) -> None:
    emu = make_ollama(strict=False)
    with ollama.Client(host=emu.url) as client:
        client.generate(model="nomic-embed-text", prompt="", keep_alive=0)
        client.embed(model="nomic-embed-text", input="a")
        [m] = client.ps().models
        assert (m.model, m.size, m.context_length) == ("nomic-embed-text", 300_000_000, 2048)


def test_openai_compatible_endpoint(make_ollama: Start) -> None:
    emu = make_ollama()
    r = httpx.post(
        f"{emu.url}/v1/chat/completions",
        json={"model": "qwen2.5:14b", "messages": [{"role": "user", "content": "ping"}], "keep_alive": 0},
    )
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"].endswith(" ping")
    assert emu.loaded() == ["qwen2.5:14b"]  # keep_alive has no effect through /v1
    assert httpx.get(f"{emu.url}/v1/models").json()["data"][0]["object"] == "model"


def test_v1_errors_have_openais_shape_and_completions_stream(make_ollama: Start) -> None:
    """openai/openai.go NewError ({"error": {"message", "type", ...}}, type by status) and
    ToCompleteChunk (/v1/completions streams text_completion pieces)."""
    emu = make_ollama()
    client = openai.OpenAI(base_url=f"{emu.url}/v1", api_key="ollama", max_retries=0)
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "model 'nope' not found",
        "type": "not_found_error",
        "param": None,
        "code": None,
    }
    with pytest.raises(openai.BadRequestError, match="does not support generate"):
        client.completions.create(model="nomic-embed-text", prompt="x")
    pieces = list(client.completions.create(model="qwen2.5:14b", prompt="stream me", stream=True))
    assert "".join(p.choices[0].text for p in pieces).endswith(" stream me")
    assert pieces[-1].choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model="qwen2.5:14b", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content is not None and chat.choices[0].message.content.endswith(" hi")


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (1.5, 1.5),
        (-1, math.inf),
        ("10m", 600.0),
        ("1h30m", 5400.0),
        ("-1m", math.inf),
        ("0", 0.0),
        ("500ms", 0.5),
        (None, 300.0),
    ],
)
def test_keep_alive_parsing_like_go(value: object, seconds: float) -> None:
    assert parse_keep_alive(value, 300.0) == seconds


@pytest.mark.parametrize("value", ["300", "5 minutes", "", "m", True, [1], {"a": 1}])
def test_keep_alive_rejects_what_ollama_rejects(value: object) -> None:
    with pytest.raises(ValueError):
        parse_keep_alive(value, 300.0)


def test_bare_numeric_string_is_a_400_with_gos_words(make_ollama: Start) -> None:
    emu = make_ollama()
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": "300"})
    assert r.status_code == 400 and r.json()["error"] == 'time: missing unit in duration "300"'
    assert parse_go_duration("2h45m30.5s") == 2 * 3600 + 45 * 60 + 30.5


def test_negative_keep_alive_means_forever(make_ollama: Start) -> None:
    emu = make_ollama()
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": -1})
    expires = datetime.fromisoformat(httpx.get(f"{emu.url}/api/ps").json()["models"][0]["expires_at"])
    assert expires - datetime.now(expires.tzinfo) > timedelta(days=365 * 100)


def test_models_expire_on_their_timer_and_unload_is_answered_before_memory_is_free(
    make_ollama: Start,
) -> None:
    emu = make_ollama(unload_delay=0.3)
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": 1})
    assert emu.loaded() == ["qwen2.5:14b"]  # for 1.3 s: 1 s of keep-alive, then the unload's 0.3 s
    deadline = time.monotonic() + 30
    while emu.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert emu.loaded() == [] and emu.stats.unloads == 1
    # an unload that takes a minute: still listed after the answer, however slow the machine
    slow = make_ollama(unload_delay=60)
    httpx.post(f"{slow.url}/api/generate", json={"model": "qwen2.5:14b"})
    r = httpx.post(f"{slow.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": 0}).json()
    assert r["done_reason"] == "unload"
    assert slow.loaded() == ["qwen2.5:14b"]  # still listed: the runner is shutting down
    assert slow.state.runners["qwen2.5:14b"].unloading_until is not None


def test_max_loaded_models_and_victim_choice(make_ollama: Start) -> None:
    emu = make_ollama(models={"a": "1GB", "b": "1GB", "c": "1GB"}, max_loaded=2)
    httpx.post(f"{emu.url}/api/generate", json={"model": "a", "keep_alive": "1h"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "b", "keep_alive": "1m"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "c", "keep_alive": "30m"})
    assert sorted(emu.loaded()) == ["a:latest", "c:latest"]  # b had the shortest keep-alive


def test_partial_offload_of_a_model_alone(make_ollama: Start) -> None:
    """server/sched.go processPending: the first model loads without requireFull."""
    emu = make_ollama(models={"huge": "42GB"}, vram="24GB")
    httpx.post(f"{emu.url}/api/generate", json={"model": "huge"})
    [huge] = httpx.get(f"{emu.url}/api/ps").json()["models"]
    assert huge["size"] == 42_000_000_000 + 4096 * KV and huge["size_vram"] == 24_000_000_000


def test_options_that_differ_force_a_reload(make_ollama: Start) -> None:
    emu = make_ollama()
    body = {"model": "qwen2.5:14b", "options": {"num_ctx": 4096}}
    httpx.post(f"{emu.url}/api/generate", json=body)
    httpx.post(f"{emu.url}/api/generate", json=body)
    assert emu.stats.reloads == 0 and emu.stats.loads == 1
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "options": {"num_ctx": 8192}})
    assert emu.stats.reloads == 1 and emu.stats.loads == 2
    assert httpx.get(f"{emu.url}/api/ps").json()["models"][0]["context_length"] == 8192


def test_faults(make_ollama: Start) -> None:
    emu = make_ollama()
    emu.busy(1)
    assert httpx.get(f"{emu.url}/api/ps").status_code == 503
    emu.oom_next("qwen2.5:14b")
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    assert r.status_code == 500 and "out of memory" in r.json()["error"]
    with emu.refuse_connections(), pytest.raises(httpx.ConnectError):
        httpx.get(f"{emu.url}/api/ps")
    assert httpx.get(f"{emu.url}/api/ps").status_code == 200


def test_older_servers_omit_context_length(make_ollama: Start) -> None:
    emu = make_ollama(report_context_length=False)
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    with ollama.Client(host=emu.url) as client:
        [m] = client.ps().models
    assert m.context_length is None


def test_embeddings_are_unit_length_as_ollamas_are(make_ollama: Start) -> None:
    """Real Ollama L2-normalises /api/embed and /v1/embeddings vectors; clients rely on a
    dot product being the cosine."""
    emu = make_ollama()
    texts = ["a", "modelmora keeps models resident"]
    native = httpx.post(f"{emu.url}/api/embed", json={"model": "nomic-embed-text", "input": texts})
    openai = httpx.post(f"{emu.url}/v1/embeddings", json={"model": "nomic-embed-text", "input": texts})
    vectors = [*native.json()["embeddings"], *(d["embedding"] for d in openai.json()["data"])]
    assert [math.sqrt(sum(x * x for x in v)) for v in vectors] == pytest.approx([1.0] * 4, abs=1e-9)
    assert vectors[0] == vectors[2] and vectors[1] == vectors[3]  # same text, same vector, both routes
    assert vectors[0] != vectors[1]


# -- 1. names ----------------------------------------------------------------------------


def test_names_ignore_case_take_prefixes_and_always_carry_a_tag(make_ollama: Start) -> None:
    """types/model/name.go ParseName (defaults registry.ollama.ai/library/…:latest) and
    DisplayShortest (what /api/ps and /api/tags list); server/routes.go getExistingName
    (parts matched ignoring case); GenerateHandler answers with the name as sent."""
    emu = make_ollama(
        models={"nomic-embed-text": {"size": "300MB", "embedding": True}, "hf.co/Org/Repo:Q4": "1GB"}
    )
    for name in (
        "Nomic-Embed-Text",
        "registry.ollama.ai/library/nomic-embed-text:LATEST",
        "library/nomic-embed-text",
    ):
        r = httpx.post(f"{emu.url}/api/embed", json={"model": name, "input": "x"})
        assert r.status_code == 200 and r.json()["model"] == name
    assert emu.loaded() == ["nomic-embed-text:latest"] and emu.stats.loads == 1  # one model
    httpx.post(f"{emu.url}/api/generate", json={"model": "HF.CO/org/repo:q4"})
    assert sorted(emu.loaded()) == ["hf.co/Org/Repo:Q4", "nomic-embed-text:latest"]
    assert httpx.post(f"{emu.url}/api/generate", json={"model": "nomic-embed-text:v2"}).status_code == 404
    assert ModelName.parse("x").display() == "x:latest"
    assert ModelName.parse("me/x:1b").display() == "me/x:1b"


# -- 2. unloading an embedding model -----------------------------------------------------


def test_empty_generate_with_keep_alive_0_unloads_an_embedding_model(make_ollama: Start) -> None:
    """server/routes.go GenerateHandler: the unload (Scheduler.expireRunner) comes before the
    capability check, so it works for models that cannot generate."""
    emu = make_ollama()
    httpx.post(f"{emu.url}/api/embed", json={"model": "nomic-embed-text", "input": ""})
    assert emu.loaded() == ["nomic-embed-text:latest"]
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "nomic-embed-text", "keep_alive": 0})
    assert r.status_code == 200 and r.json()["done_reason"] == "unload" and emu.loaded() == []
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "nomic-embed-text", "prompt": "x"})
    assert r.status_code == 400 and r.json()["error"] == '"nomic-embed-text" does not support generate'
    assert emu.stats.loads == 1


def test_embed_with_keep_alive_0_loads_reloads_then_unloads(make_ollama: Start) -> None:
    """server/routes.go EmbedHandler has no unload shortcut: scheduleRunner loads the model
    (or reloads it when needsReload), and keep_alive 0 unloads it when the request ends."""
    emu = make_ollama()
    unload = {"model": "nomic-embed-text", "input": "", "keep_alive": 0}
    httpx.post(f"{emu.url}/api/embed", json=unload)
    assert emu.stats.loads == 1 and emu.loaded() == []  # a load, just to unload
    httpx.post(
        f"{emu.url}/api/embed", json={"model": "nomic-embed-text", "input": "", "options": {"num_ctx": 2048}}
    )
    httpx.post(f"{emu.url}/api/embed", json=unload)  # no options: num_ctx differs
    assert (emu.stats.loads, emu.stats.reloads, emu.loaded()) == (3, 1, [])


# -- 3. Ollama's own memory rule ---------------------------------------------------------


def test_default_context_by_vram_tier_and_trained_context(make_ollama: Start) -> None:
    """server/routes.go Serve (4096 / 32768 / 262144 at 23 and 47 GiB), effectiveContext
    (capped at the trained context), usesAutomaticNumCtx (the Modelfile's num_ctx counts)."""
    assert [vram_default_context(v * GIB) for v in (8, 22, 23, 24, 46, 47, 80)] == [
        4096, 4096, 32768, 32768, 32768, 262144, 262144,
    ]  # fmt: skip
    models = {"long:1b": {"size": "1GB", "context_length": 131072}, "short:1b": {"size": "1GB", "context_length": 8192},
              "fixed:1b": {"size": "1GB", "context_length": 131072, "modelfile_num_ctx": 16384}}  # fmt: skip
    emu = make_ollama(models=models, vram="24GiB")
    for name in models:
        httpx.post(f"{emu.url}/api/generate", json={"model": name})
    ctx = {m["name"]: m["context_length"] for m in httpx.get(f"{emu.url}/api/ps").json()["models"]}
    assert ctx == {"long:1b": 32768, "short:1b": 8192, "fixed:1b": 16384}
    assert (
        "num_ctx 16384" in httpx.post(f"{emu.url}/api/show", json={"model": "fixed:1b"}).json()["parameters"]
    )
    on_env = make_ollama(models=models, vram="80GiB", environ={"OLLAMA_CONTEXT_LENGTH": "2048"})
    httpx.post(f"{on_env.url}/api/generate", json={"model": "long:1b"})
    assert httpx.get(f"{on_env.url}/api/ps").json()["models"][0]["context_length"] == 2048


def test_predicted_memory_is_weights_kv_cache_and_graph(make_ollama: Start) -> None:
    """llm/llama_server.go PredictServerVRAM (weights + 2 x layers x kv heads x head dim x
    ctx x 2 bytes) and server/sched.go generationBatchSurcharge (768 MiB above 4096 tokens
    for completion models with an automatic num_batch)."""
    emu = make_ollama(models={"q:7b": {"size": "4GB", "context_length": 32768}, "e:1b": {"size": "1GB", "embedding": True}}, vram="80GiB")  # fmt: skip
    httpx.post(f"{emu.url}/api/generate", json={"model": "q:7b", "options": {"num_ctx": 8192}})
    httpx.post(f"{emu.url}/api/embed", json={"model": "e:1b", "input": "", "options": {"num_ctx": 8192}})
    size = {m["name"]: m["size"] for m in httpx.get(f"{emu.url}/api/ps").json()["models"]}
    assert size == {"q:7b": 4_000_000_000 + 8192 * KV + 768 * MIB, "e:1b": 1_000_000_000 + 8192 * KV}


def test_a_model_over_80_percent_of_free_vram_evicts_another(make_ollama: Start) -> None:
    """server/sched.go load(): with models loaded, predicted > free x 80 % → evict
    (findRunnerToUnload), wait for the unload, try again."""
    emu = make_ollama(models={"small:3b": "3GB", "big:20b": "20GB", "mid:8b": "8GB"}, vram="24GB")
    httpx.post(f"{emu.url}/api/generate", json={"model": "small:3b"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "mid:8b"})  # 8.5 GB <= 80 % of 20.5 GB free
    assert sorted(emu.loaded()) == ["mid:8b", "small:3b"]
    httpx.post(f"{emu.url}/api/generate", json={"model": "big:20b"})  # fits the card, not the rule
    assert emu.loaded() == ["big:20b"] and emu.stats.evictions == 2


# -- 4. time in flight -------------------------------------------------------------------


def generating(url: str, model: str) -> threading.Thread:
    return stream_in_background(f"{url}/api/generate", {"model": model, "prompt": " ".join(["w"] * 12)})


def test_keep_alive_0_during_a_request_unloads_when_the_last_request_ends(make_ollama: Start) -> None:
    """server/sched.go expireRunner (refCount > 0: no unload yet) and processCompleted
    (refCount reaches 0 with sessionDuration 0 → unload)."""
    emu = make_ollama(token_delay=0.05)
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    with emu.generation_held():  # the request stays in flight until the checks are done
        thread = generating(emu.url, "qwen2.5:14b")
        wait_for(lambda: emu.state.runners["qwen2.5:14b"].in_flight == 1, timeout=30)
        r = httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": 0})
        assert r.json()["done_reason"] == "unload" and emu.loaded() == ["qwen2.5:14b"]  # still streaming
    thread.join()
    assert emu.loaded() == []


def test_a_held_load_finishes_when_the_test_lets_it(make_ollama: Start) -> None:
    emu = make_ollama()
    with emu.loads_held():
        thread = threading.Thread(
            target=httpx.post,
            args=(f"{emu.url}/api/generate",),
            kwargs={"json": {"model": "qwen2.5:14b"}, "timeout": 30},
        )
        thread.start()
        wait_for(lambda: "qwen2.5:14b" in emu.state.runners, timeout=30)
        assert emu.state.runners["qwen2.5:14b"].loading and emu.loaded() == [] and thread.is_alive()
    thread.join()
    assert emu.loaded() == ["qwen2.5:14b"] and emu.stats.loads == 1


def test_evicting_a_busy_runner_waits_for_its_request(make_ollama: Start) -> None:
    """server/sched.go processPending: the victim's sessionDuration is set to 0 and the
    scheduler waits on unloadedCh, which comes only once its refCount is 0."""
    emu = make_ollama(models={"a:1b": "12GB", "b:1b": "12GB"}, vram="24GB", token_delay=0.05)
    httpx.post(f"{emu.url}/api/generate", json={"model": "a:1b"})
    with emu.generation_held():  # a's request stays in flight until the checks are done
        thread = generating(emu.url, "a:1b")
        wait_for(lambda: emu.state.runners["a:1b"].in_flight == 1, timeout=30)
        b: list[httpx.Response] = []
        loading_b = threading.Thread(
            target=lambda: b.append(httpx.post(f"{emu.url}/api/generate", json={"model": "b:1b"}, timeout=30))
        )
        loading_b.start()  # needs a's room
        wait_for(lambda: emu.state.runners["a:1b"].evicting, timeout=30)  # a was chosen to make room
        assert loading_b.is_alive() and emu.loaded() == ["a:1b"] and "b:1b" not in emu.state.runners
        assert emu.state.runners["a:1b"].in_flight == 1  # a's request runs on
    thread.join()
    loading_b.join()
    assert b[0].json()["done_reason"] == "load" and emu.loaded() == ["b:1b"]


def test_runtime_oom_during_generation_expires_every_runner(make_ollama: Start) -> None:
    """server/routes.go GenerateHandler → Scheduler.expireRunnersForRuntimeOOM; a streamed
    error is a last NDJSON line with status 200 (streamResponse)."""
    emu = make_ollama(models={"a:1b": "2GB", "b:1b": "2GB"})
    for name in ("a:1b", "b:1b"):
        httpx.post(f"{emu.url}/api/generate", json={"model": name, "keep_alive": "1h"})
    emu.oom_during_generation("a:1b")
    with httpx.stream("POST", f"{emu.url}/api/generate", json={"model": "a:1b", "prompt": "x y z"}) as r:
        lines = list(r.iter_lines())
    assert r.status_code == 200 and "out of memory" in lines[-1] and '"error"' in lines[-1]
    assert emu.loaded() == []
    with ollama.Client(host=emu.url) as client:
        client.generate(model="a:1b", prompt="")
        emu.oom_during_generation("a:1b")
        with pytest.raises(ollama.ResponseError, match="out of memory") as info:
            client.generate(model="a:1b", prompt="hello there you", stream=False)
        assert info.value.status_code == 500


def test_a_load_oom_with_other_models_loaded_evicts_them_and_retries_once(make_ollama: Start) -> None:
    """server/sched.go load (IsOutOfMemory with others loaded → retry) and evictAllAndWait."""
    emu = make_ollama(models={"a:1b": "2GB", "b:1b": "2GB"})
    httpx.post(f"{emu.url}/api/generate", json={"model": "a:1b"})
    emu.oom_next("b:1b")
    assert httpx.post(f"{emu.url}/api/generate", json={"model": "b:1b"}).status_code == 200
    assert emu.loaded() == ["b:1b"]
    httpx.post(f"{emu.url}/api/generate", json={"model": "a:1b"})
    emu.oom_next("b:1b", times=2)
    httpx.post(f"{emu.url}/api/generate", json={"model": "b:1b", "keep_alive": 0})
    r = httpx.post(f"{emu.url}/api/generate", json={"model": "b:1b"})
    assert r.status_code == 500 and "cudaMalloc failed" in r.json()["error"] and emu.loaded() == []


# -- 5. the smaller differences ----------------------------------------------------------


def test_an_omitted_keep_alive_leaves_the_loaded_models_own(make_ollama: Start) -> None:
    """server/sched.go useLoadedRunner sets sessionDuration only when the request has one
    (/v1 requests never do)."""
    emu = make_ollama()
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "keep_alive": "2h"})
    httpx.post(
        f"{emu.url}/v1/chat/completions",
        json={"model": "qwen2.5:14b", "messages": [{"role": "user", "content": "x"}]},
    )
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b", "prompt": "x"})
    expires = datetime.fromisoformat(httpx.get(f"{emu.url}/api/ps").json()["models"][0]["expires_at"])
    assert expires - datetime.now(expires.tzinfo) > timedelta(hours=1)


def test_max_loaded_0_means_3_per_gpu_and_a_bad_value_warns(
    make_ollama: Start, caplog: pytest.LogCaptureFixture
) -> None:
    """envconfig/config.go Uint (a bad value warns and falls back to the default 0) and
    server/sched.go processPending (0 → defaultModelsPerGPU x GPUs)."""
    models = {f"m{i}:1b": "1GB" for i in range(7)}
    emu = make_ollama(models=models, max_loaded=0, gpus=2, vram="80GiB")
    for name in models:
        httpx.post(f"{emu.url}/api/generate", json={"model": name})
    assert len(emu.loaded()) == 6
    with caplog.at_level(logging.WARNING, logger="modelmora.testing.ollama"):
        bad = make_ollama(models=models, environ={"OLLAMA_MAX_LOADED_MODELS": "three"}, vram="80GiB")
    assert "OLLAMA_MAX_LOADED_MODELS" in caplog.text and bad.state.max_loaded == 3


def test_needs_reload_compares_runner_options_only(make_ollama: Start) -> None:
    """server/sched.go needsReload compares api.Runner (num_ctx, num_batch, num_gpu, ...),
    with defaults filled in; unknown keys such as low_vram are dropped by Options.FromMap."""
    emu = make_ollama()
    url = f"{emu.url}/api/generate"
    httpx.post(url, json={"model": "qwen2.5:14b", "options": {"num_ctx": 4096}})
    httpx.post(
        url, json={"model": "qwen2.5:14b", "options": {"num_ctx": 4096, "low_vram": True, "temperature": 0}}
    )
    httpx.post(
        url, json={"model": "qwen2.5:14b", "options": {"num_ctx": 4096, "num_batch": 512, "num_gpu": -1}}
    )
    httpx.post(url, json={"model": "qwen2.5:14b"})  # automatic num_ctx: the 4096 tier, the same
    assert emu.stats.reloads == 0
    httpx.post(url, json={"model": "qwen2.5:14b", "options": {"num_ctx": 4096, "num_batch": 256}})
    assert emu.stats.reloads == 1


def test_delete_removes_the_files_and_leaves_the_runner_loaded(make_ollama: Start) -> None:
    """server/routes.go DeleteHandler removes the manifest and layers, nothing else."""
    emu = make_ollama()
    httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"})
    assert httpx.request("DELETE", f"{emu.url}/api/delete", json={"model": "qwen2.5:14b"}).status_code == 200
    assert emu.loaded() == ["qwen2.5:14b"]
    assert httpx.post(f"{emu.url}/api/generate", json={"model": "qwen2.5:14b"}).status_code == 404
