"""Quality against whole-model size: the per-layer plan methods against the whole-model budget allocator.

Every point is one model quantized (round-to-nearest, asymmetric) and scored on held-out text of its fine-tune
corpus (bits per byte and perplexity per token); its size is ``size.theoretical_model_bytes`` of the quantized
model, in bits per parameter of the whole model (bpw), so methods are compared at the bytes they really use:

  * uniform b (2, 3, 4): every quantizable weight (experts, attention, embeddings, lm_head) at b bits, group 128;
  * the per-layer methods (the paper's router-norm + MaxVar, MaxVar alone, the weight-error knapsack): attention,
    embeddings and lm_head at 4 bits group 128 (the paper's attention width), and the largest mean expert width
    (a multiple of 1/E) whose whole model fits each target; levels {3,2,1} below 3 bits, {4,3,2} above
    (the paper's three-level rule needs equally spaced levels), {4,3,2,1} for the knapsack;
  * the budget allocator (``plan.budget``) at each target, with each weighting.

Routers, norms and biases stay float everywhere (the same bytes in every point).

Quantizers: a method named ``method@q`` stores its experts with quantizer ``q`` (``rtn``, ``hqq``, ``gptq``; plain
names: RTN). GPTQ calibrates on the same calibration text as the calibrated allocators. Per-layer plans are made
as always (the weight-error knapsack scores with ``q`` when ``q`` is data-free, else RTN); a budget allocator
variant scores its widths with ``q``'s own error (``plan.budget``), or with another quantizer's when named
``method@scorer:q``. Non-expert weights are RTN, except under GPTQ, which also quantizes the untied linears
(attention, lm_head) on their calibration inputs (``api.quantize_``); embeddings stay RTN.
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import asdict, dataclass

TARGETS = (2.7, 2.2, 3.2, 3.7)  # the sizes swept, the headline one first
# The quality the whole-model allocator aims for (stated for small-mixtral): at each size in bits per weight, the
# largest held-out perplexity increase over float, in percent.
QUALITY_TARGETS = {2.7: 1.5, 2.2: 5.0}
PER_LAYER = ("router+maxvar", "maxvar", "weight-error")
LABELS = {"router+maxvar": "paper (router-norm + MaxVar)", "maxvar": "MaxVar", "weight-error": "weight-error per layer",
          "budget": "budget allocator (usage-weighted)", "budget-none": "budget allocator (raw error)",
          "budget-calibration": "budget allocator (calibrated usage)", "uniform": "uniform",
          "budget-fisher": "budget allocator (calibrated Fisher)",
          "budget-activation": "budget allocator (calibrated inputs)",
          "budget-activation-matched": "budget allocator (calibrated inputs) at the paper plan's bytes",
          "budget-activation-shakespeare": "budget allocator (calibrated inputs on Shakespeare, plan's default text)",
          "budget-matched": "budget allocator at the paper plan's bytes"}
QUANTIZER_NAMES = {"rtn": "RTN", "hqq": "HQQ", "gptq": "GPTQ"}
# Variants measured on another corpus than the fine-tune corpus the points are scored on: what a user without text
# of the model's domain gets from `moe-export plan --budget` (its default --calib-corpus).
OTHER_TEXT = {"budget-activation-shakespeare": "shakespeare"}


def quantizers_of(method: str) -> tuple[str, str, str]:
    """``"method[@[scorer:]quantizer]"`` -> ``(method, the quantizer the budget allocator scores widths with, the
    quantizer that stores the experts)``; RTN where none is named, the storing one where no scorer is."""
    base, _, q = method.partition("@")
    scorer, _, store = q.rpartition(":")
    store = store or "rtn"
    return base, scorer or store, store


def label(method: str) -> str:
    base, scorer, store = quantizers_of(method)
    text = LABELS.get(base, base)
    if scorer != store:
        text += f", widths by {QUANTIZER_NAMES.get(scorer, scorer)} error,"
    return text if (store, scorer) == ("rtn", "rtn") else f"{text} + {QUANTIZER_NAMES.get(store, store)}"


@dataclass
class BudgetSweep:
    models: tuple[str, ...] = ("small-mixtral",)
    seeds: tuple[int, ...] = (0,)
    targets: tuple[float, ...] = TARGETS
    uniform: tuple[int, ...] = (2, 3, 4)
    methods: tuple[str, ...] = PER_LAYER
    budget_variants: tuple[str, ...] = ("budget", "budget-none", "budget-matched")
    non_expert_bits: int = 4
    group_size: int | None = None  # None: the largest of 128, 64, 32, 16 dividing every expert input dim
    eval_tokens: int = 8192
    calib_tokens: int = 4096

    def to_dict(self) -> dict:
        return asdict(self)


def _levels(avg: float) -> list[int]:
    return [3, 2, 1] if avg <= 3 else [4, 3, 2]


def _fixed_policy_bytes(model, policy, group_size: int) -> tuple[float, float, int]:
    """``(bytes of everything but the routed experts under policy, expert parameters, parameters)``."""
    from moe_export.models import find_moe_layers, parameter_role_lookup
    from moe_export.size import non_expert_bytes

    layers = find_moe_layers(model)
    experts = {l.param_name(p, e) for l in layers for p in l.projections for e in range(l.num_experts)}
    role_of = parameter_role_lookup(model)
    rest, n_exp, n_all = 0.0, 0, 0
    for name, p in model.named_parameters():
        n_all += p.numel()
        if name in experts:
            n_exp += p.numel()
            continue
        q = policy.quant_for(role_of(name)) if p.dim() == 2 else None
        rest += non_expert_bytes(tuple(p.shape), p.element_size(), q)
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    rest += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in non_persistent)
    return rest, n_exp, n_all


def expert_mean_for(model, target_bpw: float, policy, group_size: int, symmetric: bool = False) -> float:
    """The largest mean expert width, a multiple of 1/E, whose whole model stays within ``target_bpw``."""
    from moe_export.models import find_moe_layers
    from moe_export.size import theoretical_bytes

    layers = find_moe_layers(model)
    E = layers[0].num_experts
    rest, _, n_all = _fixed_policy_bytes(model, policy, group_size)
    shapes = [tuple(l.expert_weight(p, 0).shape) for l in layers for p in l.projections for _ in range(l.num_experts)]

    def total(avg):
        return rest + sum(theoretical_bytes(n, k, avg, group_size, symmetric) for n, k in shapes)

    avg = 1.0
    for s in range(E, 4 * E + 1):
        if total(s / E) <= target_bpw * n_all / 8:
            avg = s / E
    return avg


def run_model(sweep: BudgetSweep, name: str, seed: int, progress: bool = True, done: dict | None = None,
              save=None) -> dict:
    """One model's points. ``done``: a partial record of the same sweep (its points are kept, not recomputed);
    ``save(rec)`` is called after every point, so an interrupted sweep resumes and a partial one can be reported."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.eval import bits_per_byte, logits_fn_for
    from moe_export.plan.bitplan import BitPlan, NonExpertPolicy, default_group_size, expert_in_dims
    from moe_export.plan.budget import BudgetConfig, budget_plan, fisher_diagonal, input_moments, model_items
    from moe_export.quant.base import get_quantizer
    from moe_export.plan.methods import PlanConfig, make_plan
    from moe_export.size import theoretical_model_bytes
    from moe_export.zoo import build
    from moe_export.zoo.data import calibration_batches, token_stream
    from moe_export.zoo.folders import load
    from moe_export.zoo.registry import get_entry
    from moe_export.models import find_moe_layers, model_architecture
    from moe_export.quant.calibration import CalibrationConfig
    import torch

    entry = get_entry(name)
    folder = build(name, seed=seed, progress=progress)
    model, tok = load(folder, which="finetuned")
    corpus = entry.finetune.corpus
    test = token_stream(tok, corpus, "test")
    n_params = sum(p.numel() for p in model.parameters())
    rec = {"model": name, "seed": seed, "corpus": corpus, "parameters": n_params, "points": []}
    if done is not None:
        rec = done
    have = {(p["method"], p["target_bpw"]) for p in rec["points"]}

    def score(m) -> dict:
        r = bits_per_byte(logits_fn_for(m), tok, test, entry.seq_len, max_tokens=sweep.eval_tokens, progress=False)
        import math

        return {"bpb": r["bits_per_byte"], "ppl": math.exp(r["nats_per_token"]), "tokens": r["tokens_scored"]}

    if "float" not in rec:
        t0 = time.perf_counter()
        rec["float"] = {**score(model), "bpw": 8 * theoretical_model_bytes(model) / n_params}
        rec["float_eval_s"] = time.perf_counter() - t0

    def point(method, target, plan, plan_s, **extra):
        store = quantizers_of(method)[2]
        cal = None
        if get_quantizer(store).needs_calibration:  # the calibrated allocators' text, for a fair comparison
            cal = CalibrationConfig(n_tokens=sweep.calib_tokens, seq_len=entry.seq_len, seed=seed, corpus=corpus,
                                    batches=torch.cat(calib))
        q = quantize_(copy.deepcopy(model), MoEQuantConfig(plan=plan, quantizer=store, calibration=cal), progress=False)
        nbytes = theoretical_model_bytes(q)
        p = {"method": method, "target_bpw": target, "bpw": 8 * nbytes / n_params, "bytes": nbytes,
             "plan_s": plan_s, **score(q), "quantizer": store, **extra}
        del q
        rec["points"].append(p)
        if save is not None:
            save(rec)
        if progress:
            print(f"{name} s{seed} {method:>20} target {target}: {p['bpw']:.3f} bpw, bpb {p['bpb']:.4f}, ppl {p['ppl']:.3f}",
                  flush=True)

    layers = find_moe_layers(model)
    gs = sweep.group_size or default_group_size(expert_in_dims(layers))
    rec["group_size"] = gs
    policy = NonExpertPolicy.parse(",".join(f"{r}={sweep.non_expert_bits}" for r in (
        "attention", "shared_experts", "embeddings", "lm_head", "dense_mlp")), gs)
    calib = None
    calibrated = ("budget-calibration", "budget-fisher", "budget-activation", "budget-activation-matched",
                  *OTHER_TEXT)
    named = [quantizers_of(m) for m in (*sweep.methods, *sweep.budget_variants)]
    if {b for b, _, _ in named} & set(calibrated) or any(get_quantizer(q).needs_calibration for _, _, q in named):
        calib = list(calibration_batches(tok, sweep.calib_tokens, entry.seq_len, seed=seed, corpus=corpus).split(8))
    tables = {}  # the budget allocator's error tables (per weighting and scoring quantizer), computed once
    for target in sweep.targets:
        avg = expert_mean_for(model, target, policy, gs)
        for method in sweep.methods:
            if (method, target) in have:
                continue
            base, _, store = quantizers_of(method)
            levels = [4, 3, 2, 1] if base == "weight-error" else _levels(avg)
            cfg = PlanConfig(avg_bits=avg, levels=levels, method=base, group_size=gs, non_expert=policy,
                             quantizer="rtn" if get_quantizer(store).needs_calibration else store)
            t = time.perf_counter()
            plan = make_plan(model, cfg, reference=folder / "pretrained", progress=False)
            point(method, target, plan, time.perf_counter() - t, expert_avg_bits=avg, levels=levels)
        for variant in sweep.budget_variants:
            if (variant, target) in have:
                continue
            name_, scorer, _ = quantizers_of(variant)
            text = OTHER_TEXT.get(name_, corpus)
            base = name_.removesuffix("-matched").removesuffix(f"-{text}")
            weighting = {"budget-none": "none", "budget-fisher": "fisher", "budget-activation": "activation"}.get(base, "usage")
            t = time.perf_counter()
            size = f"{target}bpw"
            if name_.endswith("-matched"):  # the paper's plan's own bytes, which can exceed the target
                paper = [p for p in rec["points"] if p["method"] == "router+maxvar" and p["target_bpw"] == target]
                if not paper:
                    continue
                size = f"{paper[0]['bytes']!r}B"
            cfg = BudgetConfig(size, weighting=weighting, quantizer=scorer)
            batches = calib
            if text != corpus:
                batches = list(calibration_batches(tok, sweep.calib_tokens, entry.seq_len, seed=seed,
                                                   corpus=text).split(8))
            key = (weighting if weighting in ("fisher", "activation") else "plain", scorer, text)
            if key not in tables:
                sens = fisher_diagonal(model, batches) if weighting == "fisher" else None
                if weighting == "activation" and ("moments", text) not in tables:  # one measurement for every scorer
                    tables["moments", text] = input_moments(model, batches)
                moments = tables["moments", text] if weighting == "activation" else None
                tables[key] = (model_items(model, get_quantizer(cfg.quantizer), cfg.symmetric, cfg.bits, cfg.groups,
                                           sensitivity=sens, moments=moments), time.perf_counter() - t)
            plan = budget_plan(model, cfg, batches=batches if name_ in calibrated else None, model_name=name,
                               table=tables[key][0])
            point(variant, target, plan, time.perf_counter() - t, error_table_s=tables[key][1], planned_bytes=plan.budget["planned_bytes"],
                  budget_bytes=plan.budget["bytes"], solver_s=plan.provenance["solver"]["seconds"],
                  choices=_choices(plan))
    for b in sweep.uniform:
        if ("uniform", float(b)) in have:
            continue
        uniform = NonExpertPolicy.parse(",".join(f"{r}={b}" for r in ("attention", "shared_experts", "embeddings",
                                                                      "lm_head", "dense_mlp")), gs)
        plan = BitPlan.uniform(layers, b, gs, model_name=name, architecture=model_architecture(model))
        plan.non_expert = uniform.to_dict()
        point("uniform", float(b), plan, 0.0, bits=b)
    return rec


