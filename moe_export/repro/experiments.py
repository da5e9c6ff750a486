"""Runners behind `moe-export reproduce`: the synthetic theory task, swept over alpha, seeds and routing.

One run = train the two-layer MoE for one (routing, alpha, seed), then
  * score every expert: Lambda_s (router-norm change), the feature its router moved towards, MaxVar,
    calibration activation frequency;
  * quantize the expert first layers (per-row asymmetric RTN) with each allocation at equal average
    bits and measure accuracy on frequent-feature and infrequent-feature test samples;
  * find the smallest safe width of the frequent-feature and of the infrequent-feature experts
    (the theory's log2((1 - alpha) / alpha) gap).
Before the sweep, a scan trains a grid of expert-init scales and widths at one alpha and records what
uniform quantization costs there, so the report can show why the sweep's setting was chosen: a
setting where low-bit quantization does not hurt cannot separate the allocations.
Records are plain dicts so the report can be rebuilt from the JSON alone.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch
from tqdm import tqdm

from moe_export.plan.allocation import bits_from_order, level_counts, rearrange
from moe_export.repro import synthetic as syn

METHODS = ["ours (smallest change first)", "ours + MaxVar", "largest change first", "frequency first", "random",
           "infrequent-feature first (oracle)"]
OURS, OURS_MAXVAR, REVERSE, FREQUENCY, RANDOM, ORACLE = METHODS


# Per-routing training settings. lr/steps: token-choice needs a larger step, its gates start at 1/k.
# expert_init_std/n_neurons: chosen from the scan below (measured before the sweep, alpha = 0.1, 5 seeds):
# the smallest init scale at which uniform 1-bit RTN costs at least 5 points on infrequent-feature
# samples while 3 bits stay within 1 point of float. With 16 neurons no init up to 4.0 cleared that
# bar for either routing, and with the previous init (0.1) even 1 bit cost nothing: the learned feature
# component dwarfed the quantization error, so no allocation could be told from another.
BASE = {
    "token_choice": {"lr": 2.0, "steps": 1000, "expert_init_std": 4.0, "n_neurons": 4},
    "expert_choice": {"lr": 0.1, "steps": 1500, "expert_init_std": 2.0, "n_neurons": 4},
}
# The setting published before the scan, kept as a scan row so the report can show what it measured.
PREVIOUS = {
    "token_choice": {"lr": 2.0, "steps": 2000, "expert_init_std": 0.1, "n_neurons": 16},
    "expert_choice": {"lr": 0.1, "steps": 600, "expert_init_std": 0.1, "n_neurons": 16},
}


def scan_grid(inits=(0.1, 1.0, 2.0, 3.0, 4.0), neurons=(16, 4), previous: bool = True) -> dict[str, list[dict]]:
    """Per routing: the previous setting, then expert init x width at the routing's lr and steps."""
    grid = [{"expert_init_std": s, "n_neurons": m} for m in neurons for s in inits]
    return {r: ([{**PREVIOUS[r], "previous": True}] if previous else []) + grid for r in BASE}


@dataclass
class SyntheticSweep:
    alphas: tuple[float, ...] = (0.05, 0.1, 0.2)
    seeds: tuple[int, ...] = tuple(range(10))  # damage is all-or-nothing per feature and seed: many seeds
    routings: tuple[str, ...] = ("token_choice", "expert_choice")
    levels: tuple[int, int] = (3, 1)  # (b_h, b_l)
    n_random: int = 8  # random allocations averaged per run
    n_test: int = 2000  # test samples per kind (frequent / infrequent)
    n_calib: int = 2000
    safe_drop: float = 0.01  # "safe" width: accuracy within this of float
    zeta: float = 3.0
    group_size: int | None = None  # RTN group; None = the whole row (the coarsest, so the most damage)
    base: dict = field(default_factory=lambda: {r: dict(v) for r, v in BASE.items()})
    overrides: dict = field(default_factory=dict)  # applied to every SyntheticConfig (tests shrink the model)
    # Setting scan: per routing, override dicts on top of base + overrides ("previous": True marks the
    # old default); trained at scan_alpha for scan_seeds, scored by uniform quantization only.
    scan: dict = field(default_factory=scan_grid)
    scan_alpha: float = 0.1
    scan_seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    scan_n_test: int = 1000

    def config(self, routing: str, alpha: float, seed: int, extra: dict | None = None) -> syn.SyntheticConfig:
        kw = {**self.base.get(routing, {}), **self.overrides, **(extra or {})}
        kw.pop("previous", None)
        return syn.SyntheticConfig(routing=routing, alpha=alpha, seed=seed, **kw)

    def avg_bits_grid(self, n_experts: int) -> list[float]:
        b_h, b_l = self.levels
        return [b_l + j * (b_h - b_l) / n_experts for j in range(n_experts + 1)]

    def to_dict(self) -> dict:
        return asdict(self)


