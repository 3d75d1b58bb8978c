"""Chains of steps over several models, run under a residency plan."""

from .executor import Chain, Chainbreaker, ChainResult, Step, StepCall, StepInfo
from .management import Management
from .plan import PlanModel, PlannedStep, ResidencyPlan, plan_always_unload, plan_next_use, plan_residency

__all__ = [
    "Chain",
    "ChainResult",
    "Chainbreaker",
    "Management",
    "PlanModel",
    "PlannedStep",
    "ResidencyPlan",
    "Step",
    "StepCall",
    "StepInfo",
    "plan_always_unload",
    "plan_next_use",
    "plan_residency",
]