def _choices(plan) -> dict:
    """Where the bytes went: per role, the mean width (float counted as 16) over its parameters is not kept;
    instead the plan's per-tensor entries, short."""
    out = {}
    for l in plan.layers:
        for p, t in (l.tensors or {}).items():
            out[f"{l.name}.{p}"] = f"g{t['group_size']}:" + "".join(map(str, t["bits"]))
    for n, t in plan.tensors.items():
        out[n] = "float" if t == "float" else f"{t['bits']}b g{t['group_size']}"
    return out


def run(sweep: BudgetSweep, progress: bool = True, partial=None) -> dict:
    """Every model and seed. ``partial``: a JSON file holding the records so far (written after every point;
    a rerun of the same sweep resumes from it)."""
    import json
    from pathlib import Path

    from moe_export.io import atomic_write_text

    t0 = time.perf_counter()
    saved = {}
    if partial is not None and Path(partial).is_file():
        old = json.loads(Path(partial).read_text())
        # points are keyed by (method, target): a sweep that only adds methods, targets or widths reuses the rest
        same = lambda d: {k: v for k, v in d.items() if k not in ("methods", "budget_variants", "targets", "uniform")}
        if same(old.get("sweep", {})) == same(json.loads(json.dumps(sweep.to_dict()))):
            saved = {(r["model"], r["seed"]): r for r in old["runs"]}
    runs = []

    def save(rec):
        if partial is not None:
            cur = {**{(r["model"], r["seed"]): r for r in runs}, (rec["model"], rec["seed"]): rec}
            atomic_write_text(partial, json.dumps({"sweep": sweep.to_dict(), "runs": list(cur.values()),
                                                   "wall_s": time.perf_counter() - t0}, indent=1) + "\n")

    for m in sweep.models:
        for s in sweep.seeds:
            runs.append(run_model(sweep, m, s, progress, done=saved.get((m, s)), save=save))
    return {"sweep": sweep.to_dict(), "runs": runs, "wall_s": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ report
SECTION = "## 3. One byte budget for the whole model"


def _method_order(runs) -> list[str]:
    seen = []
    for r in runs:
        for p in r["points"]:
            if p["method"] != "uniform" and p["method"] not in seen:
                seen.append(p["method"])
    return seen


def plot(results: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from moe_export.io import atomic_path

    runs = results["runs"]
    models = sorted({r["model"] for r in runs})
    fig, axes = plt.subplots(1, len(models), figsize=(6.4 * len(models), 4.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        rs = [r for r in runs if r["model"] == model]
        for method in _method_order(rs) + ["uniform"]:
            # one point per target: the mean over the seeds it was measured on, their spread as error bars
            cells = [_over_seeds(rs, method, t) for t in sorted({p["target_bpw"] for r in rs for p in r["points"]
                                                                   if p["method"] == method})]
            pts = sorted((c["bpw"][0], c["bpb"][0], c["bpb"][1]) for c in cells)
            if pts:  # uniform dotted, experts stored by another quantizer than RTN dashed
                other = quantizers_of(method)[2] != "rtn"
                style = dict(marker="s" if method == "uniform" else "^" if other else "o",
                             linestyle=":" if method == "uniform" else "--" if other else "-", label=label(method))
                x, y, sd = zip(*pts)
                if len(rs) > 1:
                    ax.errorbar(x, y, yerr=sd, capsize=2, **style)
                else:
                    ax.plot(x, y, **style)
        fl = sum(r["float"]["bpb"] for r in rs) / len(rs)
        ax.axhline(fl, color="grey", linewidth=0.8, linestyle="--", label="float")
        ax.set_xlabel("whole-model bits per weight (theoretical bytes x 8 / parameters)")
        ax.set_ylabel("held-out bits per byte (lower is better)")
        ax.set_title(f"{model}: quality against whole-model size", fontsize=10)
        ax.set_ylim(fl - 0.02, min(max(p["bpb"] for r in rs for p in r["points"]), fl * 1.25) + 0.02)
        ax.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def _seeds_of(runs) -> dict:
    out: dict[str, list[int]] = {}
    for r in runs:
        out.setdefault(r["model"], []).append(r["seed"])
    return out


def _seeds(runs) -> str:
    return ", ".join(f"{', '.join(map(str, sorted(s)))} ({m})" for m, s in _seeds_of(runs).items())


def _groups(runs) -> str:
    return ", ".join(f"{g} ({', '.join(sorted({r['model'] for r in runs if r['group_size'] == g}))})"
                     for g in sorted({r["group_size"] for r in runs}))


def _mean_sd(xs) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    xs = list(xs)
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _over_seeds(rs, method: str, target: float) -> dict | None:
    """``method``'s points at ``target`` over the runs ``rs`` (one per build seed): ``seeds``, the points by seed,
    and (mean, sd) of bpw, bpb, ppl and the perplexity change from float in percent (each seed's against its own
    float model); None where no seed has the point."""
    by_seed = {}
    for r in sorted(rs, key=lambda r: r["seed"]):
        ps = [p for p in r["points"] if p["method"] == method and abs(p["target_bpw"] - target) < 1e-9]
        if ps:
            by_seed[r["seed"]] = (ps[0], r["float"])
    if not by_seed:
        return None
    pts = [p for p, _ in by_seed.values()]
    return {"method": method, "seeds": list(by_seed), "points": {s: p for s, (p, _) in by_seed.items()},
            **{k: _mean_sd(p[k] for p in pts) for k in ("bpw", "bpb", "ppl")},
            "change": _mean_sd(100 * (p["ppl"] / f["ppl"] - 1) for p, f in by_seed.values())}


def _seed_note(cell: dict, n_model: int) -> str:
    """Which seeds a cell of a several-seed table covers, where they are fewer than the model's."""
    if len(cell["seeds"]) == n_model:
        return ""
    which = ", ".join(map(str, cell["seeds"]))
    return f" [n={len(cell['seeds'])}: seed{'s' if len(cell['seeds']) > 1 else ''} {which}]"


def _pm(ms, digits: int, n: int) -> str:
    """``mean ± sd`` (the mean alone for one seed)."""
    m, sd = ms
    return f"{m:.{digits}f}" if n == 1 else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _change(ms, n: int) -> str:
    m, sd = ms
    return f"{m:+.1f}%" if n == 1 else f"{m:+.1f} ± {sd:.1f}%"


def markdown(results: dict, img_rel: str = "img") -> list[str]:
    """The section of docs/results.md: how it was made, the table per model, the plot, what it shows."""
    sw, runs = results["sweep"], results["runs"]
    lines = [SECTION, ""]
    stores = {quantizers_of(p["method"])[2] for r in runs for p in r["points"]}
    quant = "RTN, asymmetric" if stores == {"rtn"} else (
        "RTN, asymmetric, or, in the tables headed HQQ or GPTQ, the experts stored by that quantizer (GPTQ calibrated "
        f"on the {sw['calib_tokens']} calibration tokens the calibrated allocators measure, every token to every "
        "expert, layer by layer on the quantized model's own inputs, then attention and lm_head on their inputs "
        "in the model with quantized experts); other non-expert weights (embeddings; all of them under HQQ) are RTN. "
        "Per-layer plans are the same plans in every table (the weight-error knapsack scores with HQQ in the HQQ "
        "table); a budget allocator scores each width with the error of the quantizer that stores it unless its "
        "column says otherwise (GPTQ: quantized against each expert's measured routed-input moment and scored on it)")
    lines += [
        f"Each point: a plan, `moe_export.api.quantize_` ({quant}), then held-out bits per byte and perplexity "
        f"per token on the first {sw['eval_tokens']} tokens of the fine-tune corpus's test split, on the fine-tuned model. "
        "Size is the whole model's theoretical bytes (`moe_export.size.theoretical_model_bytes`: packed codes, float16 "
        "scales and zeros, every float weight at its stored float32) x 8 / all parameters, so methods are compared at "
        "the bytes they really use. Per-layer methods (the paper's router-norm + MaxVar, MaxVar alone, the weight-error "
        f"knapsack) keep attention, embeddings and lm_head at {sw['non_expert_bits']} bits, group {_groups(runs)} "
        "(the paper's attention width; float embeddings alone would exceed these budgets) and take the largest mean "
        "expert width, in steps of 1/E, whose model fits the target; levels {3,2,1} up to 3 bits, {4,3,2} above, "
        "{4,3,2,1} for the knapsack. The budget allocator (`moe-export plan --budget`) chooses every tensor's width "
        "(1,2,3,4,6,8 or float) and group size (32,64,128) for the target; *usage-weighted*: expert errors x top_k/E "
        "(the share of tokens each expert sees), *raw error*: no weighting; *calibrated usage*: expert errors x each "
        f"expert's routing frequency on {sw['calib_tokens']} tokens of the fine-tune corpus's train split; *calibrated "
        "Fisher*: every weight element's squared error x its diagonal empirical Fisher (per-sequence squared "
        "gradients of the next-token loss) on the same tokens, nothing else; *calibrated inputs*: every weight's output "
        "error tr(dW H dW^T) with H the second moment of its inputs on the same tokens (an expert's routed tokens "
        "only), scaled to mean input variance 1 (embeddings: raw error); *at the paper plan's bytes*: usage-weighted "
        "(or calibrated inputs), "
        "with the budget set to the bytes the paper's plan actually used at that target (equal bytes, where the "
        "per-layer methods could not get down to the target). "
        + ("*Calibrated inputs on Shakespeare*: the calibrated-inputs weighting measured on as many tokens of the "
           "Shakespeare train split (the zoo's pre-training text and `moe-export plan`'s default calibration text, "
           "not the domain scored): what a user with no text of the model's domain gets. "
           if any(p["method"].split("@")[0] in OTHER_TEXT for r in runs for p in r["points"]) else "")
        + "Uniform b: every quantizable "
        f"weight at b bits, group {_groups(runs)}. Routers and norms stay float in every point. "
        f"Build seeds: {_seeds(runs)}" + (" (one build seed: differences of a few thousandths of a bit per byte may "
                                          "be noise)." if any(len(s) == 1 for s in _seeds_of(runs).values()) else ".")
        + (" Where a model has several build seeds, every cell, verdict and plotted point is the mean over the seeds "
           "it was measured on ± the sample standard deviation (error bars in the plot); a cell measured on fewer "
           "seeds than its model has says which (n=k). Each seed's perplexity change is taken against that seed's own "
           "float model, and the budget allocator is compared with a per-layer method seed by seed, on the seeds "
           "both were measured on; each verdict also says on how many of the seeds it holds."
           if any(len(s) > 1 for s in _seeds_of(runs).values()) else ""),
        ""]
    commands = results.get("commands") or ({"": results["command"]} if results.get("command") else {})
    if commands:
        flat = [c for cs in commands.values() for c in ([cs] if isinstance(cs, str) else cs)]
        lines += ["Written by " + ", ".join(f"`{c}`" for c in dict.fromkeys(flat)) + ".", ""]
    if results.get("note"):
        lines += [results["note"], ""]
    for model in sorted({r["model"] for r in runs}):
        rs = sorted((r for r in runs if r["model"] == model), key=lambda r: r["seed"])
        n = len(rs)
        fl_bpb, fl_ppl = _mean_sd(r["float"]["bpb"] for r in rs), _mean_sd(r["float"]["ppl"] for r in rs)
        seeds = f"; mean ± sd over build seeds {', '.join(str(r['seed']) for r in rs)}, n={n}" if n > 1 else ""
        lines.append(f"**{model}** ({rs[0]['parameters']:,} parameters; float32: bpb {_pm(fl_bpb, 4, n)}, perplexity "
                     f"{_pm(fl_ppl, 3, n)}{seeds}). Cells: achieved bpw / bits per byte / perplexity (change from float)"
                     + ("; bits per byte and the change from float as mean ± sd over the seeds; best mean bits per byte "
                        "at each target (among the cells of the most seeds) in bold" if n > 1 else
                        "; best bits per byte at each target in bold")
                     + (", one table per quantizer of the experts." if len(_by_quantizer(rs)) > 1 else "."))
        lines.append("")
        for store, methods in _by_quantizer(rs).items():
            lines += _table(rs, methods, sw["targets"], store if len(_by_quantizer(rs)) > 1 else None)
        lines += _verdicts(rs, sw["targets"])
        lines += _quality_verdicts(rs)
        uni = [(b, _over_seeds(rs, "uniform", b)) for b in sorted({p["bits"] for r in rs for p in r["points"]
                                                                   if p["method"] == "uniform"})]
        if uni:
            lines.append("Uniform: " + "; ".join(
                f"{b} bits: {c['bpw'][0]:.3f} bpw, bpb {_pm(c['bpb'], 4, len(c['seeds']))}, perplexity "
                f"{c['ppl'][0]:.3f} ({_change(c['change'], len(c['seeds']))}){_seed_note(c, n)}" for b, c in uni) + ".")
            lines.append("")
    lines.append(f"![quality against whole-model size]({img_rel}/budget_bpb_vs_bpw.png)")
    lines.append("")
    return lines


def _by_quantizer(rs) -> dict[str, list[str]]:
    """The methods of ``rs`` by the quantizer that stores their experts (RTN first)."""
    out: dict[str, list[str]] = {}
    for m in sorted(_method_order(rs), key=lambda m: quantizers_of(m)[2] != "rtn"):
        out.setdefault(quantizers_of(m)[2], []).append(m)
    return out


def _table(rs, methods, targets, store: str | None) -> list[str]:
    """One table of ``methods`` (rows: targets); ``store``: the quantizer it is headed with, None for no heading.
    ``rs``: one model's runs, one per build seed; a cell is the mean over the seeds it was measured on."""
    n_model = len(rs)
    lines = [f"Experts quantized with {QUANTIZER_NAMES.get(store, store)}:", ""] if store else []
    lines.append("| target bpw | " + " | ".join(label(m) for m in methods) + " |")
    lines.append("|---|" + "---|" * len(methods))
    for t in targets:
        cells = {m: c for m in methods if (c := _over_seeds(rs, m, t)) is not None}
        most = max((len(c["seeds"]) for c in cells.values()), default=0)
        # means over different seeds are not comparable: the bold cell is among those of the most seeds
        best = min((c["bpb"][0] for c in cells.values() if len(c["seeds"]) == most), default=None)
        row = []
        for m in methods:
            if m not in cells:
                row.append("")
                continue
            c = cells[m]
            k = len(c["seeds"])
            txt = (f"{c['bpw'][0]:.3f} / {_pm(c['bpb'], 4, k)} / {c['ppl'][0]:.3f} ({_change(c['change'], k)})"
                   + (_seed_note(c, n_model) if n_model > 1 else ""))
            row.append(f"**{txt}**" if k == most and c["bpb"][0] == best else txt)
        lines.append(f"| {t:g} | " + " | ".join(row) + " |")
    lines.append("")
    return lines


def _verdicts(rs, targets) -> list[str]:
    """Per target: each budget allocator variant against the best per-layer method at no more bytes whose experts
    the same quantizer stores. Over several seeds: paired seed by seed, against the per-layer methods measured on
    every seed the variant was (at as many or more bytes on each), the best of them by mean bits per byte; the
    verdict is the mean difference, and on how many seeds the variant beats that seed's best such method."""
    n_model = len(rs)
    out = []
    for t in targets:
        pts = [p for r in rs for p in r["points"] if abs(p["target_bpw"] - t) < 1e-9]
        per_layer = list(dict.fromkeys(p["method"] for p in pts if quantizers_of(p["method"])[0] in PER_LAYER))
        for variant in dict.fromkeys(p["method"] for p in pts if p["method"].startswith("budget")):
            mine = _over_seeds(rs, variant, t)
            store = quantizers_of(variant)[2]
            rivals, fewer = {}, []
            for method in per_layer:
                if quantizers_of(method)[2] != store:
                    continue
                c = _over_seeds(rs, method, t)
                if not set(mine["seeds"]) <= set(c["seeds"]):
                    fewer.append(method)
                elif all(c["points"][s]["bpw"] >= mine["points"][s]["bpw"] - 1e-9 for s in mine["seeds"]):
                    rivals[method] = {s: c["points"][s] for s in mine["seeds"]}
            if not rivals:
                continue
            n = len(mine["seeds"])
            mean_bpb = lambda ps: statistics.mean(ps[s]["bpb"] for s in mine["seeds"])
            best = min(rivals, key=lambda m: mean_bpb(rivals[m]))
            if n_model == 1:
                m, b = mine["points"][mine["seeds"][0]], rivals[best][mine["seeds"][0]]
                out.append(f"- target {t:g}: {label(variant)} {m['bpw']:.3f} bpw, bpb {m['bpb']:.4f} (perplexity "
                           f"{mine['change'][0]:+.1f}% from float) against the best per-layer method at "
                           f"as many or more bytes, {label(best)} {b['bpw']:.3f} bpw, bpb {b['bpb']:.4f}: "
                           f"{'better' if m['bpb'] < b['bpb'] else 'worse'} by {abs(m['bpb'] - b['bpb']):.4f} bits per byte.")
                continue
            diff = _mean_sd(mine["points"][s]["bpb"] - rivals[best][s]["bpb"] for s in mine["seeds"])
            wins = sum(mine["points"][s]["bpb"] < min(ps[s]["bpb"] for ps in rivals.values()) for s in mine["seeds"])
            theirs = _mean_sd(rivals[best][s]["bpb"] for s in mine["seeds"])
            on = (f"seed{'s' if n > 1 else ''} {', '.join(map(str, mine['seeds']))}" if n < n_model
                  else f"{n} seeds")
            out.append(f"- target {t:g} ({on}): {label(variant)} {mine['bpw'][0]:.3f} bpw, bpb {_pm(mine['bpb'], 4, n)} "
                       f"(perplexity {_change(mine['change'], n)} from float) against the best per-layer method at "
                       f"as many or more bytes, {label(best)} {statistics.mean(p['bpw'] for p in rivals[best].values()):.3f} "
                       f"bpw, bpb {_pm(theirs, 4, n)}: {'better' if diff[0] < 0 else 'worse'} by {abs(diff[0]):.4f}"
                       + (f" ± {diff[1]:.4f}" if n > 1 else "") + " bits per byte"
                       + (f"; better than every per-layer method on {wins} of {n} seeds" if n > 1 else "")
                       + (f" (not measured on {'all these seeds' if n > 1 else 'this seed'}, so not compared: "
                          f"{', '.join(label(m) for m in fewer)})" if fewer else "") + ".")
    return out + ([""] if out else [])


def _quality_verdicts(rs) -> list[str]:
    """Per size of ``QUALITY_TARGETS``: the best whole-model plan at or under that many bits per weight, met or not.
    Over several seeds: the best by mean perplexity change among the plans measured on the most seeds (every seed's
    point at or under the size), met on the mean, and on how many seeds it is met; a plan measured on fewer seeds
    that does better on its seeds is named too."""
    n_model = len(rs)
    out = []
    for t, pct in QUALITY_TARGETS.items():
        cands = [c for m in dict.fromkeys(p["method"] for r in rs for p in r["points"] if p["method"].startswith("budget"))
                 if (c := _over_seeds(rs, m, t)) is not None
                 and all(p["bpw"] <= t + 1e-9 for p in c["points"].values())]
        if not cands:
            continue
        most = max(len(c["seeds"]) for c in cands)
        best = min((c for c in cands if len(c["seeds"]) == most), key=lambda c: c["change"][0])
        change = best["change"][0]
        if n_model == 1:
            p = best["points"][best["seeds"][0]]
            out.append(f"- quality target at {t:g} bpw, perplexity within {pct:g}% of float: "
                       f"{'met' if change <= pct else 'not met'}; the best whole-model plan at or under {t:g} bpw is "
                       f"{label(best['method'])}, {p['bpw']:.3f} bpw, perplexity {p['ppl']:.3f} ({change:+.1f}%).")
            continue
        n = len(best["seeds"])
        floats = {r["seed"]: r["float"]["ppl"] for r in rs}
        changes = lambda c, seeds: [100 * (c["points"][s]["ppl"] / floats[s] - 1) for s in seeds]
        met = sum(x <= pct for x in changes(best, best["seeds"]))
        on = f"seed{'s' if n > 1 else ''} {', '.join(map(str, best['seeds']))}" if n < n_model else f"{n} seeds"
        line = (f"- quality target at {t:g} bpw, perplexity within {pct:g}% of float ({on}): "
                f"{'met' if change <= pct else 'not met'} on the mean, met on {met} of {n} seeds; the best whole-model "
                f"plan at or under {t:g} bpw is {label(best['method'])}, {best['bpw'][0]:.3f} bpw, perplexity "
                f"{best['ppl'][0]:.3f} ({_change(best['change'], n)}).")
        # a plan measured on fewer seeds is compared with the one above on its own seeds only
        better = [c for c in cands if len(c["seeds"]) < most and set(c["seeds"]) <= set(best["seeds"])
                  and c["change"][0] < statistics.mean(changes(best, c["seeds"]))]
        if better:
            c = min(better, key=lambda c: c["change"][0])
            k = len(c["seeds"])
            line = (line[:-1] + f"; measured on fewer seeds (seed{'s' if k > 1 else ''} {', '.join(map(str, c['seeds']))}), "
                    f"{label(c['method'])} is {_change(c['change'], k)} against the plan above's "
                    f"{_change(_mean_sd(changes(best, c['seeds'])), k)} on the same seed{'s' if k > 1 else ''}.")
        out.append(line)
    return out + ([""] if out else [])


def merge(old: dict, new: dict) -> dict:
    """``new`` with the runs of every model and build seed it did not sweep kept from ``old`` (one records file and
    one section for all models and seeds; a rerun of a model's seed replaces that seed's run, a sweep of other seeds
    adds to the model's). The sweeps must agree on everything but models, seeds and which methods, targets and
    uniform widths they ran (each model's table shows its own). A run resumed from the old one's points (every old
    point kept as it was), or one of other seeds than the old runs kept, adds its command to the old ones; ``old``'s
    note stays unless ``new`` has one."""
    import json

    keep = ("models", "seeds", "methods", "budget_variants", "targets", "uniform")
    a, b = json.loads(json.dumps(old["sweep"])), json.loads(json.dumps(new["sweep"]))  # tuples and lists alike
    differ = sorted(k for k in set(a) | set(b) if k not in keep and a.get(k) != b.get(k))
    if differ:
        raise ValueError(f"the saved budget sweep differs in {', '.join(differ)}: its points would not be comparable; "
                         "rerun every model, or write to another folder")
    swept = set(new["sweep"]["models"])
    rerun = {(r["model"], r["seed"]) for r in new["runs"]}
    kept = [r for r in old["runs"] if (r["model"], r["seed"]) not in rerun]
    models = list(dict.fromkeys([r["model"] for r in kept] + list(new["sweep"]["models"])))
    commands = old.get("commands") or {m: old["command"] for m in old["sweep"]["models"] if old.get("command")}
    as_list = lambda c: [c] if isinstance(c, str) else list(c)
    resumed = {m for m in swept if _resumes(old["runs"], new["runs"], m)}
    # a model's old commands stay while any run they wrote does: resumed, or of a seed this sweep did not run
    commands = {m: c for m, c in commands.items()
                if m not in swept or m in resumed or any(r["model"] == m for r in kept)}
    for m, c in (new.get("commands") or {m: new["command"] for m in swept if new.get("command")}).items():
        commands[m] = list(dict.fromkeys(as_list(commands[m]) + as_list(c))) if m in commands else c
    union = {k: list(dict.fromkeys(list(a[k]) + list(b[k])))
             for k in ("seeds", "methods", "budget_variants", "targets", "uniform")}
    out = {**new, "sweep": {**new["sweep"], "models": models, **union}, "runs": kept + new["runs"], "commands": commands}
    out.pop("command", None)
    if "note" not in new and "note" in old:
        out["note"] = old["note"]
    return out


def _resumes(old_runs, new_runs, model) -> bool:
    """Whether ``new_runs`` of ``model`` hold every point of its ``old_runs`` unchanged (a resumed sweep)."""
    key = lambda r: r["seed"]
    old = {key(r): r["points"] for r in old_runs if r["model"] == model}
    new = {key(r): r["points"] for r in new_runs if r["model"] == model}
    return bool(old) and all(s in new and all(p in new[s] for p in pts) for s, pts in old.items())


def splice(md_text: str, section: list[str]) -> str:
    """``md_text`` with the budget section replaced (or appended): it runs from its heading to the next ``## ``
    heading or the end."""
    lines = md_text.rstrip("\n").split("\n")
    if SECTION in lines:
        i = lines.index(SECTION)
        j = next((k for k in range(i + 1, len(lines)) if lines[k].startswith("## ")), len(lines))
        lines = lines[:i] + section + lines[j:]
    else:
        lines = lines + [""] + section
    return "\n".join(lines).rstrip("\n") + "\n"


QUICK = BudgetSweep(models=("tiny",), targets=(2.7, 3.7), uniform=(3,), eval_tokens=1024)


def write(results: dict, out_dir) -> list:
    """``results-budget.json``, the plot, and the section spliced into ``results.md`` of ``out_dir``."""
    import json
    from pathlib import Path

    from moe_export.io import atomic_write_text

    out_dir = Path(out_dir)
    (out_dir / "img").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "results-budget.json", json.dumps(results, indent=1) + "\n")
    plot(results, out_dir / "img" / "budget_bpb_vs_bpw.png")
    md = out_dir / "results.md"
    atomic_write_text(md, splice(md.read_text() if md.exists() else "", markdown(results)))
    written = [out_dir / "results-budget.json", out_dir / "img" / "budget_bpb_vs_bpw.png", md]
    for p in written:
        p.chmod(0o644)
    return written


def main(argv=None) -> None:
    """``python -m moe_export.repro.budget_sweep --out docs [--quick] [--models a,b] [--seeds 0,1]``."""
    import argparse
    import sys
    from dataclasses import replace

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--models", default=None)
    ap.add_argument("--seeds", default=None)
    ap.add_argument("--targets", default=None, help="whole-model sizes in bits per weight, e.g. 2.7,2.2 "
                    f"[default: {','.join(map(str, TARGETS))}]")
    ap.add_argument("--uniform", default=None, help="widths of the uniform points, e.g. 2,3,4 [default]; none: no such point")
    ap.add_argument("--variants", default=None,
                    help="budget variants: budget,budget-none,budget-matched,budget-calibration,budget-fisher,"
                         "budget-activation,budget-activation-matched,budget-activation-shakespeare")
    ap.add_argument("--methods", default=None,
                    help="per-layer methods: router+maxvar,maxvar,weight-error; METHOD@QUANTIZER (hqq, gptq) stores the "
                         "experts with that quantizer, for the budget variants too (VARIANT@SCORER:QUANTIZER: widths "
                         "scored with SCORER's error)")
    ap.add_argument("--from-json", default=None, help="rebuild the section and plot from saved records")
    ap.add_argument("--note", default=None, help="a paragraph kept with the records and shown under the section's intro")
    a = ap.parse_args(argv)
    import json
    from pathlib import Path

    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
    else:
        sweep = QUICK if a.quick else BudgetSweep()
        if a.models:
            sweep = replace(sweep, models=tuple(a.models.split(",")))
        if a.seeds:
            sweep = replace(sweep, seeds=tuple(int(s) for s in a.seeds.split(",")))
        if a.targets:
            sweep = replace(sweep, targets=tuple(float(t) for t in a.targets.split(",")))
        if a.uniform:
            sweep = replace(sweep, uniform=() if a.uniform == "none" else tuple(int(b) for b in a.uniform.split(",")))
        if a.variants:
            sweep = replace(sweep, budget_variants=tuple(a.variants.split(",")))
        if a.methods:
            sweep = replace(sweep, methods=tuple(a.methods.split(",")))
        results = run(sweep, partial=Path(a.out) / "results-budget.partial.json")
        command = "python -m moe_export.repro.budget_sweep " + " ".join(argv if argv is not None else sys.argv[1:])
        results["commands"] = {m: command for m in sweep.models}
        saved = Path(a.out) / "results-budget.json"
        if saved.is_file():
            results = merge(json.loads(saved.read_text()), results)
    if a.note is not None:
        results["note"] = a.note
    for p in write(results, a.out):
        print(f"wrote {p}")


if __name__ == "__main__":
    main()
