"""One byte budget for the whole model: every quantizable tensor's width and group size, chosen together.

    plan = budget_plan(model, BudgetConfig(budget="2.7bpw"))        # or "5.1MB", "5100000B"

Items: each routed expert's projections (fused stacks such as ``gate_up_proj`` / ``down_proj``: one width per
expert), shared experts, attention, dense MLPs, lm_head and embeddings (a tied pair is one item). Each chooses a
width in ``BITS`` or float, and a group size in ``GROUPS``. The router, norms, biases and every weight that does
not pack (``size.packs``) stay float and count as fixed bytes. Bytes are ``size.theoretical_bytes`` (float: the
stored dtype), so the plan's ``planned_bytes`` is what ``size.theoretical_model_bytes`` of the quantized model
reports.

Cost of a choice (a data-free proxy of the output error it adds): the weight's reconstruction error under the
plan's quantizer, scaled by the share of tokens the weight sees,

    cost(W, b, g) = u_W * ||W - Q_{b,g}(W)||_F^2
    u_W = top_k / E for a routed expert (every expert alike), or its measured routing frequency when
          calibration text is given; 1 for every other weight

(``E||dW x||^2 = ||dW||^2 E[x_j^2]`` summed over the tokens that reach the weight). ``weighting="none"`` drops
``u`` (raw error). Measured on the tiny zoo model: also scaling an embedding table by 1/V (a token reads one
row) sent it to 1 bit and cost far more than it saved, so embeddings count like any other weight.

That proxy assumes every weight's inputs have the same scale and every tensor's output error moves the loss
alike; neither holds across layers and roles (a layer whose weights are small but whose inputs are large looks
cheap to quantize). ``weighting="fisher"`` (calibration text) measures both instead: the second-order change of
the loss, with the diagonal empirical Fisher ``F`` (per-sequence squared gradients of the next-token loss),

    cost(W, b, g) = sum_ij F_ij (W - Q_{b,g}(W))_ij^2

so usage, input scales and each tensor's effect on the loss are in the cost and nothing else scales it.

``weighting="activation"`` (calibration text) keeps the proxy's output error but measures the inputs instead of
assuming them isotropic: with ``H = E[x x^T]`` of the weight's inputs per token (an expert: over its routed
tokens only, so usage is in it; the down projection's input is ``act(gate x) * (up x)`` from the float weights),

    cost(W, b, g) = tr(dW H dW^T) = E||dW x||^2

with ``H`` scaled to the proxy's units (mean input variance 1 per token: a linear's ``H`` divided by
``tr(H) / K``, a MoE projection's by that of all its experts' together over top_k), so isotropic inputs and
uniform routing give back ``u_W * ||dW||^2``. Embeddings keep the proxy (a row-frequency weighting from a few
thousand tokens leaves most rows unseen; see above). Why it matters: a quantizer's error is not isotropic
noise. Measured on small-mixtral's experts, sign binarisation (1 bit) and a min/max 2-bit grid leave relative
weight errors of 0.35 and 0.24, but relative expert output errors of ~0.49 and ~0.05-0.13 on the calibration
tokens: binarisation's error lies along the weight, where the inputs are, and ``||dW||^2`` cannot see it.

Which quantizer's error: the table quantizes each expert with the plan's quantizer (``BudgetConfig.quantizer``),
so a width is judged by the grid that quantizer will store: HQQ's optimised zero-points, or GPTQ's error-feedback
grid, quantized against the expert's measured input moment as its Hessian and scored on the same inputs (GPTQ
needs ``weighting="activation"``; ``quantize_`` then calibrates on the quantized model's own inputs, all tokens to
every expert by default, so the table's GPTQ error is that of the float model's routed inputs). Non-expert weights
are scored with the quantizer that stores them: GPTQ for an untied linear (attention, lm_head) when the experts
get GPTQ (``quantize_`` measures their inputs too), else ``quant.apply.non_expert_quantizer`` (RTN).

Constraint of the runtime: a fused expert parameter ``[E, N, K]`` stores one group size
(``runtime.layout.WidthGroups``), so each projection stack chooses one group size for all its experts and one
width per expert; experts are never float (a width group holds 1..8-bit codes).

Solver (multiple-choice knapsack): Lagrangian relaxation, min sum cost + lambda * bytes, bisected on lambda
so the bytes just fit; each stack takes its best group size at that lambda; then a greedy fill spends the
slack on the upgrades with the most error removed per byte. ``solve`` works on padded arrays
``[items, group sizes, members, options]`` and takes milliseconds for Mixtral-8x7B's tensor count.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field

import numpy as np
import torch

BITS = (1, 2, 3, 4, 6, 8)
GROUPS = (32, 64, 128)
WEIGHTINGS = ("usage", "none", "fisher", "activation")
# Bits per weight of a float option are those of the stored dtype (float32: 32).


class BudgetError(ValueError):
    """A budget that cannot be parsed or met."""


_UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_budget(text: str, parameters: int) -> tuple[float, float]:
    """``"2.7bpw"`` (bits per parameter of the whole model) or ``"5.1MB"`` / ``"4.8MiB"`` / ``"5100000B"``
    -> ``(bytes, bits per weight)``."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(bpw|b|kb|mb|gb|kib|mib|gib)\s*", str(text).lower())
    if not m:
        raise BudgetError(f"budget {text!r}: expected bits per weight such as 2.7bpw, or a size such as 5.1MB, "
                          "4.8MiB or 5100000B")
    x, unit = float(m.group(1)), m.group(2)
    if not math.isfinite(x) or x <= 0:
        raise BudgetError(f"budget {text!r} must be a positive number")
    if unit == "bpw":
        return x * parameters / 8, x
    nbytes = x * _UNITS[unit]
    return nbytes, 8 * nbytes / parameters


