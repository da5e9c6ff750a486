"""Zoo part of the reproduction: every plan method x average bits x build seed on models trained here.

Per zoo build (``moe_export.zoo.build``: ``initial/``, ``pretrained/``, ``finetuned/``):
  * router scores of every MoE layer: the signed change over the fine-tune (``finetuned - pretrained``,
    the paper's Switch setting), the change over the pre-training (``pretrained - initial``) and the
    final norm alone (the two readings of its Mixtral setting, where only the pre-trained model exists),
    and for Switch the absolute change;
  * for each level set and average width, a plan per method (``moe_export.plan.methods.make_plan``,
    timed), ``quantize_`` of a fresh copy of the fine-tuned model, and held-out bits per byte on the
    fine-tune corpus (lower is better) plus continuation-cloze accuracy;
  * across build seeds: Spearman correlation of the per-layer expert rankings.
Group size: the paper's 128 where it divides every expert input dim, else the largest power of two that does.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm import tqdm

USES_REFERENCE = ("router", "router+maxvar")  # methods whose plan depends on the reference checkpoint

LEVEL_SETS = {
    "3,2": ([3, 2], [2.0 + 0.125 * i for i in range(9)]),
    "3,2,1": ([3, 2, 1], [1.5 + 0.125 * i for i in range(9)]),
}


@dataclass
class ZooSweep:
    models: tuple[str, ...] = ("tiny",)
    seeds: tuple[int, ...] = (0,)
    level_sets: tuple[str, ...] = ("3,2", "3,2,1")
    methods: tuple[str, ...] = ("router", "router+maxvar", "maxvar", "weight-error", "frequency", "routing-weight",
                                "pmq", "random", "uniform")
    avg_bits: dict = field(default_factory=dict)  # level set -> grid override (the quick mode thins the grid)
    eval_tokens: int = 4096
    n_cloze: int = 0
    # level set -> average widths at which cloze accuracy is scored too (absent: every point). Cloze reads
    # 4 passages per item, ~12x the tokens of the bpb eval, so the full sweep scores it on a thinner grid.
    cloze_avg_bits: dict = field(default_factory=dict)
    calib_tokens: int = 2048
    random_seeds: tuple[int, ...] = (0, 1, 2)  # random plans averaged per point
    # "finetune": plan the fine-tuned model, router score = change over the fine-tune (paper's Switch setting);
    # "pretrain-init": plan the pre-trained model, router score = change from the initialisation;
    # "pretrain-only": plan the pre-trained model, router score = final norm (what the paper's Mixtral code
    # does); both pre-train settings are evaluated on the pre-training corpus.
    settings: tuple[str, ...] = ("finetune", "pretrain-init", "pretrain-only")
    controls: bool = True  # the repeat and same-domain control fine-tunes (see control_finetunes)
    model_seeds: dict = field(default_factory=dict)  # name -> seeds, overriding `seeds` for that model

    def seeds_for(self, name: str) -> tuple[int, ...]:
        return tuple(self.model_seeds.get(name, self.seeds))

    def grid(self, level_set: str) -> tuple[list[int], list[float]]:
        levels, grid = LEVEL_SETS[level_set]
        return levels, list(self.avg_bits.get(level_set, grid))

    def to_dict(self) -> dict:
        return asdict(self)


def group_size_for(layers) -> int:
    dims = {d for l in layers for d in (l.hidden_size, l.intermediate_size)}
    g = 128
    while any(d % g for d in dims):
        g //= 2
    return g


def spearman(a, b) -> float:
    ra = torch.tensor(a).argsort().argsort().double()
    rb = torch.tensor(b).argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def router_scores(model_dir) -> dict:
    """Per MoE layer: signed change over the fine-tune, its absolute value, the fine-tuned norm, the
    pre-trained norm and the change over the pre-training (pre-trained minus initial norm) of each router row."""
    from pathlib import Path

    from moe_export.models import find_moe_layers
    from moe_export.zoo.folders import load

    ft, _ = load(model_dir, which="finetuned")
    pre, _ = load(model_dir, which="pretrained")
    init = load(model_dir, which="initial")[0] if (Path(model_dir) / "initial").is_dir() else None
    out = {}
    for i, (a, b) in enumerate(zip(find_moe_layers(ft), find_moe_layers(pre))):
        n_ft, n_pre = a.router_weight.norm(dim=1), b.router_weight.norm(dim=1)
        out[a.name] = {"change": (n_ft - n_pre).tolist(), "abs_change": (n_ft - n_pre).abs().tolist(),
                       "final_norm": n_ft.tolist(), "pretrained_norm": n_pre.tolist()}
        if init is not None:
            n_init = find_moe_layers(init)[i].router_weight.norm(dim=1)
            out[a.name]["init_change"] = (n_pre - n_init).tolist()
    return out


def control_finetunes(name: str, seed: int, progress: bool = True) -> dict:
    """Router-norm change of two extra fine-tunes from the same pre-trained checkpoint, same step count:
    the fine-tune task again with another data order (the signal should repeat) and a same-domain control
    that continues on the pre-training corpus (generic drift). Spearman against the build's fine-tune."""
    import tempfile
    from dataclasses import replace as dc_replace
    from pathlib import Path

    from moe_export.models import find_moe_layers
    from moe_export.zoo import build
    from moe_export.zoo.data import token_stream
    from moe_export.zoo.registry import get_entry
    from moe_export.zoo.folders import load
    from moe_export.zoo.train import train_stage

    entry = get_entry(name)
    folder = build(name, seed=seed, progress=progress)
    base = router_scores(folder)
    out = {"finetune": {k: v["change"] for k, v in base.items()}}
    runs = {"repeat": (entry.finetune, seed + 3000), "control": (dc_replace(entry.finetune, corpus=entry.pretrain.corpus), seed + 2000)}
    for key, (spec, stage_seed) in runs.items():
        model, tok = load(folder, which="pretrained")
        pre = {l.name: l.router_weight.norm(dim=1).clone() for l in find_moe_layers(model)}
        with tempfile.TemporaryDirectory() as tmp:
            stats = train_stage(model, entry.arch, token_stream(tok, spec.corpus, "train"), spec, entry.seq_len,
                                stage_seed, Path(tmp) / "state.pt", desc=f"{name} s{seed} {key}", progress=progress)
        out[key] = {l.name: (l.router_weight.norm(dim=1) - pre[l.name]).tolist() for l in find_moe_layers(model)}
        out[f"{key}_final_loss"] = stats["final_loss"]
    out["spearman"] = {key: {layer: spearman(out["finetune"][layer], out[key][layer]) for layer in out["finetune"]}
                       for key in runs}
    return out


