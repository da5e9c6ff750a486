"""One routed-expert layer as onnxruntime ``com.microsoft.QMoE`` nodes, one node per width group.

A QMoE node takes one expert width, so a layer whose experts have different widths becomes one node per width
group, all fed the layer's *global* routing as a dense ``[T, E]`` table (the selected experts' weights, zero
elsewhere; in a decoder step the block's own router computes it, so softmax top-k, DeepSeek-V3's grouped sigmoid
routing and shared experts beside the routed ones are traced as the model runs them), and each node gets its
group's columns as ``router_weights`` (input 14) with ``normalize_routing_weights=0``. Each node then mixes exactly the weights of the experts the layer selected; a
node none of whose experts was selected for a token skips it (weights <= 1e-8 are not computed), so only the
routed experts run and nothing is ever dequantized whole. The outputs are summed. Semantics and the node recipe
were checked by running onnxruntime 1.32 (README of ``shared/probes/ort-qmoe``; numbers in ``docs/``).

Codes go in unchanged where the stored layout is QMoE's (2, 4, 8 bits: LSB-first along K, like MatMulNBits);
other widths go into the next container exactly (1 -> 2 bits, 3 -> 4, 5..7 -> 8) by moving codes so that the
container's implied zero point reproduces ours. 3-bit codes could stay 3-bit (QMoE's INT3 profile), but it takes
float16 activations only and measured 16-19 ms against 0.9 ms for the 4-bit container at accuracy level 4 on one
Mixtral-shaped layer (AMD EPYC Zen 4, 1 thread), at 65 dB instead of exact: 3-bit goes into 4-bit codes. Scales
are our float16 values (the CPU EP takes float16 scales with float32 activations; same outputs as float32 scales).
Asymmetric grids need integer zero points (RTN and GPTQ at 2+ bits); fractional zeros (HQQ, 1-bit asymmetric)
have no QMoE form and are refused.

Arithmetic per width on the CPU EP (measured in the probe): 4-bit at accuracy level 0 runs fp32 activations
(exact to summation order) and at level 4 int8 activations (~39 dB, 10-20x faster on AMD Zen 4); 2-bit at block
>= 32 runs a LUT kernel and 8-bit block-wise int8 activations at any level (about 1e-2 off, 36-39 dB).
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


def container_grid(bits: int, scale: torch.Tensor, zero: torch.Tensor | None):
    """``(c, s, z, mul, add)``: where a ``bits``-wide group goes in the ``c = CONTAINER[bits]``-bit container
    exactly, its codes becoming ``mul * q + add``.

    ``s`` the scales, float16 as stored where that is exact (always, except a 1-bit group whose halved scale would
    lose a bit), else float32; ``z`` None (symmetric: the container's implied zero point 2^(c-1) reproduces ours)
    or the integer zero codes ``[.., N, G]`` uint8, unpacked.
    """
    c = CONTAINER[bits]
    s, z, mul, add = scale, None, 1, 0
    if zero is None:
        # implied zero point of a c-bit container: 2^(c-1); ours is _sym_zero(bits): move the codes onto it
        if bits == 1:  # (q - 1/2) s == (2q + 1 - 2) (s / 2)
            mul, add, s = 2, 1, scale.float() / 2
            if torch.equal(s.half().float(), s):
                s = s.half()
        else:
            add = 2 ** (c - 1) - 2 ** (bits - 1)
    else:
        zf = zero.float()
        if not torch.equal(zf, zf.round()) or zf.min() < 0 or zf.max() > 2**bits - 1:
            raise ValueError(f"{bits}-bit group has fractional or out-of-range zero points (HQQ, or a 1-bit asymmetric "
                             "grid, which binarises around the mean); QMoE takes integer zero codes only: use a "
                             "symmetric grid or rtn/gptq at 2+ bits, or export with the packed ONNX mode")
        z = zf.to(torch.uint8)
    return c, s, z, mul, add


def container_codes(bits: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, k: int):
    """``(c, q, s, z)``: one width group's codes moved into the ``c = CONTAINER[bits]``-bit container exactly
    (:func:`container_grid`); ``q`` int32 ``[.., N, K]`` codes in [0, 2^c)."""
    c, s, z, mul, add = container_grid(bits, scale, zero)
    q = unpack(packed, bits, k).to(torch.int32)  # [.., N, K]
    return c, mul * q + add, s, z


def qmoe_weights(bits: int, packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, k: int,
                 rows: torch.Tensor | None = None) -> dict[str, np.ndarray | int]:
    """One width group of one projection in QMoE form.

    ``packed`` ``[E_b, N, K*b/8]``, ``scale``/``zero`` ``[E_b, N, G]`` (our layout); ``rows``: a row permutation
    (the SwiGLU interleave of gate/up). Returns ``bits`` (container), ``w`` ``[E_b, N, K*c/8]`` uint8, ``s``
    ``[E_b, N, G]`` float16 (our stored scales; the CPU EP takes them beside float32 activations, measured equal to
    float32 scales) or float32 (a 1-bit group whose halved scale float16 cannot hold), ``zp`` packed
    ``[E_b, N, ceil(G*c/8)]`` uint8 or None.
    """
    c, s, z, mul, add = container_grid(bits, scale, zero)
    zp = None if z is None else pack_codes(z, c)  # [.., ceil(G*c/8)], packed along the block axis
    if rows is not None:
        s = s[:, rows]
        zp = None if zp is None else zp[:, rows]
    if c == bits and (mul, add) == (1, 0):  # the stored bytes are the container's: rows move whole
        w = packed if rows is None else packed[:, rows]
    else:
        # one expert at a time: unpacking a whole group takes 8 bytes a weight at once (GBs at real sizes)
        e_b, n = packed.shape[:2]
        w = torch.empty(e_b, n, k * c // 8, dtype=torch.uint8)
        for e in range(e_b):
            q = unpack(packed[e], bits, k) * mul + add  # [N, K] uint8: codes < 2^c <= 256
            w[e] = pack(q if rows is None else q[rows], c)
    return {"bits": c, "w": w.contiguous().numpy(), "s": s.contiguous().numpy(),
            "zp": None if zp is None else zp.numpy()}


def container_groups(groups) -> "WidthGroups":
    """``groups`` (``runtime.layout.WidthGroups``) with every width moved into its container (``CONTAINER``):
    the same values at 2, 4 or 8 bits, where onnxruntime's GatherBlockQuantized and MatMulNBits have kernels."""
    from moe_export.runtime.layout import WidthGroups

    packed, scale, zero = {}, {}, {}
    for b, p, sc, ze in groups.groups():
        c, q, s, z = container_codes(b, p, sc, ze, groups.k)
        if c in packed:
            raise ValueError(f"widths {b} and another share the {c}-bit container; no layout holds them apart")
        packed[c], scale[c] = pack(q.to(torch.uint8), c), s
        zero[c] = None if z is None else z.to(sc.dtype)
    return WidthGroups(packed, scale, zero, [CONTAINER[b] for b in groups.bit_widths], groups.group_size)


def swiglu_interleave(n_rows: int) -> torch.Tensor:
    """Row order [gate0, up0, gate1, up1, ...] of a fused [gate; up] weight (QMoE's swiglu_fusion=1)."""
    i = n_rows // 2
    return torch.stack([torch.arange(i), torch.arange(i) + i], dim=1).reshape(-1)


def routing_nodes(prefix: str, hidden: str, router_weight: torch.Tensor, top_k: int,
                  normalize_topk: bool = True) -> tuple[list, list, str]:
    """Softmax -> top-k (-> renormalise) routing of ``hidden [T, H]`` as a dense ``[T, E]`` weight table (zero for
    unrouted experts): the router of a standalone layer (:func:`moe_layer_model`). Returns nodes, initializers and
    the table's name. A decoder step traces its blocks' own routers instead (:class:`QMoEExperts`)."""
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(router_weight.detach().float().t().contiguous().numpy(), prefix + "router_wt"),
             numpy_helper.from_array(np.array([top_k], dtype=np.int64), prefix + "k")]
    nodes = [
        helper.make_node("MatMul", [hidden, prefix + "router_wt"], [prefix + "logits"]),  # [T, E]
        helper.make_node("Softmax", [prefix + "logits"], [prefix + "probs"], axis=-1),
        helper.make_node("TopK", [prefix + "probs", prefix + "k"], [prefix + "topv", prefix + "topi"], axis=-1),
    ]
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
    return nodes, inits, prefix + "dense"


