"""LLM steps through litellm, at the endpoint a lease hands out.

The handle says which protocol its runtime speaks: Ollama's native API (``ollama_chat/``,
with the options and keep-alive the model was preloaded with, so the request neither
reloads it nor disarms the dead man's switch) or an OpenAI-compatible server
(``openai/`` at ``<endpoint>/v1``).  litellm is imported on first use with its offline
model-cost map, because at import it otherwise tries to download one from GitHub.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from ..errors import ConfigError, ProviderUnavailable
from ..extras import install_hint
from ..providers.base import Handle


def _litellm() -> Any:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    try:
        import litellm
    except ImportError:
        raise ProviderUnavailable(
            f"LLM steps need the chain extra (litellm is missing): {install_hint('chain')}",
            provider="litellm",
        ) from None
    litellm.suppress_debug_info = True
    return litellm


def request_for(handle: Handle, prompt: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The ``litellm.acompletion`` arguments for one prompt to the model behind ``handle``."""
    if handle.endpoint is None:
        raise ConfigError(
            f"model {handle.name!r} runs in-process ({handle.provider}); give its step a callable "
            "that receives the model object, or use a runtime with an HTTP endpoint"
        )
    kwargs: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}]}
    if handle.api == "ollama":
        kwargs |= {"model": f"ollama_chat/{handle.target}", "api_base": handle.endpoint}
        kwargs |= dict(handle.request_options)
        if handle.keep_alive is not None:
            kwargs["keep_alive"] = handle.keep_alive
    else:
        base = handle.endpoint.rstrip("/")
        kwargs |= {
            "model": f"openai/{handle.model_name}",
            "api_base": base if base.endswith("/v1") else f"{base}/v1",
            "api_key": handle.api_key or "modelmora",
        }
    kwargs |= dict(params)
    return kwargs


async def complete(
    handle: Handle,
    prompt: str,
    params: Mapping[str, Any],
    on_token: Callable[[str], Any] | None = None,
) -> str:
    """The model's answer to ``prompt``; streamed token by token to ``on_token`` when given."""
    litellm = _litellm()
    kwargs = request_for(handle, prompt, params)
    if on_token is None and not kwargs.get("stream"):
        response = await litellm.acompletion(**kwargs)
        return str(response.choices[0].message.content or "")
    kwargs["stream"] = True
    parts: list[str] = []
    async for chunk in await litellm.acompletion(**kwargs):
        text = chunk.choices[0].delta.content or ""
        if text:
            parts.append(text)
            if on_token is not None:
                on_token(text)
    return "".join(parts)


__all__ = ["complete", "request_for"]
