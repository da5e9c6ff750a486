"""Calibrated (GPTQ) quantization of a whole MoE model, one MoE layer at a time.

    quantize_sequential(model, plan, quantizer, calibration, batches=ids, forward=logits_fn)

(``moe_export.api.quantize_`` resolves the plan, quantizer and calibration settings and produces the token ids.)

For each MoE layer in forward order (T = calibration tokens, E = experts, H = hidden, I = intermediate):
  1. run the calibration batches through the model, whose earlier MoE layers are already quantized,
     and stop at this layer's experts: its inputs X [T, H] and the router's choices [T, E];
  2. per expert e: X_e = the tokens routed to e, or all T tokens with ``all_experts`` (llm-compressor /
     GPTQModel practice: a rare expert gets as much data as a popular one);
     H_first = 2/n X_e^T X_e -> quantize gate_up (or Switch wi);
     Z_e = act(X_e W_first_hat^T) [gate * up] computed with the *quantized* first weight;
     H_down = 2/n Z_e^T Z_e -> quantize down (wo);
     an expert whose Hessian would see fewer than ``min_tokens`` tokens is quantized round-to-nearest
     and listed in the report and the BitPlan provenance;
  3. install the layer's quantized experts (``quant.apply.install_quantized_layer``), so the next layer
     calibrates on quantized outputs.
Memory: one layer's inputs plus one expert's two Hessians at a time.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

from moe_export.quant.apply import for_projection, install_quantized_layer
from moe_export.quant.base import QuantizedWeight, Quantizer, get_quantizer

log = logging.getLogger(__name__)


@dataclass
class CalibrationConfig:
    """How GPTQ's calibration pass runs. ``--calib-tokens N`` sets ``n_tokens``."""

    n_tokens: int = 8192
    seq_len: int | None = None  # None: the zoo manifest's training length, else min(256, max positions)
    all_experts: bool = True  # every calibration token feeds every expert's Hessian
    min_tokens: int = 32  # experts whose Hessian sees fewer tokens fall back to RTN
    seed: int = 0
    corpus: str | None = None  # zoo corpus; None: the zoo manifest's fine-tune corpus, else calibration_batches'
    batch_size: int = 8  # sequences per forward pass
    batches: torch.Tensor | None = field(default=None, repr=False)  # token ids [B, S]; overrides the zoo text

    def __post_init__(self):
        for name in ("n_tokens", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"CalibrationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"CalibrationConfig.seq_len must be >= 2, got {self.seq_len}")
        if self.min_tokens < 0:
            raise ValueError(f"CalibrationConfig.min_tokens must be >= 0, got {self.min_tokens}")


@dataclass
class CalibrationReport:
    """What the calibration pass saw and did, per MoE layer (lists are indexed by expert id)."""

    routed_tokens: dict[str, list[int]] = field(default_factory=dict)  # (token, expert) routes the router chose
    hessian_tokens: dict[str, list[int]] = field(default_factory=dict)  # tokens in each expert's Hessians
    rtn_fallback: dict[str, list[int]] = field(default_factory=dict)  # experts quantized round-to-nearest
    max_percdamp: dict[str, float] = field(default_factory=dict)  # largest dampening a Cholesky needed
    calibration_tokens: int = 0
    batch_shape: list[int] = field(default_factory=list)  # [B, S] of the token ids that were run
    seconds: float = 0.0

    def to_provenance(self, cfg: CalibrationConfig, quantizer: str) -> dict:
        return {
            "quantizer": quantizer,
            "config": {k: v for k, v in asdict(cfg).items() if k != "batches"},
            "calibration_tokens": self.calibration_tokens,
            "batch_shape": self.batch_shape,
            "routed_tokens": self.routed_tokens,
            "rtn_fallback": {k: v for k, v in self.rtn_fallback.items() if v},
            "max_percdamp": self.max_percdamp,
            "seconds": round(self.seconds, 2),
        }


class _StopForward(Exception):
    pass


def _capture_layer_inputs(forward: Callable, layer, batches, batch_size: int):
    """-> X [T, H] float32 (inputs of ``layer.experts``) and routed [T, E] bool, stopping each forward there.

    ``forward(ids [b, S])`` runs the model the way it is evaluated (SwitchTransformers: as a prefix LM).
    """
    from moe_export.plan.calibration_stats import _experts_args, _routed

    xs, masks = [], []

    def hook(module, args, kwargs):
        hidden, index, weights = _experts_args(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])  # [T_b, H]
        tok, exp, _ = _routed(index.detach(), weights.detach().float(), layer.num_experts)
        mask = torch.zeros(hidden.shape[0], layer.num_experts, dtype=torch.bool)  # [T_b, E]
        mask[tok.cpu(), exp.cpu()] = True
        xs.append(hidden.detach().float().cpu())
        masks.append(mask)
        raise _StopForward  # later layers are not needed for this one

    handle = layer.experts.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(0, batches.shape[0], batch_size):
            try:
                forward(batches[i : i + batch_size])
            except _StopForward:
                pass
    finally:
        handle.remove()
    if not xs:
        raise RuntimeError(f"calibration never reached MoE layer {layer.name}: check the batches and the model")
    return torch.cat(xs), torch.cat(masks)