QUICK = SyntheticSweep(seeds=(0, 1, 2), n_random=4, n_test=1000, n_calib=1000, scan_seeds=(0, 1),
                       scan=scan_grid(inits=(0.1, 2.0, 4.0), neurons=(4,)))
FULL = SyntheticSweep()


def orders(scores: dict, n_experts: int, zeta: float) -> dict[str, list[int]]:
    """Rankings, highest priority (most bits) first."""
    lam, freq, var = scores["lambda"], scores["activation_frequency"], scores["maxvar"]
    ours = sorted(range(n_experts), key=lambda s: lam[s])
    # The theory's prescription with the features known: infrequent-feature experts, then frequent, then the rest.
    group = {2: 0, 3: 0, 0: 1, 1: 1, -1: 2}
    oracle = sorted(range(n_experts), key=lambda s: (group[scores["feature"][s]], lam[s]))
    return {
        OURS: ours,
        OURS_MAXVAR: rearrange(ours, var, zeta),
        REVERSE: ours[::-1],
        FREQUENCY: sorted(range(n_experts), key=lambda s: -freq[s]),
        ORACLE: oracle,
    }


@torch.no_grad()
def _eval(model, sets, alpha, w1=None) -> dict:
    out = {}
    for kind, b in sets.items():
        margin = b.y * model(b.x, w1)  # [B]; < 0 is an error
        out[f"acc_{kind}"] = (margin > 0).float().mean().item()
        # Low quantile of the margin: how close the hardest samples are to flipping (accuracy alone
        # cannot see a quantizer that shrinks every margin without crossing zero).
        out[f"margin_q01_{kind}"] = torch.quantile(margin, 0.01).item()
    out["acc"] = (1 - alpha) * out["acc_frequent"] + alpha * out["acc_infrequent"]
    return out


