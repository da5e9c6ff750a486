"""ONNX export of a packed mixed-width MoE decoder step, for onnxruntime on CPU.

Per width group the routed experts are gathered from a packed uint8 table:

* 2/4/8-bit groups with integer zero points and a power-of-two group size >= 16:
  ``com.microsoft::GatherBlockQuantized`` (packed uint8 data, packed uint8 zero codes, float16 scales cast to
  float32 so the dequantized rows equal the float32 reference bit for bit);
* any other group (3-bit: ONNX has no INT3 type and no ORT kernel reads 3-bit codes; fractional HQQ zeros):
  ``Gather`` of the packed bytes and an in-graph unpack with integer ``Div``/``Mod``, still 3 bits a weight.

``mode="fast"`` (speed over size) replaces that by dense routing over experts, each projection one
``com.microsoft::MatMulNBits`` (:mod:`moe_export.export.fast`; int3 in 4-bit containers, recorded in the model's
``moe_export.*`` metadata).

IR version and opsets are pinned to what onnxruntime 1.3x loads (IR <= 13; ai.onnx 21).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import torch

from moe_export.io import atomic_path
from moe_export.quiet import exporting

OPSET = 21
IR_VERSION = 10
_SCHEMAS_REGISTERED = False


def _register_ort_schemas() -> None:
    # onnx has no schemas for onnxruntime's contrib ops; the exporter's onnxscript layer needs one to emit a node.
    global _SCHEMAS_REGISTERED
    if _SCHEMAS_REGISTERED:
        return
    import onnx
    from onnx.defs import OpSchema

    try:
        onnx.defs.get_schema("GatherBlockQuantized", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        t1 = ("T1", ["tensor(uint8)"], "packed data and zero codes")
        t2 = ("T2", ["tensor(float)", "tensor(float16)"], "scales and output")
        tind = ("Tind", ["tensor(int32)", "tensor(int64)"], "indices")
        schema = OpSchema(
            "GatherBlockQuantized", "com.microsoft", 1,
            inputs=[
                OpSchema.FormalParameter("data", "T1"),
                OpSchema.FormalParameter("indices", "Tind"),
                OpSchema.FormalParameter("scales", "T2"),
                OpSchema.FormalParameter("zero_points", "T1", param_option=OpSchema.FormalParameterOption.Optional),
            ],
            outputs=[OpSchema.FormalParameter("output", "T2")],
            type_constraints=[t1, t2, tind],
            attributes=[
                OpSchema.Attribute("bits", OpSchema.AttrType.INT, "bits"),
                OpSchema.Attribute("block_size", OpSchema.AttrType.INT, "block size"),
                OpSchema.Attribute("gather_axis", OpSchema.AttrType.INT, "gather axis"),
                OpSchema.Attribute("quantize_axis", OpSchema.AttrType.INT, "quantize axis"),
            ],
        )
        onnx.defs.register_schema(schema)
    try:
        onnx.defs.get_schema("MatMulNBits", 1, "com.microsoft")
    except onnx.defs.SchemaError:
        schema = OpSchema(
            "MatMulNBits", "com.microsoft", 1,
            inputs=[
                OpSchema.FormalParameter("A", "T1"),
                OpSchema.FormalParameter("B", "T2"),
                OpSchema.FormalParameter("scales", "T1"),
                OpSchema.FormalParameter("zero_points", "T3", param_option=OpSchema.FormalParameterOption.Optional),
            ],
            outputs=[OpSchema.FormalParameter("Y", "T1")],
            type_constraints=[("T1", ["tensor(float)", "tensor(float16)"], "activations and scales"),
                              ("T2", ["tensor(uint8)"], "packed weights"),
                              ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)"], "zero points")],
            attributes=[OpSchema.Attribute(a, OpSchema.AttrType.INT, a)
                        for a in ("K", "N", "bits", "block_size", "accuracy_level")],
        )
        onnx.defs.register_schema(schema)
    _SCHEMAS_REGISTERED = True


def _translation_table():
    from onnxscript import opset21 as op
    from onnxscript.values import Opset

    msft = Opset("com.microsoft", 1)

    def gather_dequant_codes(packed, scale, zero_codes, index, lut, bits: int, k: int):
        n_groups = scale.shape[-1] if scale.shape is not None else None
        block = k // int(n_groups)
        inputs = [packed, index, op.Cast(scale, to=1)]  # float32 scales: output = float32 reference exactly
        if zero_codes is not None:
            inputs.append(zero_codes)
        return msft.GatherBlockQuantized(*inputs, bits=bits, block_size=block, gather_axis=0, quantize_axis=2)

    def matmul_nbits(x, packed, scale, zero, lut, bits: int, k: int, accuracy_level: int):
        n, n_groups, _ = packed.shape
        inputs = [x, packed, op.Reshape(op.Cast(scale, to=1), op.Constant(value_ints=[-1]))]
        if zero is not None:
            if zero.dtype is not None and "UINT8" not in str(zero.dtype).upper():
                zero = op.Cast(zero, to=1)  # float zero points (HQQ) take the scales' type
            inputs.append(op.Reshape(zero, op.Constant(value_ints=[-1])))
        return msft.MatMulNBits(*inputs, K=k, N=int(n), bits=bits, block_size=k // int(n_groups),
                                accuracy_level=accuracy_level)

    from moe_export.export.ops import define_ops

    define_ops()  # the ops the translation table is keyed by

    return {torch.ops.moe_export.gather_dequant_codes.default: gather_dequant_codes,
            torch.ops.moe_export.matmul_nbits.default: matmul_nbits}


def _coded_copy(step: torch.nn.Module) -> tuple[torch.nn.Module, dict[str, list[int]]]:
    from moe_export.export.experts import MixedWidthWeight

    step = copy.deepcopy(step)
    coded = {}
    for name, mod in step.named_modules():
        if isinstance(mod, MixedWidthWeight):
            coded[name] = mod.use_zero_codes()
    return step, coded


ONNX_MODES = ("native", "packed", "fast")
# --onnx-accuracy: accuracy_level of QMoE and MatMulNBits. "fast" (4, int8 activations) is the default: on AMD EPYC
# Zen 4 the exact 4-bit path (0) measured 10-18 ms against 0.9 ms a Mixtral-shaped layer (docs/benchmarks.md)
ACCURACY_LEVELS = {"exact": 0, "fast": 4}


def export_onnx(model: torch.nn.Module, path: str | os.PathLike, max_seq_len: int = 128, quantized_ops: bool = True,
                mode: str = "packed", accuracy_level: int = 4) -> Path:
    """Write ``model`` as one decoder-step ``.onnx`` (single file, weights inside); returns the path.

    ``mode="packed"``: routed experts gathered from packed tables (smallest file); ``quantized_ops=False`` keeps
    the in-graph unpack for every width (no contrib ops: any ONNX runtime).
    ``mode="native"``: onnxruntime's own quantized ops: every MoE block is one ``com.microsoft::QMoE`` node per
    width group (:mod:`moe_export.export.qmoe`; only the routed experts run, straight from their packed codes),
    packed non-expert linears ``com.microsoft::MatMulNBits``, a packed embedding table
    ``com.microsoft::GatherBlockQuantized``; widths the ops lack go into the next container (1 -> 2, 3 -> 4,
    5..7 -> 8 bits; metadata ``moe_export.note``); ``accuracy_level`` (``ACCURACY_LEVELS``) is the ops' attribute.
    ``mode="fast"``: every expert projection is a ``com.microsoft::MatMulNBits`` with dense routing
    (:mod:`moe_export.export.fast`); int3 experts stored in 4-bit containers. ``accuracy_level`` is
    MatMulNBits' attribute: 4 = int8 activation compute (fast, ~40 dB vs eager), 0 = float compute (exact).
    An encoder-decoder (SwitchTransformers) is written as two models, the decoder step at ``path`` and its encoder
    beside it (``export.seq2seq.encoder_path``), in ``mode="packed"`` only.
    """
    from moe_export.export.seq2seq import Seq2SeqStep, is_seq2seq
    from moe_export.export.wrapper import DecoderStep

    if mode not in ONNX_MODES:
        raise ValueError(f"unknown onnx mode {mode!r}; choose one of {', '.join(ONNX_MODES)}")
    if isinstance(model, Seq2SeqStep) or is_seq2seq(model):
        step = model if isinstance(model, Seq2SeqStep) else Seq2SeqStep(model, max_seq_len)
        return _export_seq2seq(step, path, mode, quantized_ops)
    step = model if isinstance(model, DecoderStep) else DecoderStep(model, max_seq_len)
    table = None
    meta = {"moe_export.onnx_mode": mode}
    if mode == "fast":
        from moe_export.export.fast import NBitsLinear, to_nbits_experts

        _register_ort_schemas()
        step = to_nbits_experts(step, accuracy_level)
        table = _translation_table()
        containers = {str(m.stored_bits): m.bits for m in step.modules() if isinstance(m, NBitsLinear)}
        n_float = sum(isinstance(m, torch.nn.Linear) for ex in step.modules() if type(ex).__name__ == "DenseExperts"
                      for m in ex.modules())
        if n_float:  # 8-bit experts with fractional (HQQ) zeros: MatMulNBits has no such kernel
            meta["moe_export.float_expert_projections"] = str(n_float)
        meta["moe_export.accuracy_level"] = str(accuracy_level)
        meta["moe_export.containers"] = json.dumps(dict(sorted(containers.items())))
        widened = {b: c for b, c in containers.items() if int(b) != c}
        if widened:  # MatMulNBits has no 1/3-bit kernel: those experts hold the same codes in wider containers
            meta["moe_export.note"] = "; ".join(f"int{b} experts stored as {c}-bit MatMulNBits codes (same values, "
                                                f"{c} bits a weight)" for b, c in widened.items())
    elif mode == "native":
        step, qmoe_layers, table, native_meta = _native_step(step, accuracy_level)
        meta.update(native_meta)
    elif quantized_ops:
        _register_ort_schemas()
        step, _ = _coded_copy(step)
        table = _translation_table()
    proto = _trace(step, STEP_INPUTS, STEP_OUTPUTS, table)
    if mode == "native":
        from moe_export.export import qmoe

        qmoe.splice(proto, qmoe_layers, accuracy_level)
        _divide_by_root(proto.graph)
    return _save(proto, path, meta)


STEP_INPUTS = ["tokens", "input_pos", "k_cache", "v_cache"]
STEP_OUTPUTS = ["logits", "k_cache_out", "v_cache_out"]


def _trace(step: torch.nn.Module, input_names: list[str], output_names: list[str], table):
    """``step`` (with ``example_inputs()`` and ``dynamic_shapes()``) as an ONNX ModelProto."""
    with torch.no_grad(), exporting():
        prog = torch.onnx.export(
            step, step.example_inputs(), dynamo=True, opset_version=OPSET, input_names=input_names,
            output_names=output_names, dynamic_shapes=step.dynamic_shapes(), custom_translation_table=table,
            external_data=False, optimize=True, verbose=False,
        )
    return prog.model_proto


def _save(proto, path: str | os.PathLike, meta: dict[str, str]) -> Path:
    """Strip debug info, pin the IR version, add the ``moe_export.*`` metadata, check and write ``proto``."""
    import onnx

    _strip_debug_info(proto.graph)
    proto.ir_version = min(proto.ir_version, IR_VERSION)
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        onnx.save_model(proto, str(tmp))
    return path


def _export_seq2seq(step, path: str | os.PathLike, mode: str, quantized_ops: bool) -> Path:
    """An encoder-decoder (``export.seq2seq.Seq2SeqStep``) as two models, as onnxruntime's seq2seq exports are: the
    decoder step at ``path`` (cross-attention keys/values as two more inputs) and its encoder beside it
    (``seq2seq.encoder_path``). Packed mode only: the native and fast forms are built for the fused gated expert
    blocks of decoder-only models (QMoE SwiGLU nodes, MatMulNBits per fused projection); a top-1 block of
    ungated experts (SwitchTransformers) has no such node recipe yet."""
    from moe_export.export.seq2seq import encoder_path

    if mode != "packed":
        raise ValueError(f"{mode!r} .onnx has no form for encoder-decoder models (SwitchTransformers' top-1 ungated "
                         "experts) yet; export them with --onnx-mode packed (every expert at its own width, exact)")
    table = None
    if quantized_ops:
        _register_ort_schemas()
        table = _translation_table()
    encoder, step = step.encoder_program, _coded_copy(step)[0]  # the copy shares no buffer with the encoder's
    encoder = _coded_copy(encoder)[0]
    # tokens per call: within the router's expert capacity (export.seq2seq); onnxruntime does not bound dynamic dims
    meta = {"moe_export.onnx_mode": mode, "moe_export.encoder": encoder_path(path).name,
            "moe_export.max_tokens": str(step.max_tokens)}
    _save(_trace(encoder, ["source"], ["cross_k", "cross_v"], table), encoder_path(path),
          {"moe_export.onnx_mode": mode, "moe_export.decoder": Path(path).name})
    return _save(_trace(step, STEP_INPUTS + ["cross_k", "cross_v"], STEP_OUTPUTS, table), path, meta)


def _native_step(step: torch.nn.Module, accuracy_level: int):
    """The step of ``mode="native"``: MoE blocks as QMoE placeholders, packed linears as MatMulNBits, packed
    embeddings in GatherBlockQuantized containers, attention without repeat_kv's copies of the cache
    (``wrapper.grouped_eager_attention``: the same values); the translation table and the metadata saying what went
    where."""
    from moe_export.export import qmoe
    from moe_export.export.fast import nbits_linear, replace_packed_linears
    from moe_export.export.prepare import PackedEmbedding
    from moe_export.export.wrapper import use_grouped_attention

    _register_ort_schemas()
    qmoe.register_schema()
    step, layers = qmoe.to_qmoe_blocks(step)  # a copy
    # repeat_kv copies each layer's cache n_rep times per decode step (Expand): 5% of a Mixtral-slice decode step
    # at 1 thread (interleaved A/B, same outputs bit for bit)
    use_grouped_attention(step)
    step.scatter_cache = True
    linears = replace_packed_linears(step, lambda p, s, z, b, k: nbits_linear(p, s, z, b, k, accuracy_level))
    tables = {}
    for name, mod in step.named_modules():
        if isinstance(mod, PackedEmbedding):
            groups = mod.weight_q.width_groups()
            (b,) = groups.widths
            mod.weight_q = type(mod.weight_q)(qmoe.container_groups(groups))
            coded = mod.weight_q.use_zero_codes()  # GatherBlockQuantized where the group size allows it
            tables[b] = "GatherBlockQuantized" if coded else "in-graph unpack"
    table = {**_translation_table(), **qmoe.translation_table()}
    experts = sorted({b for spec in layers.values() for b in spec["gate_up"].widths})
    meta = {"moe_export.accuracy_level": str(accuracy_level),
            "moe_export.containers": json.dumps({str(b): qmoe.CONTAINER[b] for b in experts}),
            "moe_export.linear_containers": json.dumps({str(b): qmoe.CONTAINER[b] for b in sorted(linears)}),
            "moe_export.embedding_containers": json.dumps({str(b): qmoe.CONTAINER[b] for b in sorted(tables)})}
    mapped = [f"int{b} experts as {qmoe.CONTAINER[b]}-bit QMoE codes" for b in experts if qmoe.CONTAINER[b] != b]
    mapped += [f"int{b} linears as {qmoe.CONTAINER[b]}-bit MatMulNBits codes" for b in sorted(linears)
               if qmoe.CONTAINER[b] != b]
    mapped += [f"int{b} embedding as {qmoe.CONTAINER[b]}-bit codes ({how})" for b, how in tables.items()
               if qmoe.CONTAINER[b] != b or how != "GatherBlockQuantized"]
    if mapped:  # the same values in wider codes: more bytes than the theoretical size
        meta["moe_export.note"] = "; ".join(mapped)
    return step, layers, table, meta


def _divide_by_root(graph) -> int:
    """``Mul(x, Reciprocal(Sqrt(v)))`` -> ``Div(x, Sqrt(v))`` in ``graph`` (in place; returns how many). torch's
    ``rsqrt`` traces to the former; onnxruntime fuses an RMS norm written with the latter, ``x / sqrt(mean(x^2) +
    eps) * w``, into one SimplifiedLayerNormalization kernel (seven nodes a norm before: 54 of a Mixtral-slice decode
    step's 329). The same value up to the last bit of the division."""
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    producer = {o: node for node in graph.node for o in node.output}
    dropped, count = set(), 0
    for node in graph.node:
        if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
            continue
        for i in (1, 0):
            recip = producer.get(node.input[i])
            if recip is None or recip.op_type != "Reciprocal" or recip.domain not in ("", "ai.onnx"):
                continue
            root = producer.get(recip.input[0])
            if root is None or root.op_type != "Sqrt" or consumers[recip.output[0]] != 1 or recip.output[0] in outputs:
                continue
            x = node.input[1 - i]
            node.op_type = "Div"
            del node.input[:]
            node.input.extend([x, root.output[0]])
            dropped.add(id(recip))
            count += 1
            break
    kept = [node for node in graph.node if id(node) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return count


def _strip_debug_info(graph) -> None:
    # The exporter records a Python stack and module path on every node: more bytes than a tiny model's weights.
    for node in graph.node:
        del node.metadata_props[:]
        node.doc_string = ""
        for attr in node.attribute:
            if attr.g is not None and attr.g.node:
                _strip_debug_info(attr.g)


def onnx_ops(path_or_proto) -> dict[str, int]:
    """Operator inventory: ``{"MatMul": 12, "com.microsoft::GatherBlockQuantized": 8, ...}``."""
    import onnx

    proto = onnx.load(str(path_or_proto)) if isinstance(path_or_proto, (str, os.PathLike)) else path_or_proto
    counts: dict[str, int] = {}

    def walk(graph):
        for node in graph.node:
            name = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
            counts[name] = counts.get(name, 0) + 1
            for attr in node.attribute:
                if attr.g is not None and attr.g.node:
                    walk(attr.g)

    walk(proto.graph)
    for fn in proto.functions:  # local functions (if the exporter kept any) count as their bodies
        for node in fn.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def onnx_metadata(path_or_proto) -> dict[str, str]:
    """The ``moe_export.*`` metadata of an exported model (mode, accuracy level, container widths)."""
    import onnx

    proto = onnx.load(str(path_or_proto)) if isinstance(path_or_proto, (str, os.PathLike)) else path_or_proto
    return {p.key: p.value for p in proto.metadata_props if p.key.startswith("moe_export.")}


def onnx_initializer_types(path_or_proto) -> dict[str, int]:
    """Bytes of initializers per element type, e.g. ``{"UINT8": 123456, "FLOAT16": 4096, "FLOAT": 99999}``."""
    import onnx

    proto = onnx.load(str(path_or_proto)) if isinstance(path_or_proto, (str, os.PathLike)) else path_or_proto
    out: dict[str, int] = {}
    for init in proto.graph.initializer:
        name = onnx.TensorProto.DataType.Name(init.data_type)
        out[name] = out.get(name, 0) + len(init.raw_data)
    return out
