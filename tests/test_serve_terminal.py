"""`modelmora serve` as a terminal program, run as a real subprocess: Ctrl-C and SIGTERM stop
it at once (even with the status page's event stream open), a busy port is one line, and it
logs each proxied request and each load, eviction, park and failure."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from modelmora.testing.ollama import OllamaEmulator

ROOT = Path(__file__).resolve().parents[1]
HANG = 10.0  # a generous bound: the target is 2 s, measured and reported, not asserted


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Serve:
    """A `modelmora serve` child process of this worktree's code, its output merged."""

    def __init__(self, config: Path, *args: str, port: int | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        environ = {k: v for k, v in os.environ.items() if not k.startswith("MODELMORA_")}
        environ |= {"PYTHONPATH": str(ROOT / "src"), "COLUMNS": "200", "PYTHONUNBUFFERED": "1"}
        # a home of its own next to the config: HTTP leases another server left in the
        # user's home (~/.cache/modelmora/server) are not this one's to drop or grant
        environ["MODELMORA_HOME"] = str(config.parent / "modelmora-home")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "modelmora.cli", "serve", "-c", str(config), "--port", str(self.port), *args],
            env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        )  # fmt: skip
        self.output = ""

    def wait_ready(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.finish()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/health", timeout=1).status_code in (200, 503):
                    return
            time.sleep(0.05)
        raise AssertionError("modelmora serve did not answer within 30 s")

    def finish(self, timeout: float = HANG) -> str:
        """Its whole output once it has exited (killed if it has not within ``timeout``)."""
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
            self.output += out
            raise AssertionError(f"still running {timeout:.0f} s later; its output:\n{self.output}") from None
        self.output += out
        return self.output

    def stop(self, sig: int = signal.SIGINT) -> tuple[float, str]:
        """Send ``sig``; seconds until it exited and its output."""
        start = time.monotonic()
        self.proc.send_signal(sig)
        out = self.finish()
        return time.monotonic() - start, out

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Serve]]:
    started: list[Serve] = []

    def start(config: str, *args: str, port: int | None = None) -> Serve:
        path = tmp_path / f"mm{len(started)}.yaml"
        path.write_text(config)
        server = Serve(path, *args, port=port)
        started.append(server)
        return server

    yield start
    for server in started:
        server.kill()


SIMULATED = "budgets: {cuda:0: 16GB}\nmodels:\n  a: {memory: 1GB}\n"


def open_event_stream(url: str) -> tuple[threading.Event, threading.Event]:
    """Read ``url``/events in a thread, as the status page does: (connected, ended)."""
    connected, ended = threading.Event(), threading.Event()

    def read() -> None:
        timeout = httpx.Timeout(5, read=None)
        with contextlib.suppress(httpx.HTTPError), httpx.stream("GET", f"{url}/events", timeout=timeout) as r:
            for line in r.iter_lines():
                if line.startswith(": connected"):
                    connected.set()
        ended.set()

    threading.Thread(target=read, daemon=True).start()
    assert connected.wait(10), "the event stream did not open"
    return connected, ended


def no_traceback(out: str) -> None:
    assert "Traceback" not in out and "CancelledError" not in out, out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_with_an_open_event_stream_stops_it_at_once(
    serve: Callable[..., Serve], sig: signal.Signals
) -> None:
    server = serve(SIMULATED)
    server.wait_ready()
    _, ended = open_event_stream(server.url)
    took, out = server.stop(sig)
    print(f"exit after {signal.Signals(sig).name}: {took:.2f} s")
    no_traceback(out)
    assert server.proc.returncode == 0, out
    assert ended.wait(2), "the event stream was not ended"
    after = out.split("serving", 1)[1].splitlines()[1:]
    assert len(after) == 1 and "stopped" in after[0], out  # one line, after the "serving" line


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(serve: Callable[..., Serve]) -> None:
    server = serve(SIMULATED)
    server.wait_ready()
    open_event_stream(server.url)
    server.proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    _, out = server.stop(signal.SIGINT)
    no_traceback(out)
    assert server.proc.poll() is not None


def test_a_busy_port_is_one_line_before_anything_says_serving(serve: Callable[..., Serve]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = int(taken.getsockname()[1])
        server = serve(SIMULATED, port=port)
        out = server.finish()
    assert server.proc.returncode not in (0, None), out
    assert "serving" not in out, out
    lines = out.strip().splitlines()
    assert len(lines) == 1 and str(port) in lines[0] and "in use" in lines[0], out


def ollama_config(emu: OllamaEmulator) -> str:
    return (
        "budgets: {cuda:0: 24GB}\n"
        f"providers: {{ollama: {{base_url: '{emu.url}'}}}}\n"
        "models:\n  qwen: {provider: ollama, target: 'qwen2.5:14b', memory: 9GB}\n"
    )


def chat(url: str, *, stream: bool = False) -> int:
    body = {"model": "qwen", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30).status_code


def request_lines(out: str) -> list[str]:
    """modelmora's request lines (at DEBUG uvicorn's access log names the path too)."""
    return [line for line in out.splitlines() if re.search(r"POST /v1/chat/completions \S+ \d{3} ", line)]


def test_each_proxied_request_and_load_is_a_line(
    serve: Callable[..., Serve], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    server = serve(ollama_config(make_ollama()))
    server.wait_ready()
    assert chat(server.url) == 200  # loads qwen: waits for it
    assert chat(server.url) == 200  # resident: the hot path
    assert chat(server.url, stream=True) == 200
    body = {"model": "nope", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30).status_code == 404
    _, out = server.stop()
    no_traceback(out)
    lines = request_lines(out)
    assert len(lines) == 4, out
    first, hot, streamed, unknown = lines
    for line in (first, hot, streamed):
        assert "POST" in line and " qwen " in line and " 200 " in line, line
    assert "waited" in first and "load" in first, first
    assert "waited" not in hot and "waited" not in streamed, out
    assert "nope" in unknown and " 404 " in unknown, unknown
    assert any("loaded qwen" in line for line in out.splitlines()), out


def test_quiet_silences_the_request_and_load_lines(
    serve: Callable[..., Serve], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    server = serve(ollama_config(make_ollama()), "-q")
    server.wait_ready()
    assert chat(server.url) == 200
    _, out = server.stop()
    assert request_lines(out) == [] and "loaded qwen" not in out, out
    assert server.proc.returncode == 0, out


def test_log_level_debug_shows_lease_events(
    serve: Callable[..., Serve], make_ollama: Callable[..., OllamaEmulator]
) -> None:
    server = serve(ollama_config(make_ollama()), "--log-level", "debug")
    server.wait_ready()
    assert chat(server.url) == 200
    _, out = server.stop()
    assert "LeaseAcquired qwen" in out and len(request_lines(out)) == 1, out
