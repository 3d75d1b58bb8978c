"""Chains of steps over several models, run under a residency plan."""

from .executor import Chain, Chainbreaker, ChainObserver, ChainResult, Step, StepCall, StepInfo
from .files import load_chain
from .management import Management
from .plan import PlanModel, PlannedStep, ResidencyPlan, plan_always_unload, plan_next_use, plan_residency

__all__ = [
    "Chain",
    "ChainObserver",
    "ChainResult",
    "Chainbreaker",
    "Management",
    "PlanModel",
    "PlannedStep",
    "ResidencyPlan",
    "Step",
    "StepCall",
    "StepInfo",
    "load_chain",
    "plan_always_unload",
    "plan_next_use",
    "plan_residency",
]