# ------------------------------------------------------------------------------------------------- items
@dataclass
class Item:
    """One choice: a projection stack of a MoE layer (``members`` experts) or one non-expert weight."""

    key: str  # "layer.proj" of a stack, the first FQN of a non-expert weight
    kind: str  # "experts" or the non-expert role
    names: list[str]  # every FQN of the weight (a tied pair has two)
    shape: tuple[int, int]  # [N, K] of one member
    variants: list  # per group-size variant: list of options (bits or None = float, group size)
    cost: list = field(default_factory=list)  # per variant: [members, options] float64, unweighted error
    nbytes: list = field(default_factory=list)  # per variant: [members, options] float64
    layer: str | None = None
    proj: str | None = None
    share: float = 1.0  # share of the tokens each member sees when every expert is used alike (top_k / E)
    weight: np.ndarray | None = None  # [members] what the solver multiplies the error by (``weigh``); None: 1


def _stack_variants(k: int, bits=BITS, groups=GROUPS) -> list[list[tuple]]:
    return [[(b, g) for b in bits] for g in groups if g is None or k % g == 0]


def _tensor_options(shape, bits=BITS, groups=GROUPS) -> list[tuple]:
    from moe_export.size import packs

    return [(None, None)] + [(b, g) for g in groups if packs(shape, g) for b in bits]