def _hessian(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    return (2.0 / max(x.shape[0], 1) * x.T @ x).float()  # [K, K]


def _expert_hidden(layer, e: int, x: torch.Tensor, w_first: torch.Tensor) -> torch.Tensor:
    """Input of the down projection: ``[T_e, I]`` from ``x`` ``[T_e, H]`` and the (quantized) first weight."""
    if layer.fused:
        gate, up = (x @ w_first.T).chunk(2, dim=-1)  # [T_e, I] each
        return layer.experts.act_fn(gate) * up
    return layer.experts[f"expert_{e}"].act(x @ w_first.T)


def quantize_layer_calibrated(layer, X: torch.Tensor, routed: torch.Tensor, bits, quantizer: Quantizer,
                              group_size, symmetric: bool, cfg: CalibrationConfig):
    """-> ({proj: [QuantizedWeight per expert]}, hessian token counts [E], RTN-fallback expert ids).

    ``bits`` / ``group_size``: one for every projection, or ``{proj: ...}`` (``BitPlan.expert_quant``)."""
    rtn = get_quantizer("rtn")
    first, second = layer.projections
    b1, b2 = for_projection(bits, first), for_projection(bits, second)
    g1, g2 = for_projection(group_size, first), for_projection(group_size, second)
    qweights: dict[str, list[QuantizedWeight]] = {first: [], second: []}
    n_tokens, fallback, max_damp = [], [], 0.0
    H_shared = _hessian(X) if cfg.all_experts and X.shape[0] >= max(cfg.min_tokens, 1) else None  # same X for all
    for e in range(layer.num_experts):
        x_e = X if cfg.all_experts else X[routed[:, e]]  # [T_e, H]
        n_tokens.append(int(x_e.shape[0]))
        w_first, w_second = layer.expert_weight(first, e), layer.expert_weight(second, e)
        if x_e.shape[0] < max(cfg.min_tokens, 1):
            fallback.append(e)
            qweights[first].append(rtn.quantize(w_first, b1[e], g1, symmetric))
            qweights[second].append(rtn.quantize(w_second, b2[e], g2, symmetric))
            continue
        H_first = H_shared if H_shared is not None else _hessian(x_e)  # [H, H]
        q1 = quantizer.quantize(w_first, b1[e], g1, symmetric, hessian=H_first)
        max_damp = max(max_damp, getattr(quantizer, "last_percdamp", None) or 0.0)
        z_e = _expert_hidden(layer, e, x_e, q1.dequantize())  # [T_e, I] through the quantized first weight
        q2 = quantizer.quantize(w_second, b2[e], g2, symmetric, hessian=_hessian(z_e))
        max_damp = max(max_damp, getattr(quantizer, "last_percdamp", None) or 0.0)
        qweights[first].append(q1)
        qweights[second].append(q2)
    return qweights, n_tokens, fallback, max_damp


@contextlib.contextmanager
def linear_input_sums(model, names):
    """While the block runs, accumulate ``sum x^T x`` (``[K, K]``, float64) and the token count of the inputs of
    every ``nn.Linear`` whose weight FQN is in ``names``. Yields ``(sums, hooked)``: ``{fqn: [sum, count]}``, filled
    as the model runs, and the FQNs it hooks. The one hook behind GPTQ's non-expert Hessians (``linear_hessians``) and the budget's input moments
    (``plan.budget.input_moments``)."""
    names = set(names)
    acc: dict[str, list] = {}

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()  # [T_b, K]
            s = acc.setdefault(name, [0, 0])
            s[0] = s[0] + x.T @ x
            s[1] += x.shape[0]
        return fn

    hooked = {}
    for m, mod in model.named_modules():
        fqn = f"{m}.weight" if m else "weight"
        if isinstance(mod, torch.nn.Linear) and fqn in names:
            hooked[fqn] = mod
    hooks = [mod.register_forward_pre_hook(hook(fqn)) for fqn, mod in hooked.items()]
    try:
        yield acc, list(hooked)
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def linear_hessians(model, names, batches: torch.Tensor, forward: Callable, batch_size: int) -> dict[str, torch.Tensor]:
    """``2/n X^T X`` ``[K, K]`` of the inputs of every ``nn.Linear`` whose weight FQN is in ``names``, over all the
    calibration tokens, in one pass of ``model`` as it is (``quantize_`` runs it after the experts are quantized, so
    attention and lm_head see the quantized experts' outputs). One Hessian per weight is held at once: for
    Mixtral-8x7B's 128 attention weights and lm_head, ~8 GB in float32."""
    with linear_input_sums(model, names) as (acc, hooked):
        if not hooked:
            return {}
        for i in range(0, batches.shape[0], batch_size):
            forward(batches[i : i + batch_size])
    return {n: (2.0 / max(c, 1) * s).float() for n, (s, c) in acc.items()}


def resolve_calibration(calibration) -> CalibrationConfig:
    """``MoEQuantConfig.calibration`` -> a ``CalibrationConfig`` (None: the defaults)."""
    if calibration is None:
        return CalibrationConfig()
    if not isinstance(calibration, CalibrationConfig):
        raise TypeError(f"MoEQuantConfig.calibration must be a CalibrationConfig, got {type(calibration).__name__}")
    return calibration


@torch.no_grad()
def quantize_sequential(model, plan, quantizer: Quantizer, calibration: CalibrationConfig, *, batches: torch.Tensor,
                        forward: Callable, install: Callable = install_quantized_layer,
                        progress: bool = True) -> CalibrationReport:
    """Quantize every MoE layer's experts with a calibrated quantizer, layer by layer, in place.

    ``plan``: a ``BitPlan``; ``batches``: LongTensor ``[B, S]`` of calibration token ids; ``forward(ids)`` runs
    ``model`` on a batch of them (``moe_export.eval.logits_fn_for(model)``). ``install(model, layer, qweights)``
    puts a quantized layer in place (``quant.apply.install_quantized_layer``: packed subclasses;
    ``install_fake_quant``: dequantized floats). The report also goes into ``plan.provenance["calibration"]``.
    """
    from moe_export.models import find_moe_layers

    t0 = time.perf_counter()
    cal = calibration
    plan.validate_against(model)
    if batches.dim() != 2:
        raise ValueError(f"calibration batches must be token ids [B, S], got shape {tuple(batches.shape)}")
    batches = batches.long()
    sym = plan.quantizer.symmetric

    report = CalibrationReport(calibration_tokens=int(batches.numel()), batch_shape=list(batches.shape))
    was_training = model.training
    model.eval()
    names = [l.name for l in find_moe_layers(model)]
    bar = tqdm(names, desc=f"{quantizer.name} layers", disable=not progress)
    try:
        for name in bar:
            layer = {l.name: l for l in find_moe_layers(model)}[name]  # fresh views after earlier installs
            X, routed = _capture_layer_inputs(forward, layer, batches, cal.batch_size)  # [T, H], [T, E]
            bits, groups = plan.expert_quant(name, layer.projections)
            qweights, n_tok, fallback, damp = quantize_layer_calibrated(layer, X, routed, bits, quantizer, groups, sym, cal)
            del X
            install(model, layer, qweights)
            report.routed_tokens[name] = routed.sum(0).tolist()
            report.hessian_tokens[name] = n_tok
            report.rtn_fallback[name] = fallback
            report.max_percdamp[name] = damp
            if fallback:
                log.warning("%s: experts %s got fewer than %d calibration tokens; quantized with RTN",
                            name, fallback, cal.min_tokens)
            bar.set_postfix(rtn_fallback=sum(len(v) for v in report.rtn_fallback.values()))
    finally:
        model.train(was_training)
    report.seconds = time.perf_counter() - t0
    plan.provenance["calibration"] = report.to_provenance(cal, quantizer.name)
    return report