def build_summary(name: str, seed: int) -> dict | None:
    """How good the built model is before any quantization, from its manifest: a quantization comparison on a
    model that has not learned its corpora says little, so the report shows these beside a bigram baseline."""
    import json

    from moe_export.zoo.registry import get_entry
    from moe_export.zoo.train import default_dir

    path = default_dir(name, seed) / "manifest.json"
    if not path.exists():
        return None
    man, entry = json.loads(path.read_text()), get_entry(name)
    out = {"parameters": man["parameters"], "build_wall_s": man["build_wall_s"], "threads": man.get("threads")}
    for which, corpus in (("pretrained", entry.pretrain.corpus), ("finetuned", entry.finetune.corpus)):
        r = man["eval"][which]["results"][corpus]
        out[which] = {"corpus": corpus, "bpb": r["bpb"]["bits_per_byte"], "tokens": r["bpb"]["tokens_scored"],
                      "cloze": r.get("cloze", {}).get("accuracy"),
                      "token_bigram_bpb": man["baselines"][corpus]["token_bigram"]["bits_per_byte"]}
    return out


def run_model(sweep: ZooSweep, name: str, seed: int, progress: bool = True) -> dict:
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.eval import bits_per_byte, cloze, logits_fn_for
    from moe_export.models import find_moe_layers
    from moe_export.plan.methods import PlanConfig, make_plan
    from moe_export.zoo import build
    from moe_export.zoo.data import calibration_batches, token_stream
    from moe_export.zoo.registry import get_entry
    from moe_export.zoo.folders import load

    entry = get_entry(name)
    t_start = time.perf_counter()
    folder = build(name, seed=seed, progress=progress)
    rec = {"model": name, "seed": seed, "arch": entry.arch, "scores": router_scores(folder), "points": [], "float": {}}
    for setting in sweep.settings:
        which, corpus = ("finetuned", entry.finetune.corpus) if setting == "finetune" else ("pretrained", entry.pretrain.corpus)
        reference = {"finetune": folder / "pretrained", "pretrain-init": folder / "initial"}.get(setting)  # None: final norm
        model, tok = load(folder, which=which)
        seq_len = entry.seq_len
        test = token_stream(tok, corpus, "test")
        calib = list(calibration_batches(tok, sweep.calib_tokens, seq_len, seed=seed, corpus=corpus).split(8))  # [8, T]
        gs = group_size_for(find_moe_layers(model))
        rec["group_size"] = gs

        def quality(m, with_cloze: bool = True) -> dict:
            r = {"bpb": bits_per_byte(logits_fn_for(m), tok, test, seq_len, max_tokens=sweep.eval_tokens,
                                      progress=False)["bits_per_byte"]}
            if sweep.n_cloze and with_cloze:
                r["cloze"] = cloze(logits_fn_for(m), tok, corpus, seq_len, sweep.n_cloze, progress=False)["accuracy"]
            return r

        def scores_cloze(ls: str, avg: float) -> bool:
            return ls not in sweep.cloze_avg_bits or any(abs(avg - b) < 1e-9 for b in sweep.cloze_avg_bits[ls])

        rec["float"][setting] = {**quality(model), "corpus": corpus}
        methods = sweep.methods
        if setting == "pretrain-init" and "pretrain-only" in sweep.settings:
            # Same model, corpus and calibration as pretrain-only: only the methods that read the reference
            # plan differently; the others' points are shared below instead of recomputed.
            methods = tuple(m for m in methods if m in USES_REFERENCE)
        # Plans are deterministic given their bits, so methods that land on the same per-expert widths (all
        # of them at a uniform average, often router vs router+maxvar) share one quantize + eval.
        evaluated: dict[tuple, dict] = {}
        jobs = [(ls, avg, m) for ls in sweep.level_sets for avg in sweep.grid(ls)[1] for m in methods]
        for ls, avg, method in tqdm(jobs, desc=f"{name} s{seed} {setting}", disable=not progress):
            levels = sweep.grid(ls)[0]
            if method == "uniform" and float(avg) not in levels:
                continue
            res = []
            for rs in sweep.random_seeds if method == "random" else (0,):
                cfg = PlanConfig(avg_bits=avg, levels=list(levels), method=method, group_size=gs, seed=rs,
                                 absolute_change=entry.arch == "switch")
                t0 = time.perf_counter()
                plan = make_plan(model, cfg, reference=reference, batches=calib, progress=False)
                plan_s = time.perf_counter() - t0
                key = tuple(tuple(l.bits) for l in plan.layers)
                want_cloze = scores_cloze(ls, avg)
                if key not in evaluated or (want_cloze and sweep.n_cloze and "cloze" not in evaluated[key]):
                    q = quantize_(copy.deepcopy(model), MoEQuantConfig(plan=plan), progress=False)
                    evaluated[key] = quality(q, want_cloze)
                    del q
                got = evaluated[key] if want_cloze else {k: v for k, v in evaluated[key].items() if k != "cloze"}
                res.append({"plan_s": plan_s, **got, "bits": [l.bits for l in plan.layers]})
            rec["points"].append({"setting": setting, "levels": ls, "avg_bits": avg, "method": method,
                                  **{k: sum(r[k] for r in res) / len(res) for k in res[0] if k != "bits"},
                                  "bits": res[0]["bits"]})
    if "pretrain-init" in sweep.settings and "pretrain-only" in sweep.settings:
        rec["points"] += [{**p, "setting": "pretrain-init", "shared_with": "pretrain-only"} for p in rec["points"]
                          if p["setting"] == "pretrain-only" and p["method"] not in USES_REFERENCE]
    rec["wall_s"] = time.perf_counter() - t_start
    return rec


