"""Heatmap of a bit plan: MoE layers (rows) x experts (columns), one colour per width."""

from __future__ import annotations

import os

from moe_export.plan.bitplan import BitPlan


def save_heatmap(plan: BitPlan, path: str | os.PathLike, title: str | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.colors import BoundaryNorm, ListedColormap

    from moe_export.io import atomic_path

    E = max(l.num_experts for l in plan.layers)
    grid = np.full((len(plan.layers), E), np.nan)  # [layers, E]; NaN where a layer has fewer experts
    for i, l in enumerate(plan.layers):
        grid[i, : l.num_experts] = l.bits
    levels = sorted(set(plan.levels))
    # One discrete colour per level, light = few bits, dark = many.
    cmap = ListedColormap(plt.get_cmap("viridis_r")(np.linspace(0.1, 0.9, len(levels))))
    norm = BoundaryNorm([b - 0.5 for b in levels] + [levels[-1] + 0.5], cmap.N)

    fig_w = min(2.5 + 0.28 * E, 24)
    fig_h = min(1.6 + 0.28 * len(plan.layers), 20)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    im = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    if E <= 32 and len(plan.layers) <= 48:
        for i, l in enumerate(plan.layers):
            for e, b in enumerate(l.bits):
                ax.text(e, i, str(b), ha="center", va="center", fontsize=7,
                        color="white" if b == levels[-1] and len(levels) > 1 else "black")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    step = max(1, len(plan.layers) // 24)
    ax.set_yticks(range(0, len(plan.layers), step))
    ax.set_yticklabels([plan.layers[i].name for i in range(0, len(plan.layers), step)], fontsize=7)
    ax.set_xticks(range(0, E, max(1, E // 16)))
    cbar = fig.colorbar(im, ax=ax, ticks=levels)
    cbar.set_label("bits")
    method = plan.provenance.get("method", "?")
    ax.set_title(title or f"{plan.model.get('name') or 'model'}: {method}, mean {plan.mean_bits():.4g} bits", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
