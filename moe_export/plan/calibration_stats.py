"""Routing statistics from one calibration pass: activation frequency and mean routing weight.

The baselines of the paper's Switch experiments ("activation frequency", "activation weight") and
PMQ need them; GPTQ reuses the same pass. Hooks sit on each MoE block's ``experts`` module, whose
inputs are exactly what the model routed: ``(hidden [T, H], index, weights)`` with

    fused experts (Mixtral, Qwen, OLMoE, DeepSeek)   index [T, k] int,        weights [T, k]
    Switch                                           index [T, 1, E] one-hot, weights [T, 1]

so every architecture's own routing rule (softmax top-k, sigmoid groups, capacity drops) is used
as is. T = tokens entering the layer, E = experts, k = top-k, H = hidden.
"""

from __future__ import annotations

from typing import Iterable

import torch
from tqdm.auto import tqdm


def _routed(index: torch.Tensor, weights: torch.Tensor, E: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> token ids ``[R]`` and expert ids ``[R]`` and weights ``[R]`` of every (token, expert) route."""
    if index.dim() == 3:  # Switch one-hot dispatch [T, 1, E]; an all-zero row is a capacity drop
        onehot = index.reshape(index.shape[0], -1, E).any(1)  # [T, E]
        tok, exp = onehot.nonzero(as_tuple=True)
        w = weights.reshape(weights.shape[0], -1)[:, 0][tok]  # top-1: one weight per token
        return tok, exp, w
    T, k = index.shape
    tok = torch.arange(T).repeat_interleave(k)  # [T*k]
    return tok, index.reshape(-1).long(), weights.reshape(-1)


class RoutingRecorder:
    """Accumulates routing counts and weights per layer; optionally keeps routed input rows per expert."""

    def __init__(self, layers, keep_inputs: int = 0):
        self.layers = layers
        self.keep_inputs = keep_inputs
        self.tokens = {l.name: 0 for l in layers}
        self.count = {l.name: torch.zeros(l.num_experts, dtype=torch.float64) for l in layers}
        self.weight_sum = {l.name: torch.zeros(l.num_experts, dtype=torch.float64) for l in layers}
        self.inputs = {l.name: [[] for _ in range(l.num_experts)] for l in layers}
        self.handles = []

    def _hook(self, layer):
        E = layer.num_experts

        def hook(module, args, kwargs):
            hidden, index, weights = _experts_args(args, kwargs)
            hidden = hidden.reshape(-1, hidden.shape[-1])  # [T, H]
            tok, exp, w = _routed(index.detach(), weights.detach().float(), E)
            self.tokens[layer.name] += hidden.shape[0]
            self.count[layer.name] += torch.bincount(exp, minlength=E).double()
            self.weight_sum[layer.name] += torch.zeros(E, dtype=torch.float64).index_add_(0, exp, w.double())
            if self.keep_inputs:
                for e in exp.unique().tolist():
                    have = sum(x.shape[0] for x in self.inputs[layer.name][e])
                    if have < self.keep_inputs:
                        rows = hidden[tok[exp == e]][: self.keep_inputs - have]  # [T_e, H]
                        self.inputs[layer.name][e].append(rows.detach().float().clone())

        return hook

    def __enter__(self):
        for layer in self.layers:
            self.handles.append(layer.experts.register_forward_pre_hook(self._hook(layer), with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        self.handles.clear()

    def result(self) -> dict:
        out = {}
        for l in self.layers:
            n, cnt = self.tokens[l.name], self.count[l.name]
            stats = {
                "tokens": n,
                "frequency": cnt / max(n, 1),  # [E] fraction of tokens routed to e (sums to top-k)
                "mean_weight": self.weight_sum[l.name] / cnt.clamp_min(1),  # [E] mean weight when routed
            }
            if self.keep_inputs:
                stats["inputs"] = [torch.cat(x) if x else torch.zeros(0, l.hidden_size) for x in self.inputs[l.name]]
            out[l.name] = stats
        return out


def _experts_args(args, kwargs):
    names = ("hidden_states", "top_k_index", "top_k_weights")
    vals = list(args) + [kwargs.get(n) for n in names[len(args):]]
    if len(vals) < 3 or any(v is None for v in vals[:3]):
        # Switch names them selected_experts / routing_weights
        alt = ("hidden_states", "selected_experts", "routing_weights")
        vals = list(args) + [kwargs.get(n) for n in alt[len(args):]]
    return vals[0], vals[1], vals[2]


def _run(model, batch):
    if isinstance(batch, dict):
        return model(**batch)
    kwargs = {"input_ids": batch}
    if getattr(model.config, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = batch
    return model(**kwargs)


@torch.no_grad()
def routing_statistics(model, batches: Iterable, keep_inputs: int = 0, layers=None, progress: bool = True) -> dict:
    """One forward pass over ``batches`` (``input_ids`` tensors ``[B, S]`` or dicts of model kwargs).

    -> ``{layer name: {"tokens": int, "frequency": [E] float64, "mean_weight": [E] float64}}`` and,
    with ``keep_inputs=N``, ``"inputs"``: per expert up to N routed hidden rows ``[T_e, H]`` (for PMQ).
    """
    from moe_export.models import find_moe_layers

    layers = find_moe_layers(model) if layers is None else layers
    was_training = model.training
    model.eval()
    try:
        with RoutingRecorder(layers, keep_inputs) as rec:
            for batch in tqdm(list(batches), desc="calibration", disable=not progress):
                _run(model, batch)
    finally:
        model.train(was_training)
    return rec.result()