def run_one(sweep: SyntheticSweep, routing: str, alpha: float, seed: int) -> dict:
    cfg = sweep.config(routing, alpha, seed)
    task = syn.SyntheticTask(cfg, seed)
    t0 = time.perf_counter()
    res = syn.train(task, cfg)
    train_s = time.perf_counter() - t0
    model, k = res.model, cfg.n_experts
    g = torch.Generator().manual_seed(10_000 + seed)
    sets = {"frequent": task.sample(sweep.n_test, g, rare=False), "infrequent": task.sample(sweep.n_test, g, rare=True)}
    calib = task.sample(sweep.n_calib, g)
    w1 = model.w1.detach()
    table = syn.quantize_table(w1, group_size=sweep.group_size)

    feat = syn.learned_feature(res, task).tolist()
    scores = {
        "lambda": syn.router_norm_change(res).tolist(),
        "router_norm_init": res.router_init.norm(dim=1).tolist(),
        "feature": feat,  # 0,1 frequent; 2,3 infrequent; -1 irrelevant
        "maxvar": syn.maxvar(w1).tolist(),
        "activation_frequency": syn.activation_frequency(model, calib).tolist(),
    }
    # Activation magnitude on the expert's own feature (theory: weaker for infrequent-feature experts).
    with torch.no_grad():
        out = model.expert_outputs(task.features[None, : syn.N_RELEVANT])[0]  # [4, k]
    scores["activation_on_feature"] = [float(out[f, s].abs()) if f >= 0 else 0.0 for s, f in enumerate(feat)]

    rec = {"routing": routing, "alpha": alpha, "seed": seed, "config": cfg.to_dict(), "train_s": train_s,
           "final_loss": sum(res.losses[-50:]) / min(50, len(res.losses)), "scores": scores,
           "float": _eval(model, sets, alpha)}

    levels = sweep.levels
    rec["uniform"] = {str(b): _eval(model, sets, alpha, syn.quantize_experts(w1, table=table, bits=[b] * k)) for b in range(1, 9)}

    ranked = orders(scores, k, sweep.zeta)
    gr = torch.Generator().manual_seed(20_000 + seed)
    randoms = [torch.randperm(k, generator=gr).tolist() for _ in range(sweep.n_random)]
    alloc = []
    for avg in sweep.avg_bits_grid(k):
        counts = level_counts(k, avg, levels)
        row = {"avg_bits": avg, "counts": {str(b): n for b, n in counts.items()}, "methods": {}}
        for name, order in ranked.items():
            bits = bits_from_order(order, counts)
            row["methods"][name] = {"bits": bits, **_eval(model, sets, alpha, syn.quantize_experts(w1, table=table, bits=bits))}
        rs = [_eval(model, sets, alpha, syn.quantize_experts(w1, table=table, bits=bits_from_order(o, counts))) for o in randoms]
        row["methods"][RANDOM] = {key: sum(r[key] for r in rs) / len(rs) for key in rs[0]}
        alloc.append(row)
    rec["allocation"] = alloc

    # Smallest safe width per expert group, the other experts kept in float.
    groups = {"frequent": [s for s, f in enumerate(feat) if f in (0, 1)],
              "infrequent": [s for s, f in enumerate(feat) if f in (2, 3)]}
    safe = {}
    for name, members in groups.items():
        if not members:
            safe[name] = None
            continue
        curve = {}
        for b in range(1, 9):
            bits = [b if s in members else 16 for s in range(k)]
            curve[str(b)] = _eval(model, sets, alpha, syn.quantize_experts(w1, table=table, bits=bits))
        ok = [b for b in range(1, 9) if all(curve[str(c)]["acc"] >= rec["float"]["acc"] - sweep.safe_drop
                                             for c in range(b, 9))]
        safe[name] = {"experts": members, "curve": curve, "min_safe_bits": min(ok) if ok else None}
    rec["safe_width"] = safe
    return rec


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} ({len(names)} logical CPUs)"
    except OSError:
        pass
    return {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


SCAN_WIDTHS = (1, 2, 3, 4)


def scan_one(sweep: SyntheticSweep, routing: str, extra: dict, seed: int) -> dict:
    """Train one scan setting and score it by uniform quantization of every expert."""
    cfg = sweep.config(routing, sweep.scan_alpha, seed, extra)
    task = syn.SyntheticTask(cfg, seed)
    res = syn.train(task, cfg)
    g = torch.Generator().manual_seed(10_000 + seed)
    sets = {"frequent": task.sample(sweep.scan_n_test, g, rare=False),
            "infrequent": task.sample(sweep.scan_n_test, g, rare=True)}
    w1 = res.model.w1.detach()
    table = syn.quantize_table(w1, SCAN_WIDTHS, sweep.group_size)
    feat = syn.learned_feature(res, task).tolist()
    return {"seed": seed, "float": _eval(res.model, sets, cfg.alpha),
            "uniform": {str(b): _eval(res.model, sets, cfg.alpha, syn.quantize_experts(w1, [b] * cfg.n_experts, table=table))
                        for b in SCAN_WIDTHS},
            "n_infrequent_experts": sum(f in (2, 3) for f in feat)}


def run_scan(sweep: SyntheticSweep, progress: bool = True) -> list[dict]:
    jobs = [(r, i, e, s) for r in sweep.routings for i, e in enumerate(sweep.scan.get(r, [])) for s in sweep.scan_seeds]
    out = {}
    for routing, i, extra, seed in tqdm(jobs, desc="setting scan", disable=not progress):
        key = (routing, i)
        if key not in out:
            cfg = sweep.config(routing, sweep.scan_alpha, seed, extra)
            out[key] = {"routing": routing, "previous": bool(extra.get("previous")),
                        "config": {k: getattr(cfg, k) for k in ("lr", "steps", "expert_init_std", "n_neurons")},
                        "default": cfg.to_dict() == sweep.config(routing, sweep.scan_alpha, seed).to_dict(),
                        "seeds": []}
        out[key]["seeds"].append(scan_one(sweep, routing, extra, seed))
    return list(out.values())


def run_synthetic(sweep: SyntheticSweep, progress: bool = True) -> dict:
    jobs = [(r, a, s) for r in sweep.routings for a in sweep.alphas for s in sweep.seeds]
    t0 = time.perf_counter()
    scan = run_scan(sweep, progress)
    scan_s = time.perf_counter() - t0
    runs = []
    for routing, alpha, seed in tqdm(jobs, desc="synthetic task", disable=not progress):
        runs.append(run_one(sweep, routing, alpha, seed))
    return {"sweep": sweep.to_dict(), "runs": runs, "scan": scan, "machine": machine(),
            "wall_s": time.perf_counter() - t0, "scan_s": scan_s}
