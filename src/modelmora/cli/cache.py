"""Clearing a model's files from disk: the Hugging Face hub cache and Ollama's store.

The Hugging Face side goes through ``huggingface_hub``'s cache scanner, which knows the
cache layout (blobs shared between revisions, symlinked snapshots); nothing here deletes
a guessed path.  Ollama deletes its own files through ``DELETE /api/delete``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx

from ..errors import ModelMoraError, ModelNotFound, ProviderUnavailable


@dataclass(frozen=True)
class Cleared:
    target: str
    where: str
    freed_bytes: int | None
    revisions: int = 0


def hf_cached(repo_id: str, cache_dir: str | Path | None = None) -> tuple[int, list[str]]:
    """Bytes on disk and revision hashes of ``repo_id`` in the hub cache (0, [] if absent)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return 0, []
    for repo in info.repos:
        if repo.repo_id == repo_id:
            return repo.size_on_disk, [r.commit_hash for r in repo.revisions]
    return 0, []


def clear_hf_cache(repo_id: str, cache_dir: str | Path | None = None) -> Cleared:
    """Delete every cached revision of ``repo_id``; reports the bytes freed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    where = str(cache_dir or _hf_cache_dir())
    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        raise ModelNotFound(f"no Hugging Face cache at {where}", model=repo_id) from None
    hashes = [r.commit_hash for repo in info.repos if repo.repo_id == repo_id for r in repo.revisions]
    if not hashes:
        raise ModelNotFound(f"{repo_id!r} is not in the Hugging Face cache at {where}", model=repo_id)
    strategy = info.delete_revisions(*hashes)
    freed = strategy.expected_freed_size
    strategy.execute()
    return Cleared(repo_id, where, freed, len(hashes))


def _hf_cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def clear_ollama_model(base_url: str, target: str, *, timeout: float = 30.0) -> Cleared:
    """``DELETE /api/delete`` on an Ollama server (removes the model's files there)."""
    try:
        response = httpx.request(
            "DELETE", f"{base_url.rstrip('/')}/api/delete", json={"model": target}, timeout=timeout
        )
    except httpx.HTTPError as exc:
        raise ProviderUnavailable(f"cannot reach Ollama at {base_url}: {exc}", model=target) from exc
    if response.status_code == 404:
        raise ModelNotFound(f"Ollama at {base_url} has no model {target!r}", model=target)
    if response.status_code >= 400:
        raise ModelMoraError(f"Ollama refused to delete {target!r}: {response.text.strip()}", model=target)
    return Cleared(target, base_url, None)


__all__ = ["Cleared", "clear_hf_cache", "clear_ollama_model", "hf_cached"]
