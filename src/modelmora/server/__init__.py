"""``modelmora serve``: REST API, OpenAI-compatible swapping proxy, metrics, status page."""

from .app import create_app, event_to_dict, token_from_env
from .security import is_loopback
from .serving import server_options

__all__ = ["create_app", "event_to_dict", "is_loopback", "server_options", "token_from_env"]