def expert_nodes(prefix: str, hidden: str, dense: str, out: str, gate_up, down, top_k: int,
                 accuracy_level: int = 0) -> tuple[list, list]:
    """Nodes and initializers computing the routed experts ``out [T, H]`` of ``hidden [T, H]`` mixed by the dense
    routing table ``dense [T, E]`` (the selected experts' weights, zero elsewhere), one QMoE node per width group.

    ``gate_up`` ``[E, 2I, H]`` and ``down`` ``[E, H, I]`` are the stacks' layouts (``runtime.layout.WidthGroups``,
    what ``width_groups()`` of a subclass or an export module returns) with the same width per expert (a plan gives
    an expert one width). A group's columns of ``dense`` are both its node's ``router_probs`` (the node's top-k
    picks every selected expert of the group, at most ``top_k`` of them, before any zero column) and its
    ``router_weights``, used as they are (``normalize_routing_weights=0``); zero-weight picks are skipped.
    """
    from onnx import helper, numpy_helper

    if tuple(gate_up.bit_widths) != tuple(down.bit_widths):
        raise ValueError("QMoE runs one width per expert: gate_up and down must have the same per-expert widths "
                         "(a budget plan may give them different ones); use --onnx-mode packed or fast")
    if gate_up.group_size != down.group_size:  # one block_size attribute for both projections
        raise ValueError(f"QMoE takes one block size per node: gate_up has group size {gate_up.group_size} and down "
                         f"{down.group_size}; use --onnx-mode packed or fast")
    E = gate_up.num_experts
    nodes, inits = [], []
    rows = swiglu_interleave(gate_up.n)
    outs = []
    for (b, p1, s1, z1), (b2, p2, s2, z2) in zip(gate_up.groups(), down.groups()):
        assert b == b2
        g = f"{prefix}w{b}_"
        experts = [e for e in range(E) if gate_up.bit_widths[e] == b]  # slot order = expert order within a width
        fc1 = qmoe_weights(b, p1, s1, z1, gate_up.k, rows)
        fc2 = qmoe_weights(b, p2, s2, z2, down.k)
        has_zp = fc1["zp"] is not None
        for name, arr in (("fc1_w", fc1["w"]), ("fc1_s", fc1["s"]), ("fc2_w", fc2["w"]), ("fc2_s", fc2["s"])):
            inits.append(numpy_helper.from_array(arr, g + name))
        if has_zp:
            inits += [numpy_helper.from_array(fc1["zp"], g + "fc1_zp"), numpy_helper.from_array(fc2["zp"], g + "fc2_zp")]
        inits.append(numpy_helper.from_array(np.array(experts, dtype=np.int64), g + "idx"))
        nodes.append(helper.make_node("Gather", [dense, g + "idx"], [g + "weights"], axis=1))  # [T, E_b]
        ins = [hidden, g + "weights", g + "fc1_w", g + "fc1_s", "", g + "fc2_w", g + "fc2_s", "", "", "", "",
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

    H = gate_up.k
    nodes, inits, dense = routing_nodes("moe_", "hidden", router_weight, top_k, normalize_topk)
    expert_n, expert_i = expert_nodes("moe_", "hidden", dense, "out", gate_up, down, top_k, accuracy_level)
    nodes, inits = nodes + expert_n, inits + expert_i
    graph = helper.make_graph(nodes, "moe_export_qmoe_layer",
                              [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, ["T", H])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["T", H])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    return model


# --- the decoder step: each block's experts become a placeholder op, spliced into QMoE nodes after export ------

DOMAIN = "com.moe_export"  # the placeholder's domain; no node of it is left in a written model
_OP_DEFINED = False


def define_block_op() -> None:
    """``moe_export::qmoe_block(hidden [T, H], routing [T, E], layer) -> [T, H]``: stands for one block's routed
    experts while torch.onnx traces the step (explicit and idempotent, like ``export.ops.define_ops``). It has only
    a shape; running it is an error."""
    global _OP_DEFINED
    if _OP_DEFINED:
        return

    @torch.library.custom_op("moe_export::qmoe_block", mutates_args=())
    def qmoe_block(hidden: torch.Tensor, routing: torch.Tensor, layer: int) -> torch.Tensor:
        raise RuntimeError("moe_export::qmoe_block only marks an MoE block for the QMoE ONNX export; it does not run")

    @qmoe_block.register_fake
    def _(hidden, routing, layer):
        return torch.empty_like(hidden)

    _OP_DEFINED = True


class QMoEExperts(torch.nn.Module):
    """In place of a block's experts module while the step is traced for ``mode="native"``: the block itself (its
    router, its shared experts and their sigmoid gate, residual sums) is traced as the model computes it, and only
    the routed experts become QMoE nodes, fed the block's own routing as a dense ``[T, E]`` table."""

    def __init__(self, layer: int, num_experts: int):
        super().__init__()
        self.layer, self.num_experts = layer, num_experts

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, k], [T, k] -> [T, H]
        t = hidden_states.shape[0]
        zeros = hidden_states.new_zeros(t, self.num_experts, dtype=torch.float32)  # [T, E]
        dense = zeros.scatter(1, top_k_index.long(), top_k_weights.float())  # [T, E]
        out = torch.ops.moe_export.qmoe_block(hidden_states.float(), dense, self.layer)
        return out.to(hidden_states.dtype)


