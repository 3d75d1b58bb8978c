"""modelmora: keep the right models resident in (V)RAM at the right time.

The public API: the manager and its blocking facade, configuration, the provider seam,
events, the error tree, and the values the manager reports.  Everything else
(``modelmora.core.*``, the providers' modules) is importable but not promised.
"""

from .config import Budget, ManagerConfig
from .core import Footprint, Lease, ManagerStatus, ModelManager, ModelStatus, UnloadAllResult
from .errors import (
    ConfigError,
    HandleClosed,
    HeldByLeases,
    InsufficientMemory,
    LoadDeferred,
    LoadFailed,
    ManagerClosed,
    ModelInUse,
    ModelMoraError,
    ModelMoraTimeout,
    ModelNotFound,
    OutOfMemory,
    Overloaded,
    ProviderError,
    ProviderOutage,
    ProviderUnavailable,
    RecentlyFailed,
    RuntimeUnreachable,
    TransientError,
    UnknownModel,
    UnloadFailed,
)
from .events import Event, EventBus
from .providers import Capabilities, Handle, Observed, Provider, ProviderSettings, register_provider
from .spec import ModelSpec, parse_duration, parse_size
from .sync import SyncModelManager

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "Capabilities",
    "ConfigError",
    "Event",
    "EventBus",
    "Footprint",
    "Handle",
    "HandleClosed",
    "HeldByLeases",
    "InsufficientMemory",
    "Lease",
    "LoadDeferred",
    "LoadFailed",
    "ManagerClosed",
    "ManagerConfig",
    "ManagerStatus",
    "ModelInUse",
    "ModelManager",
    "ModelMoraError",
    "ModelMoraTimeout",
    "ModelNotFound",
    "ModelSpec",
    "ModelStatus",
    "Observed",
    "OutOfMemory",
    "Overloaded",
    "Provider",
    "ProviderError",
    "ProviderOutage",
    "ProviderSettings",
    "ProviderUnavailable",
    "RecentlyFailed",
    "RuntimeUnreachable",
    "SyncModelManager",
    "TransientError",
    "UnknownModel",
    "UnloadAllResult",
    "UnloadFailed",
    "__version__",
    "parse_duration",
    "parse_size",
    "register_provider",
]
