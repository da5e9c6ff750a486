"""The ``moe_export_mixed`` experts implementation: routed experts only, each at its own bit width.

Registered with ``transformers.integrations.moe.ALL_EXPERTS_FUNCTIONS``; a quantized model switches to it
with ``model.set_experts_implementation("moe_export_mixed")`` (``quantize_`` does this). Three formulations,
picked from static facts (shapes, compile state), never from routing values:

* ``routed_loop`` (eager): loop over the experts that received tokens, dequantize each once, one float
  matmul for its tokens: exactly the routed work, data-dependent, so eager only.
* CPU fused (compiled at any number of pairs, eager up to ``CPU_FUSED_EAGER_MAX_PAIRS``; SwiGLU experts
  without bias):
  ``fused_cpu_forward``, the whole routed FFN of the layer in one C++ dispatcher op
  (``moe_export::cpu_moe_ffn``): gate_up mat-vec, SiLU(gate) * up, down mat-vec and the routing-weighted
  sum for every pair, every width group, reading the packed bytes in place. One call per layer instead of
  two per width plus the gather/mask/gate glue between them.
* CPU decode (eager and compiled, <= ``CPU_KERNEL_MAX_PAIRS`` pairs): ``routed_gather`` with every width
  group's mat-vec done by the C++ op ``moe_export::cpu_mixed_width_gemv`` (``moe_export.kernels.cpu_ops``),
  which reads the routed experts' packed rows in place and unpacks them in registers: no gathered copy of
  the packed bytes, no float weight. Falls back to the paths below when the kernel is off
  (``MOE_EXPORT_CPU_KERNEL=0``), cannot be built, or under ``torch.export``.
* ``routed_gather`` (compiled, few token-expert pairs, e.g. decode; static, exportable): per width
  group, gather the packed bytes of the routed experts (a dummy slot where the pair's expert has another
  width), multiply by ``packed_matvec`` (unpack + dequantize fused into the reduction), keep the rows
  whose width matches, and sum over the groups.
* ``dense_groups`` (compiled, many pairs, e.g. prefill): per width group, run its experts on every token
  with ``packed_linear_experts`` (dequantize one bit position at a time into contiguous planes, one float
  matmul per position) and weight by the routing matrix (zero for unrouted pairs). Static shapes; E/k
  times the routed FLOPs, but float GEMMs instead of T*k gathered weight copies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_export.kernels import cpu_ops
from moe_export.tensors.functional import packed_linear_experts, packed_matvec
from moe_export.tensors.mixed_width_experts_tensor import MixedWidthExpertsTensor

IMPLEMENTATION = "moe_export_mixed"

# Pairs (tokens * top_k) up to which the gathered mat-vec beats dequantizing whole groups.
GATHER_MAX_PAIRS = 8
# Pairs up to which the C++ mat-vec (one pass over each routed row per pair) is used on CPU.
CPU_KERNEL_MAX_PAIRS = 16
# The fused C++ expert FFN runs up to 8 pairs of one expert per pass over the packed rows, which also beats
# the other formulations at prefill (small-mixtral block, 128 tokens, 1 thread: 2.4 ms vs 9.4 ms routed_loop
# eager, 12.9 ms dense_groups compiled, 3.0 ms float grouped_mm). Compiled, it takes any number of pairs.
# Eager, only up to this many: above it the eager path stays routed_loop, whose dequantize + F.linear is
# bit-exact with a float model holding the dequantized weights (what calibration and GPTQ checks compare).
CPU_FUSED_EAGER_MAX_PAIRS = 16


def _fusable(self) -> bool:
    """Static facts only (module attributes, Python tuples): the layer is a SwiGLU expert stack the fused op
    computes exactly (split gate/up halves, SiLU, no bias, one width per expert in both projections)."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    up, down = self.gate_up_proj if self.has_gate else None, self.down_proj
    if not isinstance(up, MixedWidthExpertsTensor) or not isinstance(down, MixedWidthExpertsTensor):
        return False
    return (not self.has_bias and isinstance(self.act_fn, (SiLUActivation, torch.nn.SiLU))
            and getattr(type(self), "_apply_gate", None) is _default_apply_gate
            and not up.transposed and not down.transposed and up.bit_widths == down.bit_widths
            and up.dtype == torch.float32 and set(up.widths) <= set(cpu_ops.FUSED_WIDTHS))


