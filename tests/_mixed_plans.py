"""Mixed-width BitPlans for the tensor/api/checkpoint/compile tests."""

from moe_export.models import find_moe_layers
from moe_export.plan.bitplan import BitPlan


def mixed_plan(model, widths=(3, 2, 4, 2), group_size=32):
    """Expert e of every layer at ``widths[e % len(widths)]``."""
    plan = BitPlan.uniform(find_moe_layers(model), 2, group_size=group_size)
    for lp in plan.layers:
        lp.bits = [widths[e % len(widths)] for e in range(lp.num_experts)]
    plan.levels = sorted(set(widths), reverse=True)
    plan.target_avg_bits = plan.mean_bits()
    plan.validate()
    return plan
