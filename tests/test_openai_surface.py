"""Issue 26, the OpenAI surface as an SDK sees it: ``models.retrieve``, one error shape for
every error the server returns, answers that name the model that was asked for, and a
model list that says what each model serves.  A live server over loopback in front of the
Ollama emulator, with the official ``openai`` client where it applies."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from modelmora.server import create_app
from modelmora.testing.ollama import OllamaEmulator
from modelmora.testing.threaded import ThreadedServer

openai = pytest.importorskip("openai")

CHAT = {"messages": [{"role": "user", "content": "hello"}]}


def config_for(emu: OllamaEmulator) -> dict[str, Any]:
    return {
        "budgets": {"cuda:0": "24GB"},
        "providers": {"ollama": {"base_url": emu.url}, "simulated": {}},
        "models": {
            "qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "team/qwen": {"provider": "ollama", "target": "qwen2.5:14b", "memory": "9GB"},
            "chat-only": {"provider": "ollama", "target": "mistral-small:22b", "memory": "13GB", "serves": ["chat"]},
            "embed": {"provider": "ollama", "target": "nomic-embed-text", "memory": "300MB",
                      "options": {"kind": "embedding"}},
            "sim": {"memory": "1GB"},
        },
    }  # fmt: skip


@pytest.fixture
def serve() -> Iterator[Callable[..., str]]:
    servers: list[ThreadedServer] = []

    def start(config: Any, **kwargs: Any) -> str:
        server = ThreadedServer(create_app(config, **kwargs)).start()
        servers.append(server)
        return server.url

    yield start
    for server in servers:
        server.stop()


def assert_openai_shape(reply: httpx.Response) -> dict[str, Any]:
    body = reply.json()
    assert set(body) == {"error"}, (reply.status_code, reply.text)
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, (reply.status_code, reply.text)
    assert isinstance(error["message"], str) and error["message"], reply.text
    assert isinstance(error["type"], str) and error["type"], reply.text
    assert error["code"] is None or isinstance(error["code"], str), reply.text
    assert error["param"] is None or isinstance(error["param"], str), reply.text
    assert reply.headers["content-type"].startswith("application/json"), reply.headers
    return dict(error)


# -- models.retrieve --------------------------------------------------------------------------------


def test_models_retrieve_with_the_official_client(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    model = client.models.retrieve("qwen")
    assert model.id == "qwen" and model.object == "model" and model.owned_by == "ollama"
    slashed = httpx.get(f"{url}/v1/models/team/qwen")
    assert slashed.status_code == 200 and slashed.json()["id"] == "team/qwen", slashed.text
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("qwne")
    assert info.value.code == "model_not_found" and "did you mean 'qwen'" in info.value.message
    assert emu.stats.loads == 0


# -- one error shape ---------------------------------------------------------------------------------


BAD_REQUESTS: list[tuple[str, str, dict[str, Any], int]] = [
    ("GET", "/v1/nope", {}, 404),
    ("GET", "/nope", {}, 404),
    ("GET", "/v1/models/qwne", {}, 404),
    ("GET", "/v1/chat/completions", {}, 405),
    ("DELETE", "/models", {}, 405),
    ("POST", "/v1/chat/completions", {"json": {"model": "qwen"}}, 422),
    ("POST", "/v1/chat/completions", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ("POST", "/v1/embeddings", {"json": {"model": "embed", "input": "x", "stream": "sometimes"}}, 422),
    ("POST", "/models/qwen/load", {"json": {"keep_alive": "soon"}}, 422),
    ("POST", "/models/qwen/load", {"json": {"pinned": True}}, 422),
    ("POST", "/models/qwen/load", {"content": b'{"keep_alive": NaN}', "headers": {"content-type": "application/json"}}, 422),
    ("POST", "/models/qwne/load", {}, 404),
    ("POST", "/v1/chat/completions", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
    ("POST", "/v1/chat/completions", {"json": {"model": "qwen", "messages": [{"content": "x" * 5000}]}}, 413),
    ("POST", "/v1/chat/completions", {"json": {"model": "gpt-4o", **CHAT}}, 404),
    ("POST", "/v1/completions", {"json": {"model": "embed", "prompt": "x"}}, 400),
    ("POST", "/v1/chat/completions", {"json": {"model": "qwen", **CHAT}, "headers": {"x-keep-alive": "nan"}}, 400),
    ("POST", "/v1/chat/completions", {"json": {"model": "qwen", **CHAT}, "headers": {"x-keep-alive": "inf"}}, 400),
    ("POST", "/v1/chat/completions", {"json": {"model": "qwen", **CHAT, "keep_alive": "-5"}}, 400),
    ("POST", "/v1/chat/completions", {"content": json.dumps({"model": "qwen", **CHAT}).encode()[:-1] + b', "keep_alive": NaN}', "headers": {"content-type": "application/json"}}, 400),
    ("GET", "/health", {"headers": {"host": "attacker.example"}}, 400),
]  # fmt: skip


@pytest.mark.parametrize(("method", "path", "kwargs", "status"), BAD_REQUESTS)
def test_every_error_has_openais_shape(
    serve: Callable[..., str],
    emu: OllamaEmulator,
    method: str,
    path: str,
    kwargs: dict[str, Any],
    status: int,
) -> None:
    url = serve(config_for(emu), max_body=4096)
    reply = httpx.request(method, f"{url}{path}", timeout=30, **kwargs)
    assert reply.status_code == status, reply.text
    assert_openai_shape(reply)
    assert emu.stats.loads == 0 and emu.loaded() == []  # a refused request loads nothing


def test_a_missing_token_is_refused_in_openais_shape(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu), token="s3cret")
    reply = httpx.get(f"{url}/v1/models")
    assert reply.status_code == 401
    assert assert_openai_shape(reply)["code"] == "invalid_api_key"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as info:
        client.models.list()
    assert info.value.code == "invalid_api_key"


def test_validation_errors_name_the_parameter(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.UnprocessableEntityError) as info:
        client.chat.completions.create(model="qwen", messages=[])
    assert info.value.param == "messages" and isinstance(info.value.code, str), info.value.body
    assert "messages" in info.value.message
    for body in ({"keep_alive": "soon"}, {"pinned": True}):
        reply = httpx.post(f"{url}/models/qwen/load", json=body)
        assert reply.status_code == 422 and assert_openai_shape(reply)["param"] in body, reply.text


# -- the requested name in answers --------------------------------------------------------------------


def test_answers_name_the_model_that_was_asked_for(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for _ in range(2):  # the first loads it (the full path), the second finds it resident (the hot path)
        reply = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "hi"}])
        assert reply.model == "qwen" and "hi" in (reply.choices[0].message.content or "")
    chunks = list(
        client.chat.completions.create(
            model="team/qwen", messages=[{"role": "user", "content": "stream me"}], stream=True
        )
    )
    assert chunks and {c.model for c in chunks} == {"team/qwen"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).endswith("stream me")
    done = client.completions.create(model="qwen", prompt="complete this")
    assert done.model == "qwen" and "complete this" in done.choices[0].text
    vectors = client.embeddings.create(model="embed", input=["a", "b"])
    assert vectors.model == "embed" and len(vectors.data) == 2
    # a body the client asked to be compressed is renamed too
    raw = httpx.post(
        f"{url}/v1/chat/completions", json={"model": "qwen", **CHAT}, headers={"accept-encoding": "gzip"}
    )
    assert raw.status_code == 200 and raw.json()["model"] == "qwen", raw.text


# -- what each model serves ----------------------------------------------------------------------------


def test_the_model_list_says_what_each_model_serves(serve: Callable[..., str], emu: OllamaEmulator) -> None:
    url = serve(config_for(emu))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    listed = {m.id: m for m in client.models.list()}
    assert set(listed) == {"qwen", "team/qwen", "chat-only", "embed", "sim"}
    serves = {name: (m.model_extra or {}).get("capabilities") for name, m in listed.items()}
    assert serves == {
        "qwen": ["chat", "completions", "embeddings"],
        "team/qwen": ["chat", "completions", "embeddings"],
        "chat-only": ["chat"],
        "embed": ["embeddings"],
        "sim": [],
    }
    assert (client.models.retrieve("embed").model_extra or {}).get("capabilities") == ["embeddings"]
    assert emu.stats.loads == 0


def test_a_route_a_declared_model_does_not_serve_is_refused_before_any_load(
    serve: Callable[..., str], emu: OllamaEmulator
) -> None:
    url = serve(config_for(emu))
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    for call in (
        lambda: client.completions.create(model="chat-only", prompt="x"),
        lambda: client.embeddings.create(model="chat-only", input="x"),
    ):
        with pytest.raises(openai.BadRequestError) as info:
            call()
        assert info.value.code == "unsupported_endpoint" and "/v1/chat/completions only" in info.value.message
    assert emu.stats.loads == 0 and emu.loaded() == []
    reply = client.chat.completions.create(model="chat-only", messages=[{"role": "user", "content": "x"}])
    assert reply.model == "chat-only"


def test_serves_takes_the_three_openai_routes_only() -> None:
    from modelmora import ConfigError, ManagerConfig

    with pytest.raises(ConfigError, match=r"models\.a\.serves.*'chats'.*did you mean 'chat'"):
        ManagerConfig.from_dict({"models": {"a": {"serves": ["chats"]}}})


# -- the renaming itself ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (b'{"id":"1","model":"qwen2.5:14b","choices":[]}', b'{"id":"1","model":"qwen","choices":[]}'),
        # llama.cpp sorts its keys: the model after the data
        (b'{"data":[{"embedding":[0.1,0.2]}],"model":"m.gguf","object":"list"}',
         b'{"data":[{"embedding":[0.1,0.2]}],"model":"qwen","object":"list"}'),
        # pretty-printed, spaces around the colon
        (b'{\n  "id": 1,\n  "model" : "x"\n}', b'{\n  "id": 1,\n  "model" : "qwen"\n}'),
        # a nested "model" (a runtime echoing the request) and text that looks like one stay
        (b'{"received":{"model":"x"},"text":"\\"model\\": \\"y\\" ]]}}","model":"x"}',
         b'{"received":{"model":"x"},"text":"\\"model\\": \\"y\\" ]]}}","model":"qwen"}'),
        (b'{"received":{"model":"x"}}', b'{"received":{"model":"x"}}'),
        (b'{"model":"escaped \\" quote"}', b'{"model":"qwen"}'),
    ],
)  # fmt: skip
def test_an_answer_is_renamed_at_its_top_level_only(answer: bytes, expected: bytes) -> None:
    from modelmora.server.proxy import ModelRenamer

    for size in (1, 3, 7, len(answer)):  # however the runtime's bytes arrive
        renamer = ModelRenamer("qwen", stream=False)
        out = b"".join(renamer.feed(answer[i : i + size]) for i in range(0, len(answer), size))
        assert out + renamer.end() == expected


def test_a_stream_is_renamed_event_by_event_as_it_arrives() -> None:
    from modelmora.server.proxy import ModelRenamer

    events = b'data: {"model":"a:1","choices":[{"delta":{"content":"x"}}]}\n\n' * 3 + b"data: [DONE]\n\n"
    renamer = ModelRenamer("team/qwen", stream=True)
    first = renamer.feed(events[:30])
    assert first == b""  # not a whole line yet
    second = renamer.feed(events[30:70])
    assert second == b'data: {"model":"team/qwen","choices":[{"delta":{"content":"x"}}]}\n\n'
    rest = renamer.feed(events[70:]) + renamer.end()
    assert first + second + rest == events.replace(b'"a:1"', b'"team/qwen"')