def run_zoo(sweep: ZooSweep, progress: bool = True, cache_dir=None) -> dict:
    """``cache_dir``: each (model, seed) record is saved there as it finishes and reused by a rerun of the
    same sweep, so an interrupted sweep resumes and a partial one can still be reported."""
    import hashlib
    import json
    from pathlib import Path

    from moe_export.io import atomic_write_json

    t0 = time.perf_counter()
    runs, reused = [], []
    # what a record depends on (not which records are asked for)
    identity = lambda d: {k: v for k, v in d.items() if k not in ("controls", "models", "seeds", "model_seeds")}
    for name in sweep.models:
        for seed in sweep.seeds_for(name):
            key = identity(json.loads(json.dumps(sweep.to_dict())))
            tag = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:10]
            cached = Path(cache_dir) / f"{name}-s{seed}-{tag}.json" if cache_dir else None
            rec = None
            if cached is not None and cached.exists():
                saved = json.loads(cached.read_text())
                if identity(saved.get("sweep", {})) == key:
                    rec = saved["run"]
                    reused.append(f"{name}@{seed}")
            if rec is None:
                rec = run_model(sweep, name, seed, progress)
                if cached is not None:
                    atomic_write_json(cached, {"sweep": key, "run": rec})
            rec["build"] = build_summary(name, seed)
            # controls=False computes no control fine-tune but still reports one already in the cache
            ccache = Path(cache_dir) / f"{name}-s{seed}-controls.json" if cache_dir else None
            if ccache is not None and ccache.exists():
                rec["controls"] = json.loads(ccache.read_text())
            elif sweep.controls:
                rec["controls"] = control_finetunes(name, seed, progress)
                if ccache is not None:
                    atomic_write_json(ccache, rec["controls"])
            runs.append(rec)
    stability = {}
    for name in sweep.models:
        rs = [r for r in runs if r["model"] == name]
        for i in range(len(rs)):
            for j in range(i + 1, len(rs)):
                for layer in rs[i]["scores"]:
                    for key in ("change", "init_change", "final_norm"):
                        if key not in rs[i]["scores"][layer] or key not in rs[j]["scores"][layer]:
                            continue
                        stability.setdefault(f"{name}/{key}", []).append(
                            spearman(rs[i]["scores"][layer][key], rs[j]["scores"][layer][key]))
    return {"sweep": sweep.to_dict(), "runs": runs, "rank_stability": stability, "wall_s": time.perf_counter() - t0,
            "reused": reused}


QUICK = ZooSweep(avg_bits={"3,2": [2.0, 2.5, 3.0], "3,2,1": [1.5, 2.0, 2.5]}, random_seeds=(0, 1))
# Cloze (100 items, ~15x the cost of the bpb eval) only at one interior width per level set: the middle of
# each grid, where the methods' plans differ most.
FULL = ZooSweep(seeds=(0, 1, 2), eval_tokens=2048, random_seeds=(0, 1), n_cloze=100,
                cloze_avg_bits={"3,2": [2.5], "3,2,1": [2.0]})
