"""The core: residency table, lifecycle, admission, leases, transitions, reconcile.

One module per concept (see DESIGN.md); :class:`ModelManager` composes them.
"""

from ..footprint import Footprint
from .leases import Lease
from .lifecycle import State
from .manager import ModelManager
from .planner import Admit, Plan, Refuse, Wait
from .status import ManagerStatus, ModelStatus, UnloadAllResult
from .table import EntryView

__all__ = [
    "Admit",
    "EntryView",
    "Footprint",
    "Lease",
    "ManagerStatus",
    "ModelManager",
    "ModelStatus",
    "Plan",
    "Refuse",
    "State",
    "UnloadAllResult",
    "Wait",
]
