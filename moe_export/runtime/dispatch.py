"""How a packed layer runs: the one table of which formulation runs when, and the formulations.

The ``moe_export_mixed`` experts implementation (``runtime.hf.mixed_experts_forward``, registered with
transformers by ``moe_export.runtime.register``) computes the routed experts only, each at its own width. Which
formulation runs is decided from static facts (device, number of token-expert pairs, compile/export state, dtype,
the layer's shape), never from routing values, so ``torch.compile`` guards on the choice instead of breaking the
graph. :func:`select_experts` is the table:

=================  ====================================================================  ==========================
formulation        when                                                                  what it does
=================  ====================================================================  ==========================
``cuda_gather``    CUDA, Triton installed, pairs <= ``CUDA_DECODE_MAX_PAIRS``             one Triton GEMV per pair
``cuda_grouped``   CUDA, Triton installed, more pairs                                     sort by expert, grouped GEMM
``cpu_fused``      CPU float32/bf16/fp16 SwiGLU layer, C++ ops on and built, not          whole layer in one C++ op
                   exporting; compiled at any pairs, eager up to ``CPU_FUSED_EAGER_MAX_PAIRS``
``routed_gather``  CPU, C++ ops on, not exporting, pairs <= ``CPU_KERNEL_MAX_PAIRS``      C++ mat-vec per width group
                   (or compiled, pairs <= ``GATHER_MAX_PAIRS``: inductor ``packed_matvec``)
``routed_loop``    eager otherwise                                                        dequantize each routed expert
``dense_groups``   compiled otherwise (prefill)                                           every expert, routing-weighted
=================  ====================================================================  ==========================

Packed 2-D linears (:func:`select_linear`): the C++ ``cpu_packed_linear`` up to ``CPU_LINEAR_MAX_ROWS`` rows
(float32/bf16/fp16 CPU, not exporting), the inductor ``packed_matvec`` when compiling up to ``COMPILED_MATVEC_MAX_ROWS``,
else dequantize + one float matmul. Exported graphs use ``export.experts.PackedMixedExperts`` (a module swap by
``export.prepare``), which never reaches this table.

The formulations:

* ``routed_loop`` (eager): loop over the experts that received tokens, dequantize each once, one float
  matmul for its tokens: exactly the routed work, data-dependent, so eager only. Its dequantize + F.linear is
  bit-exact with a float model holding the dequantized weights (what calibration and GPTQ checks compare).
* ``fused_cpu_forward``: the whole routed FFN of the layer in one C++ dispatcher op (``moe_export::cpu_moe_ffn``):
  gate_up mat-vec, SiLU(gate) * up, down mat-vec and the routing-weighted sum for every pair, every width
  group, reading the packed bytes in place. One call per layer instead of two per width plus the glue. The C++
  ops compute in float32: bfloat16/float16 activations are converted once per call around the op
  (:func:`_in_float32`).
* ``routed_gather``: per width group, the routed experts' rows: with the C++ op
  ``moe_export::cpu_mixed_width_gemv`` (reads the packed rows in place, unpacks in registers) where it runs,
  else gather the packed bytes (a dummy slot where the pair's expert has another width), ``packed_matvec``
  (unpack + dequantize fused into the reduction), keep the rows whose width matches, sum over the groups.
* ``dense_groups``: per width group, run its experts on every token with ``packed_linear_experts`` (dequantize one
  bit position at a time into contiguous planes, one float matmul per position) and weight by the routing
  matrix (zero for unrouted pairs). Static shapes; E/k times the routed FLOPs, but float GEMMs instead of T*k
  gathered weight copies.
* ``cuda_gather`` / ``cuda_grouped``: the Triton custom ops ``moe_export::mixed_width_gather_mm`` /
  ``mixed_width_grouped_mm`` (``moe_export.kernels.ops``; on other devices they run the plain-torch reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_export.kernels import HAS_TRITON, cpu_ops
from moe_export.runtime.layout import dequantize_packed
from moe_export.runtime.matmul import packed_linear_experts, packed_matvec

# ------------------------------------------------------------------------------------------ the thresholds

# Pairs (tokens * top_k) up to which the gathered mat-vec beats dequantizing whole groups (compiled, no C++ ops).
GATHER_MAX_PAIRS = 8
# Pairs up to which the C++ mat-vec (one pass over each routed row per pair) is used on CPU.
CPU_KERNEL_MAX_PAIRS = 16
# The fused C++ expert FFN runs up to 8 pairs of one expert per pass over the packed rows, which also beats
# the other formulations at prefill (small-mixtral block, 128 tokens, 1 thread: 2.4 ms vs 9.4 ms routed_loop
# eager, 12.9 ms dense_groups compiled, 3.0 ms float grouped_mm). Compiled, it takes any number of pairs.
# Eager, only up to this many: above it the eager path stays routed_loop, whose dequantize + F.linear is
# bit-exact with a float model holding the dequantized weights (what calibration and GPTQ checks compare).
CPU_FUSED_EAGER_MAX_PAIRS = 16
# Pairs up to which one Triton GEMV per pair beats sorting into grouped-GEMM tiles: below 16 rows a
# tensor-core tile is mostly padding.
CUDA_DECODE_MAX_PAIRS = 16
# Rows (tokens) up to which a CPU packed linear runs the C++ mat-vec (moe_export::cpu_packed_linear, one pass
# over the packed weight per 8 rows with AVX-512, 4 without); above it, one dequantize + BLAS matmul is faster.
CPU_LINEAR_MAX_ROWS = 16
# Rows up to which a compiled packed linear (no C++ op) runs the fused inductor mat-vec; eager dequantize +
# BLAS is faster at any size (the mat-vec is one big broadcast expression, only fast once inductor fuses it).
COMPILED_MATVEC_MAX_ROWS = 4


# ------------------------------------------------------------------------------------------ the table


# Activation dtypes the fused C++ ops serve: they compute in float32, and a bfloat16/float16 layer converts its
# activations once per call (``_in_float32``). Measured at decode (one token, top-2, 1 thread, 3/2-bit experts,
# group 128, a shared 2-core box): the two conversions take 3-8 us, the fused call 50-100 us at H=256, I=256
# (routed_loop 600-800 us in bf16/fp16) and 1.2-2.8 ms at H=1024, I=2816.
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _cpu_ops_take(x: torch.Tensor) -> bool:
    return cpu_ops.runs_on(x)


def _fused_take(x: torch.Tensor) -> bool:
    """Whether the fused C++ ops (``cpu_moe_ffn``, ``cpu_packed_linear``) may take ``x``: a CPU activation of a
    dtype in :data:`FUSED_DTYPES`, the ops enabled and built, not exporting."""
    return x.dtype in FUSED_DTYPES and cpu_ops.runs_on(x) and cpu_ops.fused_ready()


def _in_float32(op, x: torch.Tensor, *args) -> torch.Tensor:
    """``op(x, *args)`` for a float32-only C++ op: ``x`` converted once before it, the result back after."""
    if x.dtype == torch.float32:
        return op(x, *args)
    return op(x.float(), *args).to(x.dtype)


def select_experts(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor) -> str:
    """The formulation (a key of :data:`EXPERT_FORMULATIONS`) for one call of a packed expert layer."""
    pairs = top_k_index.numel()
    compiling = torch.compiler.is_compiling()
    if hidden_states.is_cuda and HAS_TRITON:
        return "cuda_gather" if pairs <= CUDA_DECODE_MAX_PAIRS else "cuda_grouped"
    if (pairs <= CPU_FUSED_EAGER_MAX_PAIRS or compiling) and _fusable(self) and _fused_take(hidden_states):
        return "cpu_fused"
    if pairs <= CPU_KERNEL_MAX_PAIRS and _cpu_ops_take(hidden_states):
        return "routed_gather"
    if not compiling:
        return "routed_loop"
    if pairs <= GATHER_MAX_PAIRS:
        return "routed_gather"
    return "dense_groups"


def select_linear(x: torch.Tensor, bits: int, k: int) -> str:
    """The formulation of a packed 2-D linear: ``cpu_linear``, ``matvec`` or ``dequantize``."""
    rows = x.numel() // k
    if rows <= CPU_LINEAR_MAX_ROWS and bits in cpu_ops.FUSED_WIDTHS and _fused_take(x):
        return "cpu_linear"
    if rows <= COMPILED_MATVEC_MAX_ROWS and torch.compiler.is_compiling():
        return "matvec"
    return "dequantize"


def _fusable(self) -> bool:
    """Static facts only (module attributes, Python tuples): the layer is a SwiGLU expert stack the fused op
    computes exactly (split gate/up halves, SiLU, no bias, one width per expert in both projections)."""
    from transformers.activations import SiLUActivation
    from transformers.integrations.moe import _default_apply_gate

    if not self.has_gate:
        return False
    up, down = self.gate_up_proj, self.down_proj  # MixedWidthExpertsTensor both (the caller checked)
    return (not self.has_bias and isinstance(self.act_fn, (SiLUActivation, torch.nn.SiLU))
            and getattr(type(self), "_apply_gate", None) is _default_apply_gate
            and not up.transposed and not down.transposed and up.bit_widths == down.bit_widths
            and up.dtype in FUSED_DTYPES and set(up.widths) <= set(cpu_ops.FUSED_WIDTHS))


# ------------------------------------------------------------------------------------------ shared pieces


def _gate(self, h: torch.Tensor) -> torch.Tensor:
    """The activation between the two projections: transformers' gate (SiLU(gate) * up) or the plain act_fn."""
    return self._apply_gate(h) if self.has_gate else self.act_fn(h)


