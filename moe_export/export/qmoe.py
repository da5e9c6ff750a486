"""One routed-expert layer as onnxruntime ``com.microsoft.QMoE`` nodes, one node per width group.

A QMoE node takes one expert width, so a layer whose experts have different widths becomes one node per width
group, all fed the layer's *global* routing: the graph computes softmax -> top-k -> renormalised weights as a dense
``[T, E]`` table, and each node gets its group's columns as ``router_weights`` (input 14) with
``normalize_routing_weights=0``. Each node then mixes exactly the weights of the experts the layer selected; a
node none of whose experts was selected for a token skips it (weights <= 1e-8 are not computed), so only the
routed experts run and nothing is ever dequantized whole. The outputs are summed. Semantics and the node recipe
were checked by running onnxruntime 1.32 (README of ``shared/probes/ort-qmoe``; numbers in ``docs/``).

Codes go in unchanged where the stored layout is QMoE's (2, 4, 8 bits: LSB-first along K, like MatMulNBits);
other widths go into the next container exactly (1 -> 2 bits, 3 -> 4, 5..7 -> 8) by moving codes so that the
container's implied zero point reproduces ours. Scales are our float16 values as float32 (exact). Asymmetric
grids need integer zero points (RTN and GPTQ at 2+ bits); fractional zeros (HQQ, 1-bit asymmetric) have no
QMoE form and are refused.

Arithmetic per width on the CPU EP (measured in the probe): 4-bit runs fp32 activations (exact to summation
order); 2-bit at block >= 32 runs a LUT kernel and 8-bit block-wise runs int8 activations, about 1e-2 off.
"""

from __future__ import annotations

import numpy as np
import torch

from moe_export.runtime.layout import pack, pack_codes, unpack

# QMoE widths on the CPU EP: where each of our widths goes
CONTAINER = {1: 2, 2: 2, 3: 4, 4: 4, 5: 8, 6: 8, 7: 8, 8: 8}
APPROXIMATE_CONTAINERS = (2, 8)  # int8-activation / LUT kernels: compare by SQNR, not max error


def _sym_zero(bits: int) -> float:
    return 0.5 if bits == 1 else float(2 ** (bits - 1))


def qmoe_weights(bits: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, k: int,
                 rows: torch.Tensor | None = None) -> dict[str, np.ndarray | int]:
    """One width group of one projection in QMoE form.

    ``packed`` ``[E_b, N, K*b/8]``, ``scale``/``zero`` ``[E_b, N, G]`` (our layout); ``rows``: a row permutation
    (the SwiGLU interleave of gate/up). Returns ``bits`` (container), ``w`` ``[E_b, N, K*c/8]`` uint8, ``s``
    ``[E_b, N, G]`` float32, ``zp`` packed ``[E_b, N, ceil(G*c/8)]`` uint8 or None.
    """
    c = CONTAINER[bits]
    q = unpack(packed, bits, k).to(torch.int32)  # [E_b, N, K]
    s = scale.float()
    zp = None
    if zero is None:
        # implied zero point of a c-bit container: 2^(c-1); ours is _sym_zero(bits): move the codes onto it
        if bits == 1:  # (q - 1/2) s == (2q + 1 - 2) (s / 2)
            q, s = 2 * q + 1, s / 2
        else:
            q = q + (2 ** (c - 1) - 2 ** (bits - 1))
    else:
        z = zero.float()
        if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 2**bits - 1:
            raise ValueError(f"{bits}-bit group has fractional or out-of-range zero points (HQQ, or a 1-bit asymmetric "
                             "grid, which binarises around the mean); QMoE takes integer zero codes only: use a "
                             "symmetric grid or rtn/gptq at 2+ bits, or export with the packed ONNX mode")
        zp = pack_codes(z.to(torch.uint8), c)  # [.., ceil(G*c/8)], packed along the block axis
    if rows is not None:
        q, s = q[:, rows], s[:, rows]
        zp = None if zp is None else zp[:, rows]
    w = pack(q.to(torch.uint8), c)
    return {"bits": c, "w": w.numpy(), "s": s.contiguous().numpy(), "zp": None if zp is None else zp.numpy()}


def swiglu_interleave(n_rows: int) -> torch.Tensor:
    """Row order [gate0, up0, gate1, up1, ...] of a fused [gate; up] weight (QMoE's swiglu_fusion=1)."""
    i = n_rows // 2
    return torch.stack([torch.arange(i), torch.arange(i) + i], dim=1).reshape(-1)