def fused_cpu_forward(self, hidden_states, top_k_index, top_k_weights):
    """The routed experts of one layer in one ``moe_export::cpu_moe_ffn`` call -> ``[T, H]``."""
    up, down = self.gate_up_proj, self.down_proj
    widths = up.widths
    return torch.ops.moe_export.cpu_moe_ffn(
        hidden_states, top_k_index, top_k_weights, list(up.bit_widths), list(up.slots), list(widths),
        [getattr(up, f"packed_{b}") for b in widths], [getattr(up, f"scale_{b}") for b in widths],
        [getattr(up, f"zero_{b}") for b in widths], [getattr(down, f"packed_{b}") for b in widths],
        [getattr(down, f"scale_{b}") for b in widths], [getattr(down, f"zero_{b}") for b in widths],
    )


def routed_linear(w: MixedWidthExpertsTensor, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``y[s] = W[expert_ids[s]] @ x[s]`` for a packed mixed-width stack; ``x`` ``[S, K]`` -> ``[S, N]``."""
    bits_of = w.expert_bits[expert_ids]  # [S]
    slot_of = w.slot[expert_ids]  # [S]
    out = None
    widths = w.widths
    kernel = cpu_ops.runs_on(x)
    for b in widths:
        p, s, z = getattr(w, f"packed_{b}"), getattr(w, f"scale_{b}"), getattr(w, f"zero_{b}")
        if kernel and b in cpu_ops.KERNEL_BITS:
            idx = slot_of if len(widths) == 1 else torch.where(bits_of == b, slot_of, torch.full_like(slot_of, -1))
            y = torch.ops.moe_export.cpu_mixed_width_gemv(x, idx, p, s, z, b)  # [S, N], zero rows off-group
            out = y if out is None else out + y
            continue
        if len(widths) == 1:
            idx = slot_of
        else:
            hit = bits_of == b  # [S]
            idx = torch.where(hit, slot_of, torch.zeros_like(slot_of))  # dummy slot 0 for other widths
        y = packed_matvec(x, p[idx], s[idx], None if z is None else z[idx], b)  # [S, N]
        if len(widths) > 1:
            y = torch.where(hit.unsqueeze(-1), y, torch.zeros_like(y))
        out = y if out is None else out + y
    return out


def _gate(self, h: torch.Tensor) -> torch.Tensor:
    return self._apply_gate(h) if self.has_gate else self.act_fn(h)


def _weights(self):
    if self.has_gate:
        return self.gate_up_proj, getattr(self, "gate_up_proj_bias", None) if self.has_bias else None
    return self.up_proj, getattr(self, "up_proj_bias", None) if self.has_bias else None


def routed_gather(self, hidden_states, top_k_index, top_k_weights):
    t, k = top_k_index.shape
    x = hidden_states.repeat_interleave(k, dim=0)  # [S, H], S = T*k
    ids = top_k_index.reshape(-1)  # [S]
    w_up, b_up = _weights(self)
    h = routed_linear(w_up, x, ids)  # [S, 2I]
    if b_up is not None:
        h = h + b_up[ids]
    h = _gate(self, h)  # [S, I]
    y = routed_linear(self.down_proj, h, ids)  # [S, H]
    if self.has_bias:
        y = y + self.down_proj_bias[ids]
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
    return y.view(t, k, -1).sum(1).to(hidden_states.dtype)  # [T, H]


def routed_loop(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)  # [T, H]
    w_up, _ = _weights(self)
    for e in torch.unique(top_k_index).tolist():
        tok, pos = torch.where(top_k_index == e)  # tokens routed to e
        x = hidden_states[tok]  # [T_e, H]
        h = F.linear(x, w_up.expert(e))  # PackedLinearWeight: dequantize once, one matmul
        if self.has_bias:
            h = h + _weights(self)[1][e]
        h = _gate(self, h)
        y = F.linear(h, self.down_proj.expert(e))
        if self.has_bias:
            y = y + self.down_proj_bias[e]
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def dense_groups(self, hidden_states, top_k_index, top_k_weights):
    t = hidden_states.shape[0]
    w_up, b_up = _weights(self)
    routing = torch.zeros(t, w_up.num_experts, dtype=top_k_weights.dtype, device=hidden_states.device)
    routing = routing.scatter(1, top_k_index, top_k_weights)  # [T, E], zero for unrouted experts
    out = torch.zeros_like(hidden_states)
    for b in w_up.widths:
        members = [e for e, eb in enumerate(w_up.bit_widths) if eb == b]  # in slot order
        h = packed_linear_experts(hidden_states, getattr(w_up, f"packed_{b}"), getattr(w_up, f"scale_{b}"),
                                  getattr(w_up, f"zero_{b}"), b)  # [E_b, T, 2I]
        if b_up is not None:
            h = h + b_up[members].unsqueeze(1)
        h = _gate(self, h)
        d = self.down_proj
        db = [d.bit_widths[e] for e in members]
        if len(set(db)) != 1 or db[0] != b or d.slots != w_up.slots:
            raise ValueError("dense_groups needs gate_up_proj and down_proj of an expert at the same width")
        y = packed_linear_experts(h, getattr(d, f"packed_{b}"), getattr(d, f"scale_{b}"), getattr(d, f"zero_{b}"),
                                  b)  # [E_b, T, H]
        if self.has_bias:
            y = y + self.down_proj_bias[members].unsqueeze(1)
        out = out + torch.einsum("eth,te->th", y, routing[:, members].to(y.dtype))
    return out


def mixed_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """``hidden_states`` ``[T, H]``, ``top_k_index``/``top_k_weights`` ``[T, k]`` -> ``[T, H]``."""
    w_up, _ = _weights(self)
    if not isinstance(w_up, MixedWidthExpertsTensor) or not isinstance(self.down_proj, MixedWidthExpertsTensor):
        # float (or partly float) experts: the plain gather + bmm path handles them
        from transformers.integrations.moe import batched_mm_experts_forward

        return batched_mm_experts_forward(self, hidden_states, top_k_index, top_k_weights)
    if self.is_transposed:
        raise NotImplementedError(f"{type(self).__name__}: transposed expert layouts are not supported yet")

    # --- dispatch point: CUDA tensors go to the Triton kernels in moe_export.kernels (helper F) ---
    if hidden_states.is_cuda:
        cuda_forward = _cuda_forward()
        if cuda_forward is not None:
            return cuda_forward(self, hidden_states, top_k_index, top_k_weights)
    # --- end of dispatch point ---

    if ((top_k_index.numel() <= CPU_FUSED_EAGER_MAX_PAIRS or torch.compiler.is_compiling())
            and _fusable(self) and cpu_ops.fused_runs_on(hidden_states)):
        return fused_cpu_forward(self, hidden_states, top_k_index, top_k_weights)
    if top_k_index.numel() <= CPU_KERNEL_MAX_PAIRS and cpu_ops.runs_on(hidden_states):
        return routed_gather(self, hidden_states, top_k_index, top_k_weights)
    if not torch.compiler.is_compiling():
        # eager: the fused mat-vec is one big broadcast expression, only fast once inductor fuses it
        return routed_loop(self, hidden_states, top_k_index, top_k_weights)
    if top_k_index.numel() <= GATHER_MAX_PAIRS:
        return routed_gather(self, hidden_states, top_k_index, top_k_weights)
    return dense_groups(self, hidden_states, top_k_index, top_k_weights)


def _cuda_forward():
    try:
        from moe_export.kernels.moe import mixed_experts_forward as fwd
    except ImportError:
        return None
    return fwd


def register() -> None:
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    if IMPLEMENTATION not in ALL_EXPERTS_FUNCTIONS:
        ALL_EXPERTS_FUNCTIONS.register(IMPLEMENTATION, mixed_experts_forward)


register()