def to_qmoe_blocks(step: torch.nn.Module) -> tuple[torch.nn.Module, dict[int, dict]]:
    """A copy of a prepared decoder step whose blocks' experts are placeholders, and what each one's nodes are
    built from."""
    import copy

    from transformers.activations import SiLUActivation

    from moe_export.export.experts import PackedMixedExperts, moe_blocks

    define_block_op()
    step = copy.deepcopy(step)
    layers = {}
    for i, (name, block) in enumerate(moe_blocks(step)):
        ex = block.experts
        if not isinstance(ex, PackedMixedExperts):
            raise ValueError(f"{name}: QMoE export takes a model prepared with prepare_for_export (packed experts)")
        if not isinstance(ex.act_fn, (SiLUActivation, torch.nn.SiLU)):
            raise ValueError(f"{name}: QMoE computes SwiGLU experts (SiLU); this block's activation is "
                             f"{type(ex.act_fn).__name__}: use --onnx-mode packed or fast")
        router = block.gate.weight
        if type(router) is not torch.nn.Parameter and type(router) is not torch.Tensor:
            # a quantized router: its float values, as the eager model computes with
            block.gate.weight = torch.nn.Parameter(router.dequantize().detach().float(), requires_grad=False)
        top_k = getattr(block, "top_k", None) or block.gate.top_k
        layers[i] = {"gate_up": ex.gate_up_proj.width_groups(), "down": ex.down_proj.width_groups(),
                     "top_k": int(top_k)}
        block.experts = QMoEExperts(i, ex.num_experts)
    if not layers:
        raise ValueError("the model has no MoE block with a router and fused experts to export as QMoE")
    return step, layers


