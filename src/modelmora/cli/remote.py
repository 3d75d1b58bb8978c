"""The CLI's remote mode: the same operations against a running ``modelmora serve``
(``--url`` or ``MODELMORA_URL``), which is where in-process torch models live."""

from __future__ import annotations

import os
from typing import Any
from urllib.parse import quote

import httpx

from ..errors import ModelMoraError, ProviderUnavailable


class RemoteManager:
    def __init__(self, url: str, *, token: str | None = None, timeout: float = 600.0):
        self.url = url.rstrip("/")
        token = token if token is not None else os.environ.get("MODELMORA_TOKEN")
        # the server compares the token as UTF-8 bytes; httpx would encode a str as ASCII
        headers = {b"Authorization": f"Bearer {token}".encode()} if token else {}
        self.client = httpx.Client(
            base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=5.0)
        )

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> RemoteManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, json: Any = None) -> Any:
        try:
            response = self.client.request(method, path, json=json)
        except httpx.HTTPError as exc:
            raise ProviderUnavailable(f"cannot reach the modelmora server at {self.url}: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text[:300] or response.reason_phrase
            raise ModelMoraError(f"{self.url}: {message} (HTTP {response.status_code})")
        return response.json()

    def status(self) -> dict[str, Any]:
        return dict(self._call("GET", "/status"))

    def hardware(self) -> dict[str, Any]:
        return dict(self._call("GET", "/hardware"))

    def models(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/models"))

    def loaded(self) -> list[str]:
        return [m["name"] for m in self.status()["models"]]

    def load(self, name: str, *, pin: bool = False, keep_alive: float | None = None) -> dict[str, Any]:
        return dict(
            self._call(
                "POST", f"/models/{quote(name, safe='/:@+')}/load", {"pin": pin, "keep_alive": keep_alive}
            )
        )

    def unload(self, name: str, *, force: bool = False) -> bool:
        return bool(
            self._call("POST", f"/models/{quote(name, safe='/:@+')}/unload", {"force": force})["unloaded"]
        )

    def take_lease(self, name: str, *, holder: str, reason: str, ttl: float) -> dict[str, Any]:
        """``POST /leases``: the lease (``id``, ``expires_at`` unix seconds, ``left_s``)."""
        return dict(
            self._call("POST", "/leases", {"model": name, "holder": holder, "reason": reason, "ttl": ttl})
        )

    def extend_lease(self, lease_id: str, *, ttl: float) -> dict[str, Any]:
        return dict(self._call("POST", f"/leases/{quote(lease_id, safe='')}/extend", {"ttl": ttl}))

    def release_lease(self, lease_id: str) -> dict[str, Any]:
        return dict(self._call("DELETE", f"/leases/{quote(lease_id, safe='')}"))

    def model(self, name: str) -> dict[str, Any]:
        """``GET /models/{name}``: its state and the load under way (``queue``, seconds)."""
        return dict(self._call("GET", f"/models/{quote(name, safe='/:@+')}"))

    def unload_all(self, *, force: bool = False) -> dict[str, list[str]]:
        return dict(self._call("POST", "/unload-all", {"force": force}))


__all__ = ["RemoteManager"]
