"""``--method`` dispatch: scores -> per-layer ranking or knapsack -> BitPlan.

    plan = make_plan("runs/zoo/tiny", PlanConfig(avg_bits=2.5, levels=[3, 2]))      # streams safetensors
    plan = make_plan(model, PlanConfig(avg_bits=2.5, levels=[3, 2], method="pmq"), batches=calib)

Data-free methods (router, router+maxvar, maxvar, weight-error, random, uniform) read a checkpoint
folder layer by layer, one expert weight at a time, and only the tensors they need (routers, plus
first-layer weights for MaxVar, plus every expert projection for weight-error). Calibration methods
(frequency, routing-weight, pmq) need the model in memory and calibration batches.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from moe_export.plan import allocation, maxvar as maxvar_mod, pmq, router_norm, weight_error
from moe_export.plan.bitplan import BitPlan, LayerPlan, NonExpertPolicy, QuantizerSpec, router_sha256, _created_by

METHODS = ("router", "router+maxvar", "maxvar", "weight-error", "frequency", "routing-weight", "pmq", "random", "uniform")
CALIBRATED = ("frequency", "routing-weight", "pmq")
USES_ROUTER = ("router", "router+maxvar")
USES_MAXVAR = ("router+maxvar", "maxvar")


class PlanError(ValueError):
    """Bad planning input: unknown method, unreachable budget, missing reference or calibration data."""


@dataclass
class PlanConfig:
    avg_bits: float
    levels: list[int]
    method: str = "router+maxvar"
    zeta: float = 3.0
    maxvar_variant: str = "paper"  # or "largest-norm-row" (official Mixtral code)
    # method maxvar: "descending" = widest weight range first (the zeta rule's direction);
    # "ascending" = the official code's `--order_type variance` ablation (smallest MaxVar first)
    maxvar_order: str = "descending"
    absolute_change: bool = False  # |L_s| instead of the signed change (Switch option)
    group_size: int | None = 128
    symmetric: bool = False
    quantizer: str = "rtn"
    seed: int = 0  # random method
    router_weighting: float = 0.0  # weight-error: gamma of the router-norm weighting (0 = off)
    pmq_alpha: float = pmq.ALPHA
    pmq_beta: float = pmq.BETA
    pmq_tokens: int = 256  # routed calibration tokens kept per expert for L_e(b)
    non_expert: NonExpertPolicy = field(default_factory=NonExpertPolicy)

    def __post_init__(self):
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not self.levels or any(not isinstance(b, int) or not 1 <= b <= 8 for b in self.levels):
            raise PlanError(f"levels must be bit widths in 1..8 such as 3,2; got {self.levels!r}")
        self.levels = sorted(set(self.levels), reverse=True)
        if self.maxvar_variant not in maxvar_mod.VARIANTS:
            raise PlanError(f"unknown MaxVar variant {self.maxvar_variant!r}; choose one of {maxvar_mod.VARIANTS}")
        if self.maxvar_order not in ("descending", "ascending"):
            raise PlanError(f"maxvar_order must be 'descending' or 'ascending', got {self.maxvar_order!r}")
        if not math.isfinite(self.avg_bits):
            raise PlanError(f"avg_bits must be a finite number of bits, got {self.avg_bits}")
        if not math.isfinite(self.zeta) or self.zeta <= 0:
            raise PlanError(f"zeta must be a positive finite number, got {self.zeta}")
        if self.method == "uniform" and float(self.avg_bits) not in self.levels:
            raise PlanError(f"uniform plan: --avg-bits {self.avg_bits} must be one of the levels {self.levels}")
        if self.method in ("router", "router+maxvar", "maxvar", "frequency", "routing-weight", "random") and len(self.levels) > 3:
            raise PlanError(f"method {self.method} uses the paper's 2-/3-level rules; give at most 3 levels")


@dataclass
class LayerSource:
    """Lazy access to one MoE layer: nothing is read until a loader is called."""

    name: str
    num_experts: int
    in_dims: list[int]
    router: Callable[[], torch.Tensor]  # -> [E, H]
    first: list[Callable[[], torch.Tensor]]  # per expert -> [I, H]
    projections: list[Callable[[], list[torch.Tensor]]]  # per expert -> its weights [N, K] (gate, up, down)
    layer: object = None  # the in-memory MoELayer, when planning a model


def sources_from_model(model) -> list[LayerSource]:
    from moe_export.models import find_moe_layers

    out = []
    for l in find_moe_layers(model):
        def proj(e, l=l):
            v = l.expert(e)
            return [w for w in (v.gate, v.up, v.down) if w is not None]

        out.append(LayerSource(
            l.name, l.num_experts, [l.hidden_size, l.intermediate_size], lambda l=l: l.router_weight,
            [lambda e=e, l=l: l.expert(e).first for e in range(l.num_experts)],
            [lambda e=e, proj=proj: proj(e) for e in range(l.num_experts)], layer=l,
        ))
    return out


def sources_from_checkpoint(folder) -> list[LayerSource]:
    from moe_export.models import checkpoint_moe_layout
    from moe_export.plan.reader import StreamReader

    rd = StreamReader(folder)
    out = []
    for k in checkpoint_moe_layout(folder):
        def proj(e, k=k):
            parts = [k.gate[e] if k.gate else None, k.up[e] if k.up else None, k.down[e]]
            return [rd.read_slice(s) for s in parts if s is not None]

        out.append(LayerSource(
            k.name, k.num_experts, [k.hidden_size, k.intermediate_size], lambda k=k: rd.read(k.router_key),
            # two reused buffers: MaxVar scores expert e while e + 1 is read (layer_maxvar prefetches one)
            [lambda e=e, k=k: rd.read_slice(k.first[e], slot=e % 2) for e in range(k.num_experts)],
            [lambda e=e, proj=proj: proj(e) for e in range(k.num_experts)],
        ))
    return out


def resolve_model_dir(model_dir, reference=None) -> tuple[Path, Path | None]:
    """A zoo build folder (``pretrained/`` + ``finetuned/``) plans ``finetuned/`` against ``pretrained/``."""
    from moe_export.zoo.folders import resolve

    try:
        folder = resolve(model_dir, build=False)
    except FileNotFoundError:
        raise PlanError(f"{model_dir}: not a checkpoint folder (no config.json) nor a zoo build (pretrained/ + "
                        "finetuned/)") from None
    return folder.checkpoint, (Path(reference) if reference else folder.reference)


def _r(x: float) -> float:
    return float(f"{float(x):.6g}")


def _rl(t) -> list:
    return [_r(v) for v in t] if not isinstance(t, torch.Tensor) or t.dim() == 1 else [_rl(r) for r in t]


def make_plan(model_or_dir, config: PlanConfig, reference=None, batches=None, model_name: str | None = None,
              progress: bool = True) -> BitPlan:
    """Plan every MoE layer of a model (``nn.Module``) or a checkpoint folder. See the module docstring."""
    cfg = config
    is_dir = isinstance(model_or_dir, (str, os.PathLike))
    if is_dir:
        model_dir, reference = resolve_model_dir(model_or_dir, reference)
        if cfg.method in CALIBRATED:
            raise PlanError(
                f"method {cfg.method} needs a calibration pass: load the model and call make_plan(model, ..., batches=...) "
                "(the CLI does this for you)"
            )
        from moe_export.io import SafetensorsCheckpoint

        archs = SafetensorsCheckpoint(model_dir).config().get("architectures") or [""]
        arch, name = archs[0], model_name if model_name is not None else Path(model_or_dir).name
        sources = sources_from_checkpoint(model_dir)
    else:
        from moe_export.models import model_architecture

        arch, name = model_architecture(model_or_dir), model_name or ""
        sources = sources_from_model(model_or_dir)
    for s in sources:
        allocation.check_reachable(s.num_experts, cfg.avg_bits, cfg.levels)

    ref_routers = _reference_routers(reference, [s.name for s in sources]) if cfg.method in USES_ROUTER or (
        cfg.method == "weight-error" and cfg.router_weighting) else {}
    stats = None
    if cfg.method in CALIBRATED:
        if batches is None:
            raise PlanError(f"method {cfg.method} needs calibration batches (input_ids tensors)")
        from moe_export.plan.calibration_stats import routing_statistics

        stats = routing_statistics(model_or_dir, batches, keep_inputs=cfg.pmq_tokens if cfg.method == "pmq" else 0,
                                   layers=[s.layer for s in sources], progress=progress)

    quantizer = None
    if cfg.method in ("weight-error", "pmq"):
        from moe_export.quant.base import get_quantizer

        quantizer = get_quantizer(cfg.quantizer)
    gen = torch.Generator().manual_seed(cfg.seed)
    scores: dict[str, dict] = {}
    routers, layer_plans = [], []
    for li, s in enumerate(tqdm(sources, desc=f"plan {cfg.method}", disable=not progress)):
        W = s.router()  # [E, H]
        routers.append(W)
        W_ref = ref_routers.get(s.name)
        if not bool(torch.isfinite(W).all()) or (W_ref is not None and not bool(torch.isfinite(W_ref).all())):
            raise PlanError(f"{s.name}: router weights of {model_or_dir if is_dir else 'the model'}"
                            f"{'' if W_ref is None else f' or of reference {reference}'} hold NaN/Inf; fix or re-export the checkpoint")
        if W_ref is not None and W_ref.shape != W.shape:
            raise PlanError(f"reference {reference}: {s.name} router is {tuple(W_ref.shape)} but the model's is "
                            f"{tuple(W.shape)} (another expert count or hidden size); pass the checkpoint this one was trained from")
        bits = _plan_layer(cfg, s, W, W_ref, stats, quantizer, gen, scores)
        layer_plans.append(LayerPlan(s.name, bits, s.in_dims))

    provenance = {
        "method": cfg.method,
        "requested_avg_bits": float(cfg.avg_bits),
        "created_by": _created_by(),
        "scores": scores,
    }
    if cfg.method in USES_ROUTER or (cfg.method == "weight-error" and cfg.router_weighting):
        provenance["reference"] = str(reference) if reference is not None else "none (final-norm proxy)"
        provenance["router_score"] = "abs-change" if cfg.absolute_change else "signed-change"
    if cfg.method in USES_MAXVAR:
        provenance["maxvar_variant"] = cfg.maxvar_variant
    if cfg.method == "maxvar":
        provenance["maxvar_order"] = cfg.maxvar_order
    if cfg.method == "router+maxvar":
        provenance["zeta"] = float(cfg.zeta)
    if cfg.method == "random":
        provenance["seed"] = cfg.seed
    if cfg.method == "weight-error":
        provenance["router_weighting"] = float(cfg.router_weighting)
    if cfg.method == "pmq":
        provenance.update(pmq_alpha=float(cfg.pmq_alpha), pmq_beta=float(cfg.pmq_beta), pmq_tokens=cfg.pmq_tokens,
                          pmq_require=pmq.default_require(cfg.levels))
    if cfg.method in CALIBRATED:
        provenance["calibration_tokens"] = int(next(iter(stats.values()))["tokens"])
    return BitPlan(
        model={"name": name, "architecture": arch, "router_sha256": router_sha256(routers)},
        target_avg_bits=float(cfg.avg_bits),
        levels=list(cfg.levels),
        quantizer=QuantizerSpec(cfg.quantizer, cfg.group_size, cfg.symmetric),
        layers=layer_plans,
        non_expert=cfg.non_expert.to_dict(),
        provenance=provenance,
    )


def _reference_routers(reference, names: list[str]) -> dict[str, torch.Tensor]:
    if reference is None:
        return {}
    if isinstance(reference, (str, os.PathLike)):
        ref = {s.name: s.router for s in sources_from_checkpoint(reference)}
        get = lambda n: ref[n]()
    else:
        ref = {s.name: s.router for s in sources_from_model(reference)}
        get = lambda n: ref[n]().clone()
    missing = [n for n in names if n not in ref]
    if missing:
        raise PlanError(f"reference {reference} has no MoE layer {missing[0]!r}; it must be the same architecture")
    return {n: get(n) for n in names}


def _plan_layer(cfg: PlanConfig, s: LayerSource, W, W_ref, stats, quantizer, gen, scores) -> list[int]:
    E, m = s.num_experts, cfg.method

    def record(key, value):
        scores.setdefault(key, {})[s.name] = _rl(value)

    if m == "uniform":
        return [int(cfg.avg_bits)] * E
    if m in USES_ROUTER or (m == "weight-error" and cfg.router_weighting):
        L_s = router_norm.router_norm_change(W, W_ref, cfg.absolute_change)  # [E]
        record("L_s", L_s)
    if m in USES_MAXVAR:
        var = maxvar_mod.layer_maxvar(s.first, cfg.maxvar_variant)  # [E]
        if not bool(torch.isfinite(var).all()):
            raise PlanError(f"{s.name}: first-layer weights of expert(s) {torch.nonzero(~torch.isfinite(var)).flatten().tolist()} "
                            "hold NaN/Inf; fix or re-export the checkpoint")
        record("maxvar", var)
    if m in USES_ROUTER:
        order, bits = allocation.paper_allocation(L_s, cfg.avg_bits, cfg.levels,
                                                  var if m == "router+maxvar" else None, cfg.zeta)
        scores.setdefault("ranking", {})[s.name] = order
        return bits
    if m == "maxvar":
        order = router_norm.ascending_order(-var if cfg.maxvar_order == "descending" else var)
    elif m == "random":
        order = torch.randperm(E, generator=gen).tolist()
    elif m in ("frequency", "routing-weight"):
        st = stats[s.name]
        record("frequency", st["frequency"])
        record("mean_weight", st["mean_weight"])
        key = st["frequency"] if m == "frequency" else st["mean_weight"]
        order = router_norm.ascending_order(-key)  # most used / most weighted first
    elif m == "weight-error":
        err = torch.stack([weight_error.expert_errors(s.projections[e](), cfg.levels, quantizer, cfg.group_size,
                                                      cfg.symmetric) for e in range(E)])  # [E, L]
        record("weight_error", err)
        c = weight_error.router_weighting(L_s, cfg.router_weighting) if cfg.router_weighting else None
        return weight_error.allocate(err, cfg.levels, cfg.avg_bits, c)
    elif m == "pmq":
        st = stats[s.name]
        layer = s.layer
        act = _expert_act(layer)
        err = []
        for e in range(E):
            v = layer.expert(e)
            err.append(pmq.output_errors(st["inputs"][e], v.gate, v.up, v.down, act, cfg.levels, quantizer,
                                         cfg.group_size, cfg.symmetric))
        err = torch.stack(err)  # [E, L]
        record("frequency", st["frequency"])
        record("mean_weight", st["mean_weight"])
        record("output_error", err)
        return pmq.allocate(st["frequency"], st["mean_weight"], err, cfg.levels, cfg.avg_bits, cfg.pmq_alpha,
                            cfg.pmq_beta, pmq.default_require(cfg.levels))
    else:  # pragma: no cover - METHODS is checked in PlanConfig
        raise PlanError(f"unknown method {m!r}")
    scores.setdefault("ranking", {})[s.name] = list(order)
    return allocation.bits_from_order(order, allocation.level_counts(E, cfg.avg_bits, cfg.levels))


def _expert_act(layer):
    ex = layer.experts
    if hasattr(ex, "act_fn"):
        return ex.act_fn
    first = ex["expert_0"] if "expert_0" in ex else None
    if first is not None and hasattr(first, "act"):
        return first.act
    raise PlanError(f"{layer.name}: cannot find the experts' activation function (act_fn / act)")