def moe_layer_nodes(prefix: str, hidden: str, out: str, gate_up, down, router_weight: torch.Tensor, top_k: int,
                    normalize_topk: bool = True, accuracy_level: int = 0) -> tuple[list, list]:
    """Nodes and initializers computing a routed-expert layer ``out [T, H] = MoE(hidden [T, H])``.

    ``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]`` are ``MixedWidthExpertsTensor`` stacks with the same
    width per expert (a plan gives an expert one width); ``router_weight`` ``[E, H]``.
    """
    from onnx import helper, numpy_helper

    if tuple(gate_up.bit_widths) != tuple(down.bit_widths):
        raise ValueError("QMoE runs one width per expert: gate_up and down must have the same per-expert widths")
    if gate_up.transposed or down.transposed:
        raise ValueError("QMoE export takes the stored [E, N, K] stacks, not transposed views")
    E = gate_up.num_experts
    inits = [numpy_helper.from_array(router_weight.detach().float().t().contiguous().numpy(), prefix + "router_wt")]
    nodes = [
        helper.make_node("MatMul", [hidden, prefix + "router_wt"], [prefix + "logits"]),  # [T, E]
        helper.make_node("Softmax", [prefix + "logits"], [prefix + "probs"], axis=-1),
        helper.make_node("TopK", [prefix + "probs", prefix + "k"], [prefix + "topv", prefix + "topi"], axis=-1),
    ]
    inits.append(numpy_helper.from_array(np.array([top_k], dtype=np.int64), prefix + "k"))
    topw = prefix + "topv"
    if normalize_topk:
        nodes.append(helper.make_node("ReduceSum", [prefix + "topv", prefix + "axes"], [prefix + "topsum"], keepdims=1))
        nodes.append(helper.make_node("Div", [prefix + "topv", prefix + "topsum"], [prefix + "topw"]))
        inits.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), prefix + "axes"))
        topw = prefix + "topw"
    nodes += [
        helper.make_node("Sub", [prefix + "probs", prefix + "probs"], [prefix + "zeros"]),
        helper.make_node("ScatterElements", [prefix + "zeros", prefix + "topi", topw], [prefix + "dense"], axis=-1),
    ]
    rows = swiglu_interleave(gate_up.out_features)
    outs = []
    for (b, p1, s1, z1), (b2, p2, s2, z2) in zip(gate_up.groups(), down.groups()):
        assert b == b2
        g = f"{prefix}w{b}_"
        experts = [e for e in range(E) if gate_up.bit_widths[e] == b]  # slot order = expert order within a width
        fc1 = qmoe_weights(b, p1, s1, z1, gate_up.in_features, rows)
        fc2 = qmoe_weights(b, p2, s2, z2, down.in_features)
        has_zp = fc1["zp"] is not None
        for name, arr in (("fc1_w", fc1["w"]), ("fc1_s", fc1["s"]), ("fc2_w", fc2["w"]), ("fc2_s", fc2["s"])):
            inits.append(numpy_helper.from_array(arr, g + name))
        if has_zp:
            inits += [numpy_helper.from_array(fc1["zp"], g + "fc1_zp"), numpy_helper.from_array(fc2["zp"], g + "fc2_zp")]
        inits.append(numpy_helper.from_array(np.array(experts, dtype=np.int64), g + "idx"))
        nodes += [helper.make_node("Gather", [prefix + "logits", g + "idx"], [g + "logits"], axis=1),
                  helper.make_node("Gather", [prefix + "dense", g + "idx"], [g + "weights"], axis=1)]
        ins = [hidden, g + "logits", g + "fc1_w", g + "fc1_s", "", g + "fc2_w", g + "fc2_s", "", "", "", "",
               g + "fc1_zp" if has_zp else "", g + "fc2_zp" if has_zp else "", "", g + "weights"]
        attrs = dict(k=min(top_k, len(experts)), activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0, normalize_routing_weights=0, use_sparse_mixer=0,
                     expert_weight_bits=fc1["bits"], accuracy_level=accuracy_level)
        if gate_up.group_size is not None:
            attrs["block_size"] = int(gate_up.group_size)
        nodes.append(helper.make_node("QMoE", ins, [g + "out"], domain="com.microsoft", name=g + "qmoe", **attrs))
        outs.append(g + "out")
    nodes.append(helper.make_node("Sum", outs, [out]) if len(outs) > 1 else helper.make_node("Identity", outs, [out]))
    return nodes, inits


def moe_layer_model(gate_up, down, router_weight: torch.Tensor, top_k: int, normalize_topk: bool = True,
                    accuracy_level: int = 0):
    """A standalone ONNX model of one routed-expert layer: input ``hidden [T, H]`` float32 -> ``out [T, H]``."""
    from onnx import TensorProto, helper

    H = gate_up.in_features
    nodes, inits = moe_layer_nodes("moe_", "hidden", "out", gate_up, down, router_weight, top_k, normalize_topk,
                                   accuracy_level)
    graph = helper.make_graph(nodes, "moe_export_qmoe_layer",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", H])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model
