"""Per-expert bit plans: scores (router-norm change, MaxVar, baselines), allocation rules, BitPlan JSON.

    from moe_export.plan import PlanConfig, make_plan
    plan = make_plan("runs/zoo/tiny", PlanConfig(avg_bits=2.5, levels=[3, 2]))
    plan.save("plan.json")
"""

from moe_export.plan.bitplan import BITPLAN_VERSION, BitPlan, BitPlanError, LayerPlan, QuantizerSpec, router_sha256
from moe_export.plan.methods import METHODS, PlanConfig, PlanError, make_plan

__all__ = ["BITPLAN_VERSION", "BitPlan", "BitPlanError", "LayerPlan", "QuantizerSpec", "router_sha256",
           "METHODS", "PlanConfig", "PlanError", "make_plan"]