def fisher_diagonal(model, batches, progress: bool = False) -> dict[str, torch.Tensor]:
    """The diagonal empirical Fisher of ``model``'s next-token loss on ``batches`` (token ids ``[B, S]``): per
    parameter FQN (tied names share one tensor), the sum over sequences of the squared gradient of that sequence's
    mean cross-entropy. Positions scored as ``eval.bits_per_byte`` scores them (SwitchTransformers: prefix LM)."""
    from tqdm.auto import tqdm

    from moe_export.eval import _score_from, logits_fn_for

    lf = logits_fn_for(model)
    named = list(model.named_parameters(remove_duplicate=False))
    params = {id(p): p for _, p in named}
    fisher = {i: torch.zeros(p.shape, dtype=torch.float32) for i, p in params.items()}
    wanted = {i: p.requires_grad for i, p in params.items()}
    was_training = model.training
    model.eval()  # no dropout: the gradients of the model as it will run
    try:
        for p in params.values():
            p.requires_grad_(True)
        rows = [x for b in batches for x in b]  # [S] each: one gradient per sequence
        with torch.enable_grad():
            for x in tqdm(rows, desc="budget: Fisher", disable=not progress):
                x = x[None]  # [1, S]
                s = _score_from(lf, x.shape[1])
                logits = lf.logits(x)[:, s:-1]  # [1, S - 1 - s, V]
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, s + 1 :].flatten())
                grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                for i, g in zip(params, grads):
                    if g is not None:
                        fisher[i] += g.detach().to(torch.float32).square()
    finally:
        for i, p in params.items():
            p.requires_grad_(wanted[i])
        model.train(was_training)
    return {n: fisher[id(p)] for n, p in named}


@dataclass
class InputMoments:
    """Second moments of each weight's inputs on calibration text, per token, in the proxy's units (module doc)."""

    linear: dict[str, torch.Tensor]  # FQN of a linear's weight -> [K, K] E[x x^T] / (tr / K)
    experts: dict[tuple[str, str, int], torch.Tensor]  # (layer, projection, expert) -> [K, K], routed tokens only


@torch.no_grad()
def input_moments(model, batches, progress: bool = False) -> InputMoments:
    """``InputMoments`` of ``model`` on ``batches`` (token ids ``[B, S]``), in one forward pass: hooks on every
    non-expert ``nn.Linear``, and each MoE layer's routed tokens (``calibration_stats.routing_statistics``) for
    its experts."""
    from moe_export.models import find_moe_layers
    from moe_export.plan.calibration_stats import routing_statistics
    from moe_export.plan.methods import _expert_act
    from moe_export.quant.calibration import linear_input_sums

    layers = find_moe_layers(model)
    expert_params = {l.param_name(p, e) for l in layers for p in l.projections for e in range(l.num_experts)}
    linears = {f"{m}.weight" if m else "weight" for m, mod in model.named_modules()
               if isinstance(mod, torch.nn.Linear)} - expert_params
    tokens = sum(int(b.numel()) for b in batches)
    with linear_input_sums(model, linears) as (acc, _):
        stats = routing_statistics(model, batches, keep_inputs=tokens, layers=layers, progress=progress)
    unit = lambda H: (H * (H.shape[0] / max(float(torch.trace(H)), 1e-30))).to(torch.float32)  # mean variance 1
    linear = {n: unit(s / c) for n, (s, c) in acc.items()}
    experts = {}
    f32 = lambda w: w.to(torch.float32)
    for l in layers:
        st, act = stats[l.name], _expert_act(l)
        T = max(int(st["tokens"]), 1)
        H = {p: [] for p in l.projections}
        for e in range(l.num_experts):
            x = st["inputs"][e].to(torch.float64)  # [T_e, H]
            v = l.expert(e)
            h = act(x.float() @ f32(v.up).T) if v.gate is None else \
                act(x.float() @ f32(v.gate).T) * (x.float() @ f32(v.up).T)  # [T_e, I]
            for proj in l.projections:
                z = h.double() if proj == l.projections[-1] else x  # the last projection (down / wo) reads h
                H[proj].append(z.T @ z / T)  # [K, K] per token of the layer: routed share included
        for proj, Hs in H.items():
            # all experts together see top_k inputs per token: their summed trace / (top_k K) is the mean variance
            scale = Hs[0].shape[0] * l.top_k / max(float(sum(torch.trace(h) for h in Hs)), 1e-30)
            for e, He in enumerate(Hs):
                experts[(l.name, proj, e)] = (He * scale).to(torch.float32)
    return InputMoments(linear, experts)