def translation_table() -> dict:
    from onnxscript.values import Opset

    placeholder = Opset(DOMAIN, 1)

    def qmoe_block(hidden, routing, layer: int):
        return placeholder.QMoEBlock(hidden, routing, layer=layer)

    define_block_op()
    return {torch.ops.moe_export.qmoe_block.default: qmoe_block}


def register_schema() -> None:
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("QMoEBlock", 1, DOMAIN)
    except onnx.defs.SchemaError:
        onnx.defs.register_schema(OpSchema(
            "QMoEBlock", DOMAIN, 1,
            inputs=[OpSchema.FormalParameter("hidden", "T"), OpSchema.FormalParameter("routing", "T")], outputs=[OpSchema.FormalParameter("out", "T")],
            type_constraints=[("T", ["tensor(float)"], "activations")],
            attributes=[OpSchema.Attribute("layer", OpSchema.AttrType.INT, "MoE block index")]))


def splice(proto, layers: dict[int, dict], accuracy_level: int = 0) -> None:
    """Replace every placeholder node of ``proto`` by its layer's QMoE nodes and initializers (in place)."""
    from onnx import helper

    graph = proto.graph
    new_nodes, seen = [], set()
    for node in graph.node:
        if node.domain == DOMAIN and node.op_type == "QMoEBlock":
            layer = next(a.i for a in node.attribute if a.name == "layer")
            spec = layers[layer]
            nodes, inits = expert_nodes(f"moe{layer}_", node.input[0], node.input[1], node.output[0],
                                        spec["gate_up"], spec["down"], spec["top_k"], accuracy_level)
            new_nodes += nodes
            graph.initializer.extend(inits)
            seen.add(layer)
        else:
            new_nodes.append(node)
    if seen != set(layers):
        raise ValueError(f"QMoE export: the traced graph holds MoE blocks {sorted(seen)}, expected {sorted(layers)}")
    del graph.node[:]
    graph.node.extend(new_nodes)
    opsets = [o for o in proto.opset_import if o.domain != DOMAIN]
    if not any(o.domain == "com.microsoft" for o in opsets):
        opsets.append(helper.make_opsetid("com.microsoft", 1))
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