def projections(self):
    """``(up weight, up bias, down bias)`` of a transformers experts module (biases None when it has none)."""
    b_down = self.down_proj_bias if self.has_bias else None
    if self.has_gate:
        return self.gate_up_proj, (getattr(self, "gate_up_proj_bias", None) if self.has_bias else None), b_down
    return self.up_proj, (getattr(self, "up_proj_bias", None) if self.has_bias else None), b_down


def _routed_ffn(self, x, ids, linear):
    """``down(gate(up(x)))`` for pairs in rows: ``x`` ``[S, H]``, ``ids`` ``[S]`` the expert of each row, ``linear(w, x,
    ids)`` one projection -> ``[S, H]``."""
    w_up, b_up, b_down = projections(self)
    h = linear(w_up, x, ids)  # [S, 2I]
    if b_up is not None:
        h = h + b_up[ids]
    y = linear(self.down_proj, _gate(self, h), ids)  # [S, H]
    if b_down is not None:
        y = y + b_down[ids]
    return y


# ------------------------------------------------------------------------------------------ formulations


def fused_cpu_forward(self, hidden_states, top_k_index, top_k_weights):
    """The routed experts of one layer in one ``moe_export::cpu_moe_ffn`` call -> ``[T, H]``."""
    up, down = self.gate_up_proj, self.down_proj
    widths = up.widths
    return _in_float32(
        torch.ops.moe_export.cpu_moe_ffn, hidden_states, top_k_index, top_k_weights, list(up.bit_widths),
        list(up.slots), list(widths),
        [getattr(up, f"packed_{b}") for b in widths], [getattr(up, f"scale_{b}") for b in widths],
        [getattr(up, f"zero_{b}") for b in widths], [getattr(down, f"packed_{b}") for b in widths],
        [getattr(down, f"scale_{b}") for b in widths], [getattr(down, f"zero_{b}") for b in widths],
        cpu_ops.ACCURACY,
    )