def model_items(model, quantizer, symmetric: bool = False, bits=BITS, groups=GROUPS,
                progress: bool = False, sensitivity: dict | None = None,
                moments: InputMoments | None = None) -> tuple[list[Item], float, int]:
    """The knapsack items of ``model`` with their unweighted errors and bytes -> ``(items, fixed bytes,
    parameters)``; ``weigh`` then sets what the solver minimises. ``sensitivity``: per parameter FQN a tensor of
    its shape (``fisher_diagonal``) weighting each element's squared error; ``moments`` (``input_moments``):
    each error is the output error ``tr(dW H dW^T)`` on the measured inputs instead (a weight none were measured
    for keeps ``||dW||^2``). The error table is the slow part: a sweep over budgets and weightings computes it
    once."""
    from tqdm.auto import tqdm

    from moe_export.models import find_moe_layers, parameter_role_lookup
    from moe_export.plan.weight_error import reconstruction_error
    from moe_export.quant.apply import non_expert_quantizer
    from moe_export.size import theoretical_bytes

    layers = find_moe_layers(model)
    role_of = parameter_role_lookup(model)
    by_id: dict[int, list[str]] = {}
    params = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
        params[id(p)] = p
    expert_params = {l.param_name(p, e) for l in layers for p in l.projections for e in range(l.num_experts)}
    parameters = sum(p.numel() for p in params.values())
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    fixed = float(sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in non_persistent))

    if quantizer.needs_calibration and moments is None:
        raise BudgetError(f"{quantizer.name} quantizes each weight against its inputs: its error table needs them "
                          "(weighting activation: --usage activation with calibration text)")
    rest = non_expert_quantizer()  # what quantize_ stores non-expert weights with when it has no inputs for them

    def err(W, b, g, S=None, H=None, q=quantizer) -> float:
        return reconstruction_error(W, b, q, g, symmetric, weight=S, moment=H)

    def tensor_err(W, names, b, g) -> float:
        """A non-expert weight: summed over the linears that read it (a tied embedding counts as its lm_head)."""
        if moments is None:
            return err(W, b, g, None if sensitivity is None else sensitivity[names[0]], q=rest)
        measured = [n for n in names if n in moments.linear]
        if not measured:
            return err(W, b, g, q=rest)
        # a data-aware quantizer stores an untied linear it measured (quantize_non_expert_), RTN the rest
        q = quantizer if quantizer.needs_calibration and len(names) == 1 else rest
        return sum(err(W, b, g, H=moments.linear[n], q=q) for n in measured)

    def expert_sensitivity(layer, proj, e):  # [N, K] laid out as layer.expert_weight(proj, e)
        if sensitivity is None:
            return None
        S = sensitivity[layer.param_name(proj, e)]
        return S[e] if layer.fused else S

    items: list[Item] = []
    work = [("experts", l, p) for l in layers for p in l.projections]
    work += [("tensor", pid, names) for pid, names in by_id.items() if not any(n in expert_params for n in names)]
    for kind, a, b in tqdm(work, desc="budget: weight errors", disable=not progress):
        if kind == "experts":
            layer, proj = a, b
            E = layer.num_experts
            n, k = layer.expert_weight(proj, 0).shape
            variants = _stack_variants(k, bits, groups)
            if not variants:
                raise BudgetError(f"{layer.name}.{proj}: none of the group sizes {list(groups)} divides its input dim {k}")
            it = Item(f"{layer.name}.{proj}", "experts", [layer.param_name(proj, e) for e in range(E)] if not layer.fused
                      else [layer.param_name(proj)], (n, k), variants, layer=layer.name, proj=proj,
                      share=layer.top_k / E)
            for opts in variants:
                c = np.array([[err(layer.expert_weight(proj, e), bb, g, expert_sensitivity(layer, proj, e),
                                   None if moments is None else moments.experts[(layer.name, proj, e)])
                               for bb, g in opts] for e in range(E)])  # [E, O]
                it.cost.append(c)
                it.nbytes.append(np.tile([theoretical_bytes(n, k, bb, g, symmetric) for bb, g in opts], (E, 1)))
            items.append(it)
            continue
        p, names = params[a], b
        nbytes_float = float(p.numel() * p.element_size())
        roles = {role_of(nm) for nm in names}
        role = sorted(roles)[0]
        options = _tensor_options(tuple(p.shape), bits, groups) if p.dim() == 2 else []
        # an embedding table tied to lm_head (T5 / Switch share one among encoder, decoder and lm_head) is one item,
        # scored as its lm_head; other weights shared between roles keep float, as do routing decisions, norms and
        # weights that do not pack
        tied_embedding = roles == {"embeddings", "lm_head"}
        if role in ("router", "norm", "other") or (len(roles) > 1 and not tied_embedding) or len(options) <= 1:
            fixed += nbytes_float
            continue
        W = p.detach()
        n, k = W.shape
        c = np.array([[0.0 if bb is None else tensor_err(W, sorted(names), bb, g) for bb, g in options]])  # [1, O]
        nb = np.array([[nbytes_float if bb is None else theoretical_bytes(n, k, bb, g, symmetric) for bb, g in options]])
        items.append(Item(names[0], role, sorted(names), (n, k), [options], [c], [nb]))
    return items, fixed, parameters


