"""Heatmap of a bit plan: MoE layers (rows) x experts (columns), one colour per width. A plan that chooses per
tensor (version 2) has one row per expert projection stack (its group size in the label) and one per non-expert
tensor (column 0; float shown as "f")."""

from __future__ import annotations

import os

from moe_export.plan.bitplan import BitPlan


FLOAT = 16  # where a float tensor sits on the colour scale: above every width


def _rows(plan: BitPlan) -> list[tuple[str, list[int]]]:
    """(label, widths) of each row: per MoE layer, or per tensor for a plan that lists tensors."""
    if plan.version < 2:
        return [(l.name, list(l.bits)) for l in plan.layers]
    g = lambda x: "row" if x is None else x  # noqa: E731
    rows = [(f"{l.name}.{p} g={g(t['group_size'])}", list(t["bits"])) for l in plan.layers
            for p, t in (l.tensors or {"experts": {"bits": l.bits, "group_size": plan.quantizer.group_size}}).items()]
    rows += [(n if t == "float" else f"{n} g={g(t['group_size'])}", [FLOAT if t == "float" else t["bits"]])
             for n, t in plan.tensors.items()]
    return rows


def save_heatmap(plan: BitPlan, path: str | os.PathLike, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from moe_export.io import atomic_path

    E = max(l.num_experts for l in plan.layers)
    rows = _rows(plan)
    grid = np.full((len(rows), E), np.nan)  # [rows, E]; NaN where a row has fewer experts
    for i, (_, bits) in enumerate(rows):
        grid[i, : len(bits)] = bits
    levels = sorted({int(b) for _, bits in rows for b in bits})
    # One discrete colour per level, light = few bits, dark = many.
    cmap = ListedColormap(plt.get_cmap("viridis_r")(np.linspace(0.1, 0.9, len(levels))))
    norm = BoundaryNorm([b - 0.5 for b in levels] + [levels[-1] + 0.5], cmap.N)

    fig_w = min(2.5 + 0.28 * E, 24)
    fig_h = min(1.6 + 0.28 * len(rows), 20)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if E <= 32 and len(rows) <= 96:
        for i, (_, bits) in enumerate(rows):
            for e, b in enumerate(bits):
                ax.text(e, i, "f" if b == FLOAT else str(b), ha="center", va="center", fontsize=7,
                        color="white" if b == levels[-1] and len(levels) > 1 else "black")
    ax.set_xlabel("expert (non-expert tensors: column 0)" if len(rows) > len(plan.layers) else "expert")
    ax.set_ylabel("MoE layer" if len(rows) == len(plan.layers) else "tensor")
    step = max(1, len(rows) // 48)
    ax.set_yticks(range(0, len(rows), step))
    ax.set_yticklabels([rows[i][0] for i in range(0, len(rows), step)], fontsize=6 if len(rows) > 24 else 7)
    ax.set_xticks(range(0, E, max(1, E // 16)))
    cbar = fig.colorbar(im, ax=ax, ticks=levels)
    cbar.set_ticklabels(["float" if b == FLOAT else str(b) for b in levels])
    cbar.set_label("bits")
    method = plan.provenance.get("method", "?")
    what = (f"{8 * plan.budget['planned_bytes'] / plan.budget['parameters']:.4g} bits/weight whole model"
            if plan.budget is not None else f"mean {plan.mean_bits():.4g} bits")
    ax.set_title(title or f"{plan.model.get('name') or 'model'}: {method}, {what}", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
