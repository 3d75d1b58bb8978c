"""modelmora: keep the right models resident in (V)RAM at the right time."""

from .config import Budget, ManagerConfig
from .errors import (
    ConfigError,
    HandleClosed,
    InsufficientMemory,
    LoadFailed,
    ManagerClosed,
    ModelInUse,
    ModelMoraError,
    ModelMoraTimeout,
    ModelNotFound,
    ProviderError,
    ProviderUnavailable,
    RecentlyFailed,
    TransientError,
    UnknownModel,
    UnloadFailed,
)
from .events import Event, EventBus
from .manager import Lease, ManagerStatus, ModelManager, ModelStatus, UnloadAllResult
from .planner import Admit, Refuse, Wait
from .providers import (
    Handle,
    Observed,
    Provider,
    ProviderSettings,
    create_provider,
    register_provider,
)
from .spec import ModelSpec, parse_duration, parse_size
from .sync import SyncModelManager

__version__ = "0.1.0"

__all__ = [
    "Admit",
    "Budget",
    "ConfigError",
    "Event",
    "EventBus",
    "Handle",
    "HandleClosed",
    "InsufficientMemory",
    "Lease",
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
    "Provider",
    "ProviderError",
    "ProviderSettings",
    "ProviderUnavailable",
    "RecentlyFailed",
    "Refuse",
    "SyncModelManager",
    "TransientError",
    "UnknownModel",
    "UnloadAllResult",
    "UnloadFailed",
    "Wait",
    "__version__",
    "create_provider",
    "parse_duration",
    "parse_size",
    "register_provider",
]