def weigh(items: list[Item], weighting: str = "usage", usage: dict | None = None) -> list[Item]:
    """Set each item's error weight: ``"usage"``: an expert's share of the tokens (``usage[layer]``: the measured
    routing frequency of each expert, else top_k / E), 1 for other weights; ``"none"``: 1 (raw error);
    ``"fisher"``, ``"activation"``: 1 (the errors of a table built with a Fisher ``sensitivity`` or input
    ``moments`` already hold usage)."""
    if weighting not in WEIGHTINGS:
        raise BudgetError(f"unknown weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    for it in items:
        M = it.cost[0].shape[0]
        if weighting in ("none", "fisher", "activation") or it.kind != "experts":
            it.weight = np.ones(M)
        elif usage is not None:
            it.weight = np.asarray(usage[it.layer], dtype=np.float64)  # [E]
        else:
            it.weight = np.full(M, it.share)
    return items


# ------------------------------------------------------------------------------------------------ solver
@dataclass
class Solution:
    variant: list[int]  # per item: the chosen group-size variant
    choice: list[np.ndarray]  # per item: [members] option index in that variant
    nbytes: float  # bytes of the items (fixed bytes not included)
    cost: float
    lam: float
    seconds: float


def _pad(items: list[Item]) -> tuple[np.ndarray, np.ndarray]:
    """``[I, V, M, O]`` cost and bytes; padding: a member that costs nothing (option 0), an unusable option (inf)."""
    V = max(len(it.variants) for it in items)
    M = max(c.shape[0] for it in items for c in it.cost)
    O = max(c.shape[1] for it in items for c in it.cost)
    C = np.full((len(items), V, M, O), np.inf)
    B = np.zeros((len(items), V, M, O))
    for i, it in enumerate(items):
        for v, (c, b) in enumerate(zip(it.cost, it.nbytes)):
            m, o = c.shape
            C[i, v, :m, :o] = c if it.weight is None else c * it.weight[:, None]
            B[i, v, :m, :o] = b
            C[i, v, m:, 0] = 0.0  # padded members: one free option
    return C, B


def _relaxed(C, B, lam: float):
    """Per item the best variant at ``lam`` and per member its best option -> (variant [I], option [I, M], bytes)."""
    with np.errstate(invalid="ignore"):
        L = C + lam * B  # [I, V, M, O]; inf stays inf
    L = np.where(np.isnan(L), np.inf, L)
    opt = L.argmin(3)  # [I, V, M]
    best = np.take_along_axis(L, opt[..., None], 3)[..., 0].sum(2)  # [I, V]
    var = best.argmin(1)  # [I]
    I = np.arange(C.shape[0])
    o = opt[I, var]  # [I, M]
    nb = np.take_along_axis(B[I, var], o[..., None], 2)[..., 0].sum()
    return var, o, float(nb)


def solve(items: list[Item], budget_bytes: float) -> Solution:
    """Choices for ``items`` with total bytes <= ``budget_bytes``, minimising the summed cost (see module doc)."""
    t0 = time.perf_counter()
    C, B = _pad(items)
    I = np.arange(len(items))
    finite = np.isfinite(C)
    min_bytes = np.where(finite, B, np.inf).min(3).sum(2).min(1).sum()
    if min_bytes > budget_bytes:
        raise BudgetError(f"the smallest choice of every tensor needs {min_bytes:,.0f} bytes, more than the "
                          f"{budget_bytes:,.0f} the budget leaves for them")
    var, opt, nb = _relaxed(C, B, 0.0)
    lam = 0.0
    if nb > budget_bytes:
        # bytes(lam) falls as lam grows: bracket [lo, hi] with bytes(hi) <= budget < bytes(lo), bisect in log space
        scale = float(np.nanmax(np.where(finite, C, np.nan))) / max(float(B[B > 0].min()), 1.0) + 1e-30
        lo, hi = scale * 1e-30, scale
        while _relaxed(C, B, hi)[2] > budget_bytes:
            lo, hi = hi, hi * 16
        if _relaxed(C, B, lo)[2] <= budget_bytes:
            hi = lo
        else:
            for _ in range(100):
                mid = math.sqrt(lo * hi)
                if _relaxed(C, B, mid)[2] > budget_bytes:
                    lo = mid
                else:
                    hi = mid
                if hi / lo < 1 + 1e-9:
                    break
        lam = hi
        var, opt, nb = _relaxed(C, B, hi)
    # greedy fill within the chosen variants: the upgrade with the most cost removed per byte that still fits
    Cv, Bv = C[I, var], B[I, var]  # [I, M, O]
    cur_c = np.take_along_axis(Cv, opt[..., None], 2)[..., 0]  # [I, M]
    cur_b = np.take_along_axis(Bv, opt[..., None], 2)[..., 0]
    slack = budget_bytes - nb
    while True:
        dB = Bv - cur_b[..., None]
        dC = cur_c[..., None] - Cv
        ok = (dB > 0) & (dB <= slack) & (dC > 0) & np.isfinite(Cv)
        if not ok.any():
            break
        ratio = np.where(ok, dC / np.where(ok, dB, 1.0), -np.inf)
        i, m, o = np.unravel_index(int(ratio.argmax()), ratio.shape)
        slack -= dB[i, m, o]
        opt[i, m], cur_c[i, m], cur_b[i, m] = o, Cv[i, m, o], Bv[i, m, o]
    total_b, total_c = float(cur_b.sum()), float(cur_c.sum())
    choice = [opt[i, : it.cost[var[i]].shape[0]].copy() for i, it in enumerate(items)]
    return Solution([int(v) for v in var], choice, total_b, total_c, float(lam), time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- the plan
@dataclass
class BudgetConfig:
    budget: str  # "2.7bpw", "5.1MB", ...
    quantizer: str = "rtn"
    symmetric: bool = False
    weighting: str = "usage"
    bits: tuple[int, ...] = BITS
    groups: tuple[int, ...] = GROUPS


def budget_plan(model, cfg: BudgetConfig, batches=None, model_name: str = "", progress: bool = False, table=None):
    """A version 2 ``BitPlan`` of ``model`` (in memory) meeting ``cfg.budget`` (see the module doc). ``batches``:
    calibration token ids; when given, expert usage is the measured routing frequency (``weighting="usage"``) or
    the Fisher is measured on them (``"fisher"``, which needs them). ``table``: the ``model_items`` of this model
    at ``cfg``'s quantizer, widths and group sizes (with ``fisher_diagonal`` as the sensitivity for
    ``"fisher"``), when already computed."""
    from moe_export.models import find_moe_layers, model_architecture
    from moe_export.plan.bitplan import BitPlan, LayerPlan, QuantizerSpec, _created_by, default_group_size, \
        expert_in_dims, router_sha256
    from moe_export.quant.base import get_quantizer

    t0 = time.perf_counter()
    layers = find_moe_layers(model)
    usage, sensitivity, moments = None, None, None
    if cfg.weighting in ("fisher", "activation"):
        if batches is None:
            raise BudgetError(f"weighting {cfg.weighting} measures the model on calibration text: it needs some")
        if table is None and cfg.weighting == "fisher":
            sensitivity = fisher_diagonal(model, batches, progress)
        elif table is None:
            moments = input_moments(model, batches, progress)
    elif batches is not None:
        from moe_export.plan.calibration_stats import routing_statistics

        stats = routing_statistics(model, batches, layers=layers, progress=progress)
        usage = {n: [float(x) for x in s["frequency"]] for n, s in stats.items()}
    if table is None:
        table = model_items(model, get_quantizer(cfg.quantizer), cfg.symmetric, cfg.bits, cfg.groups, progress,
                            sensitivity=sensitivity, moments=moments)
    items, fixed, parameters = table
    weigh(items, cfg.weighting, usage)
    t_err = time.perf_counter() - t0
    budget_bytes, bpw = parse_budget(cfg.budget, parameters)
    if budget_bytes < fixed:
        raise BudgetError(f"budget {cfg.budget} ({budget_bytes:,.0f} bytes) is below the {fixed:,.0f} bytes kept float "
                          "(routers, norms, buffers)")
    sol = solve(items, budget_bytes - fixed)

    layer_tensors: dict[str, dict] = {l.name: {} for l in layers}
    tensors: dict[str, object] = {}
    for it, v, ch in zip(items, sol.variant, sol.choice):
        opts = it.variants[v]
        if it.kind == "experts":
            layer_tensors[it.layer][it.proj] = {"bits": [int(opts[o][0]) for o in ch], "group_size": opts[0][1]}
            continue
        b, g = opts[int(ch[0])]
        entry = "float" if b is None else {"bits": int(b), "group_size": g, "symmetric": cfg.symmetric}
        for n in it.names:
            tensors[n] = entry
    layer_plans = []
    for l in layers:
        t = {p: layer_tensors[l.name][p] for p in l.projections}
        widest = [max(t[p]["bits"][e] for p in t) for e in range(l.num_experts)]
        layer_plans.append(LayerPlan(l.name, widest, [l.hidden_size, l.intermediate_size], t))
    levels = sorted({b for lp in layer_plans for t in lp.tensors.values() for b in t["bits"]}, reverse=True)
    mean = sum(sum(lp.bits) for lp in layer_plans) / sum(lp.num_experts for lp in layer_plans)
    planned = fixed + sol.nbytes
    return BitPlan(
        model={"name": model_name, "architecture": model_architecture(model),
               "router_sha256": router_sha256([l.router_weight for l in layers])},
        target_avg_bits=mean,
        levels=levels,
        quantizer=QuantizerSpec(cfg.quantizer, default_group_size(expert_in_dims(layers)), cfg.symmetric),
        layers=layer_plans,
        tensors=tensors,
        budget={"bytes": float(budget_bytes), "bits_per_weight": float(f"{bpw:.6g}"), "parameters": int(parameters),
                "planned_bytes": float(planned)},
        provenance={"method": "budget", "requested_budget": str(cfg.budget), "weighting": cfg.weighting,
                    "expert_usage": {"fisher": "calibration squared loss gradients (diagonal Fisher)",
                                     "activation": "calibration input second moments (output error)"}.get(
                        cfg.weighting, "calibration routing frequency" if usage is not None else "top_k / E"),
                    "candidate_bits": list(cfg.bits), "candidate_group_sizes": list(cfg.groups),
                    "solver": {"items": len(items), "lambda": float(f"{sol.lam:.6g}"), "seconds": round(sol.seconds, 4),
                               "error_seconds": round(t_err, 2)},
                    "created_by": _created_by()},
    )
