"""Calibrated (GPTQ) quantization of a whole MoE model, one MoE layer at a time.

    quantize_sequential(model, MoEQuantConfig(plan, quantizer="gptq", calibration=CalibrationConfig()))

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
  3. install the layer's quantized experts (helper D's install_quantized_layer), so the next layer
     calibrates on quantized outputs.
Memory: one layer's inputs plus one expert's two Hessians at a time.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch
from tqdm.auto import tqdm

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


def _capture_layer_inputs(model, layer, batches, batch_size: int):
    """-> X [T, H] float32 (inputs of ``layer.experts``) and routed [T, E] bool, stopping each forward there."""
    from moe_export.eval import logits_fn_for
    from moe_export.plan.calibration_stats import _experts_args, _routed

    run = logits_fn_for(model)  # the forward the model is evaluated with (Switch: prefix LM)
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
                run(batches[i : i + batch_size])
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


def install_fake_quant(model, layer, qweights: dict[str, list[QuantizedWeight]]) -> None:
    """Write the dequantized weights into the float parameters (for tests and as a fallback)."""
    with torch.no_grad():
        for proj, qws in qweights.items():
            for e, qw in enumerate(qws):
                w = layer.expert_weight(proj, e)
                w.copy_(qw.dequantize(w.dtype))


def _default_install() -> Callable:
    try:
        from moe_export.api import install_quantized_layer
    except ImportError:
        log.warning("moe_export.api.install_quantized_layer not available: installing fake-quantized float weights")
        return install_fake_quant
    return install_quantized_layer


def _calibration_batches(model, cfg: CalibrationConfig, tokenizer):
    from moe_export.zoo.data import calibration_batches

    src = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(src)
        except Exception as exc:  # noqa: BLE001 - reported as one actionable message
            raise ValueError(
                f"calibration needs text: no tokenizer found at the model's path {src!r} ({exc}); "
                "pass batches=LongTensor[B, T] or tokenizer= to quantize_sequential"
            ) from exc
    entry = _zoo_entry(src)
    corpus = cfg.corpus or entry.get("finetune", {}).get("corpus")
    seq_len = cfg.seq_len or entry.get("seq_len") or min(256, getattr(model.config, "max_position_embeddings", 256))
    kwargs = {} if corpus is None else {"corpus": corpus}
    return calibration_batches(tokenizer, cfg.n_tokens, seq_len, cfg.seed, **kwargs)


def _zoo_entry(model_path) -> dict:
    """The zoo recipe of a checkpoint folder (``finetuned/`` or ``pretrained/`` of a zoo build), or {}."""
    import json
    from pathlib import Path

    if not model_path:
        return {}
    p = Path(model_path)
    for m in (p / "manifest.json", p.parent / "manifest.json"):
        if m.is_file():
            return json.loads(m.read_text()).get("entry", {})
    return {}


def quantize_layer_calibrated(layer, X: torch.Tensor, routed: torch.Tensor, bits: list[int], quantizer: Quantizer,
                              group_size, symmetric: bool, cfg: CalibrationConfig):
    """-> ({proj: [QuantizedWeight per expert]}, hessian token counts [E], RTN-fallback expert ids)."""
    rtn = get_quantizer("rtn")
    first, second = layer.projections
    qweights: dict[str, list[QuantizedWeight]] = {first: [], second: []}
    n_tokens, fallback, max_damp = [], [], 0.0
    H_shared = _hessian(X) if cfg.all_experts and X.shape[0] >= max(cfg.min_tokens, 1) else None  # same X for all
    for e in range(layer.num_experts):
        x_e = X if cfg.all_experts else X[routed[:, e]]  # [T_e, H]
        n_tokens.append(int(x_e.shape[0]))
        w_first, w_second = layer.expert_weight(first, e), layer.expert_weight(second, e)
        if x_e.shape[0] < max(cfg.min_tokens, 1):
            fallback.append(e)
            qweights[first].append(rtn.quantize(w_first, bits[e], group_size, symmetric))
            qweights[second].append(rtn.quantize(w_second, bits[e], group_size, symmetric))
            continue
        H_first = H_shared if H_shared is not None else _hessian(x_e)  # [H, H]
        q1 = quantizer.quantize(w_first, bits[e], group_size, symmetric, hessian=H_first)
        max_damp = max(max_damp, getattr(quantizer, "last_percdamp", None) or 0.0)
        z_e = _expert_hidden(layer, e, x_e, q1.dequantize())  # [T_e, I] through the quantized first weight
        q2 = quantizer.quantize(w_second, bits[e], group_size, symmetric, hessian=_hessian(z_e))
        max_damp = max(max_damp, getattr(quantizer, "last_percdamp", None) or 0.0)
        qweights[first].append(q1)
        qweights[second].append(q2)
    return qweights, n_tokens, fallback, max_damp


def _resolve(config):
    from moe_export.plan.bitplan import BitPlan

    plan = config.plan if isinstance(config.plan, BitPlan) else BitPlan.load(config.plan)
    q = config.quantizer
    quantizer = get_quantizer(q, **dict(getattr(config, "quantizer_options", None) or {})) if isinstance(q, str) else q
    cal = getattr(config, "calibration", None) or CalibrationConfig()
    if not isinstance(cal, CalibrationConfig):
        raise TypeError(f"MoEQuantConfig.calibration must be a CalibrationConfig, got {type(cal).__name__}")
    return plan, quantizer, cal


@torch.no_grad()
def quantize_sequential(model, config, *, batches: torch.Tensor | None = None, tokenizer=None,
                        install: Callable | None = None, progress: bool = True) -> CalibrationReport:
    """Quantize every MoE layer's experts with a calibrated quantizer, layer by layer, in place.

    ``config``: a ``MoEQuantConfig`` (``plan``, ``quantizer``, ``quantizer_options``, ``calibration``).
    ``batches``: LongTensor ``[B, S]`` of token ids (else ``calibration.batches``, else
    ``calibration.n_tokens`` tokens of zoo text tokenized with ``tokenizer`` or the model's own). ``install(model, layer,
    qweights)`` puts a quantized layer in place (default: ``moe_export.api.install_quantized_layer``).
    The report also goes into ``plan.provenance["calibration"]`` when ``config.plan`` is a BitPlan.
    """
    from moe_export.models import find_moe_layers

    t0 = time.perf_counter()
    plan, quantizer, cal = _resolve(config)
    plan.validate_against(model)
    install = install or _default_install()
    if batches is None:
        batches = cal.batches if cal.batches is not None else _calibration_batches(model, cal, tokenizer)
    if batches.dim() != 2:
        raise ValueError(f"calibration batches must be token ids [B, S], got shape {tuple(batches.shape)}")
    batches = batches.long()
    gs, sym = plan.quantizer.group_size, plan.quantizer.symmetric

    report = CalibrationReport(calibration_tokens=int(batches.numel()), batch_shape=list(batches.shape))
    was_training = model.training
    model.eval()
    names = [l.name for l in find_moe_layers(model)]
    bar = tqdm(names, desc=f"{quantizer.name} layers", disable=not progress)
    try:
        for name in bar:
            layer = {l.name: l for l in find_moe_layers(model)}[name]  # fresh views after earlier installs
            X, routed = _capture_layer_inputs(model, layer, batches, cal.batch_size)  # [T, H], [T, E]
            qweights, n_tok, fallback, damp = quantize_layer_calibrated(
                layer, X, routed, plan.bits_for(name), quantizer, gs, sym, cal
            )
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