def routed_linear(w, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
    """``y[s] = W[expert_ids[s]] @ x[s]`` for a packed mixed-width stack; ``x`` ``[S, K]`` -> ``[S, N]``."""
    bits_of = w.expert_bits[expert_ids]  # [S]
    slot_of = w.slot[expert_ids]  # [S]
    out = None
    widths = w.widths
    kernel = _cpu_ops_take(x)
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


def _per_pair(self, hidden_states, top_k_index, top_k_weights, linear):
    """One row per (token, expert) pair through ``_routed_ffn``, then the routing-weighted sum -> ``[T, H]``."""
    t, k = top_k_index.shape
    x = hidden_states.repeat_interleave(k, dim=0)  # [S, H], S = T*k
    ids = top_k_index.reshape(-1)  # [S]
    y = _routed_ffn(self, x, ids, linear)  # [S, H]
    y = y * top_k_weights.reshape(-1, 1).to(y.dtype)
    # reshape + sum accumulates each token's experts deterministically (index_add_ would use atomics)
    return y.view(t, k, -1).sum(1).to(hidden_states.dtype)  # [T, H]


def routed_gather(self, hidden_states, top_k_index, top_k_weights):
    return _per_pair(self, hidden_states, top_k_index, top_k_weights, routed_linear)


def routed_loop(self, hidden_states, top_k_index, top_k_weights):
    out = torch.zeros_like(hidden_states)  # [T, H]
    w_up, b_up, b_down = projections(self)
    for e in torch.unique(top_k_index).tolist():
        tok, pos = torch.where(top_k_index == e)  # tokens routed to e
        x = hidden_states[tok]  # [T_e, H]
        h = F.linear(x, w_up.expert(e))  # PackedLinearWeight: dequantize once, one matmul
        if b_up is not None:
            h = h + b_up[e]
        h = _gate(self, h)
        y = F.linear(h, self.down_proj.expert(e))
        if b_down is not None:
            y = y + b_down[e]
        out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
    return out


def dense_groups(self, hidden_states, top_k_index, top_k_weights):
    t = hidden_states.shape[0]
    w_up, b_up, b_down = projections(self)
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
        if b_down is not None:
            y = y + b_down[members].unsqueeze(1)
        out = out + torch.einsum("eth,te->th", y, routing[:, members].to(y.dtype))
    return out


def _width_group_args(w) -> tuple:
    """``(packed, scales, zeros, bits, expert_bits, slot)``: the mixed-width ops' arguments for a stack."""
    groups = list(w.groups())  # [(b, packed_b, scale_b, zero_b)], ascending b
    return ([g[1] for g in groups], [g[2] for g in groups], [g[3] for g in groups], [g[0] for g in groups],
            w.expert_bits, w.slot)


def _gather_mm(w, x, ids):
    """``out[s] = x[s] @ W[ids[s]].T`` through ``moe_export::mixed_width_gather_mm``: ``[S, K]`` -> ``[S, N]``."""
    from moe_export.kernels import ops  # noqa: F401  (defines torch.ops.moe_export.mixed_width_*)

    return torch.ops.moe_export.mixed_width_gather_mm(x, ids, *_width_group_args(w))


def cuda_gather(self, hidden_states, top_k_index, top_k_weights):
    """Decode: one ``mixed_width_gather_mm`` per projection over the (token, expert) pairs, no sort."""
    return _per_pair(self, hidden_states, top_k_index, top_k_weights, _gather_mm)


def cuda_grouped(self, hidden_states, top_k_index, top_k_weights):
    """Prefill: sort pairs by expert, ``mixed_width_grouped_mm`` over the expert-contiguous rows."""
    from moe_export.kernels import ops  # noqa: F401  (defines torch.ops.moe_export.mixed_width_*)

    t, k = top_k_index.shape
    w_up = projections(self)[0]
    ids = top_k_index.reshape(-1)  # [S]
    ids_sorted, perm = torch.sort(ids)  # [S]
    x = hidden_states[perm // k]  # [S, H], expert-contiguous
    # histc, not bincount: bincount syncs with the host to size its output
    hist_in = ids_sorted.int() if ids.is_cuda else ids_sorted.float()
    counts = torch.histc(hist_in, bins=w_up.num_experts, min=0, max=w_up.num_experts - 1)
    offs = torch.cumsum(counts, 0, dtype=torch.int32)  # [E]

    def grouped(w, rows, row_ids):
        return torch.ops.moe_export.mixed_width_grouped_mm(rows, offs, *_width_group_args(w))

    y_sorted = _routed_ffn(self, x, ids_sorted, grouped)  # [S, H]
    y_sorted = y_sorted * top_k_weights.reshape(-1, 1)[perm].to(y_sorted.dtype)
    y = torch.empty_like(y_sorted).index_copy_(0, perm, y_sorted)  # back to (token, k) order
    return y.view(t, k, -1).sum(1).to(hidden_states.dtype)  # [T, H]


def cuda_forward(self, hidden_states, top_k_index, top_k_weights):
    """The CUDA rows of the table (gather at decode, grouped at prefill); on CPU the ops run their reference."""
    if top_k_index.numel() <= CUDA_DECODE_MAX_PAIRS:
        return cuda_gather(self, hidden_states, top_k_index, top_k_weights)
    return cuda_grouped(self, hidden_states, top_k_index, top_k_weights)


EXPERT_FORMULATIONS = {
    "cuda_gather": cuda_gather,
    "cuda_grouped": cuda_grouped,
    "cpu_fused": fused_cpu_forward,
    "routed_gather": routed_gather,
    "routed_loop": routed_loop,
    "dense_groups": dense_groups,
}


def packed_linear(
    x: torch.Tensor,  # [..., K]
    packed: torch.Tensor,  # uint8 [N, K*b/8]
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    bits: int,
    k: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:  # [..., N]
    """``x @ W.T + bias`` for one packed 2-D weight (``PackedLinearWeight``'s linear)."""
    how = select_linear(x, bits, k)
    if how == "cpu_linear":
        out = _in_float32(torch.ops.moe_export.cpu_packed_linear, x, packed, scale, zero, bits, cpu_ops.ACCURACY)
    elif how == "matvec":
        rows = x.numel() // k
        out = packed_matvec(
            x.reshape(rows, k),  # [R, K]
            packed.unsqueeze(0).expand(rows, *packed.shape),
            scale.unsqueeze(0).expand(rows, *scale.shape),
            None if zero is None else zero.unsqueeze(0).expand(rows, *zero.shape),
            bits,
        ).reshape(*x.shape[:-1], packed.shape[0])
    else:
        return F.linear(x, dequantize_packed(packed, scale, zero, bits, k, x.dtype), bias)
    return out if bias is None else out + bias
