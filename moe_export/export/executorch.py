"""ExecuTorch (.pte) export of a packed mixed-width MoE decoder step.

Modes (``PTE_MODES``):

* ``native`` (the default): every packed weight runs in a ``moe_export`` ExecuTorch kernel straight from its
  codes (:mod:`moe_export.export.native`): one ``mixed_width_moe`` per MoE block (routed experts only, each at its
  own width), ``packed_linear`` for quantized linears, ``packed_embedding`` for a quantized table; the float parts
  on XNNPACK. The program needs the kernel library at run time (``moe_export.kernels.et_native.load``; the
  runners load it). Smallest file and the fastest .pte. Its kernels run the inference default arithmetic of the
  compiled path (``kernels.cpu_ops.accuracy()``: int8 activations unless ``MOE_EXPORT_ACCURACY=exact`` or
  ``cpu_ops.set_accuracy`` say otherwise), baked into the program when it is exported (:func:`native_accuracy`).
* ``native-exact`` / ``native-int8``: the same program with the arithmetic pinned: fp32 activations (the
  dequantize formula, float rounding from eager), or activations quantized to int8 per group block with integer
  dot products (the kernel core's Int8 accuracy; parity is an SQNR floor, not float rounding).
* ``packed``: portable kernels only. Every expert keeps its own width in the file (packed bytes plus the
  in-graph unpack of :mod:`moe_export.export.experts`); smallest file, portable-kernel speed.
* ``xnnpack``: same packed experts, and the XNNPACK delegate takes the float parts (attention, router,
  lm_head, the float matmuls after the unpack). XNNPACK never sees a quantized weight: it has no kernel for
  2/3-bit or asymmetric weights and lowers torchao weight-only tensors to wrong answers (export-notes.md).
* ``xnnpack-int``: speed over size. Experts whose codes fit symmetric int4 exactly (1-3 bit experts with
  integer zeros; 4-bit ones that happen to) run on XNNPACK's int8-dynamic-activation int4 group-wise kernel
  (torchao ``IntxUnpackedToInt8Tensor`` with codes = ``q - zero`` bit for bit, :mod:`moe_export.export.fast`),
  dense routing; the other experts (8-bit, wide 4-bit codes) run as float linears on XNNPACK (exact, 4 bytes
  a weight). int1-3 weights are stored one int8 byte
  each inside the delegate blob, so the file is larger than the packed one; activations are int8 (~40 dB).
* ``float``: the float model, for size/latency baselines (use with an unquantized model).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from moe_export.io import atomic_path
from moe_export.quiet import exporting

PTE_MODES = ("native", "native-exact", "native-int8", "packed", "xnnpack", "xnnpack-int")
NATIVE_MODES = ("native", "native-exact", "native-int8")


def native_accuracy(mode: str) -> str | None:
    """The arithmetic (``"exact"`` or ``"int8"``) the kernels of a native ``mode`` are exported with; None for the
    other modes. ``native`` follows the inference default of the compiled path as it is now."""
    if mode not in NATIVE_MODES:
        return None
    if mode == "native":
        from moe_export.kernels import cpu_ops

        return cpu_ops.accuracy()
    return mode.removeprefix("native-")


def export_program(step: torch.nn.Module, max_tokens: int | None = None) -> torch.export.ExportedProgram:
    with torch.no_grad():
        return torch.export.export(step, step.example_inputs(), dynamic_shapes=step.dynamic_shapes(max_tokens), strict=False)


def lower_to_executorch(ep, mode: str = "packed", constant_methods: dict | None = None):
    """ExportedProgram (or ``{method name: ExportedProgram}``) -> ExecutorchProgramManager (``.buffer`` is the .pte
    bytes). ``constant_methods``: ``{name: value}`` methods of the program that return a constant."""
    from executorch.exir import EdgeCompileConfig, ExecutorchBackendConfig, to_edge_transform_and_lower

    if mode not in PTE_MODES:
        raise ValueError(f"unknown pte mode {mode!r}; choose one of {', '.join(PTE_MODES)}")
    partitioner = []
    if mode in NATIVE_MODES or mode in ("xnnpack", "xnnpack-int"):
        from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner

        partitioner = [XnnpackPartitioner()]
    passes = [_xnnpack_friendly_pass()] if mode in NATIVE_MODES else None
    # gather_dequant has only a CompositeImplicitAutograd kernel: to_edge decomposes it into aten ops.
    edge = to_edge_transform_and_lower(ep, transform_passes=passes, partitioner=partitioner,
                                       compile_config=EdgeCompileConfig(_check_ir_validity=False),
                                       constant_methods=constant_methods)
    if mode in NATIVE_MODES:
        # the native step writes its KV cache buffers with index_put_, which export functionalizes: the reinplace
        # pass writes the rows into the buffer again, where a functional index_put would copy the whole cache twice
        return edge.to_executorch(ExecutorchBackendConfig(run_reinplace_pass=True))
    return edge.to_executorch()


def _xnnpack_friendly_pass():
    """An edge pass that lets XNNPACK take more of the float graph in fewer, larger delegates: every delegate
    boundary costs the program a serialized XNNPACK graph and the tensors between them (on a tiny model the
    graph is a few percent of the file), and a step between delegates on portable kernels. Every rewrite moves the
    same values (no arithmetic changes), except the mean:

    * expands to the shape they already have (matmul's batch broadcast) are dropped;
    * reshapes to sizes that name the token count symbolically, and float unsqueezes (XNNPACK reshapes only to
      static sizes with one inferred dim, and unsqueezes only the last dim), become views to static sizes;
    * a broadcasting expand of one dim (GQA's repeat_kv, the cache write's batch broadcast), which XNNPACK has no
      op for, becomes a concatenation of copies, and a concatenation that repeats an input (the rotary table) takes
      copies: XNNPACK's partitioner counts distinct inputs and takes no concatenation of one;
    * a mean over the last dim of a 3-D tensor (RMSNorm), which XNNPACK takes only as a 4-D mean over dims 2-3,
      becomes one through views (float rounding of the sum differs, nothing else)."""
    from executorch.exir.dialects._ops import ops as exir_ops
    from executorch.exir.pass_base import ExportPass

    aten = exir_ops.edge.aten
    max_cat = 5  # inputs of one XNNPACK concatenation node

    def fixed(shape):  # a view's target: static dims, at most one dynamic dim as -1, else None
        dims = [d if isinstance(d, int) else -1 for d in shape]
        return dims if dims.count(-1) <= 1 else None

    def repeated_dim(src, out):  # the one dim an expand broadcasts from 1 to n (static), else None
        src = [1] * (len(out) - len(src)) + list(src)
        dims = [(d, o) for d, (s, o) in enumerate(zip(src, out)) if s != o]
        if len(dims) != 1 or not isinstance(dims[0][1], int) or src[dims[0][0]] != 1 or not 1 < dims[0][1] <= max_cat:
            return None
        return src, dims[0]

    class XnnpackFriendly(ExportPass):
        def copies(self, x, n, meta):  # [x, copy of x, ...]: n distinct nodes holding x's values
            return [x] + [super(XnnpackFriendly, self).call_operator(aten.clone.default, (x,), {}, meta)
                          for _ in range(n - 1)]

        def call_operator(self, op, args, kwargs, meta):
            val = meta.data.get("val")
            floats = isinstance(val, torch.Tensor) and val.dtype == torch.float32
            if op == aten.expand_copy.default and tuple(args[0].to_tensor().shape) == tuple(meta["val"].shape):
                return args[0]
            if op == aten.expand_copy.default and floats:
                rep = repeated_dim(args[0].to_tensor().shape, meta["val"].shape)
                if rep is not None and fixed(rep[0]) is not None:
                    src, (dim, n) = rep
                    x = super().call_operator(aten.view_copy.default, (args[0], fixed(src)), {}, meta)
                    return super().call_operator(aten.cat.default, (self.copies(x, n, meta), dim), {}, meta)
            if op == aten.cat.default and floats and len(set(map(id, args[0]))) < len(args[0]):
                parts, seen = [], set()
                for x in args[0]:
                    parts.append(self.copies(x, 2, meta)[1] if id(x) in seen else x)
                    seen.add(id(x))
                return super().call_operator(op, (parts, *args[1:]), kwargs, meta)
            if op in (aten.view_copy.default, aten.unsqueeze_copy.default) and floats:
                dims = fixed(meta["val"].shape)
                symbolic = op != aten.view_copy.default or not all(isinstance(d, int) for d in args[1])
                if dims is not None and symbolic:
                    return super().call_operator(aten.view_copy.default, (args[0], dims), {}, meta)
            if op == aten.mean.dim and not kwargs.get("dtype") and len(args) > 2 and args[2]:
                shape = list(args[0].to_tensor().shape)  # [B, T, H]
                if len(shape) == 3 and [d % 3 for d in args[1]] == [2] and fixed(shape):
                    x4 = super().call_operator(aten.view_copy.default, (args[0], fixed(shape + [1])), {}, meta)
                    m = super().call_operator(op, (x4, [2, 3], True), {}, meta)  # [B, T, 1, 1]
                    return super().call_operator(aten.view_copy.default, (m, fixed(shape[:2] + [1])), {}, meta)
            return super().call_operator(op, args, kwargs, meta)

    return XnnpackFriendly()


# A constant method of a program whose step keeps its KV cache (``wrapper.StatefulStep``): the cache shape of the
# functional step (``DecoderStep.cache_shape``), from which a runner reads the cache length. ``get_max_seq_len`` is
# the name ExecuTorch's LLM runners read that length from.
KV_CACHE_SHAPE_METHOD = "kv_cache_shape"


def native_step(step: torch.nn.Module, mode: str = "native") -> torch.nn.Module:
    """The module a native ``mode`` exports for a ``DecoderStep``: a ``wrapper.StatefulStep`` (the KV cache in
    buffers of the program, written in place) over a copy of the step (sharing every weight) whose packed weights
    run as the ``moe_export`` ops (``export.native.to_native``) and whose attention reads each layer's cache in place
    (``wrapper.grouped_eager_attention`` with ``rows=True``): repeat_kv copied the cache ``n_rep`` times a layer
    and decode step (an expand, which the XNNPACK pass turns into concatenated copies)."""
    from moe_export.export.native import to_native
    from moe_export.export.wrapper import StatefulStep, use_grouped_attention

    step = to_native(step, accuracy=native_accuracy(mode))  # a copy with its own config
    use_grouped_attention(step, rows=True)
    return StatefulStep(step)


def export_pte(model: torch.nn.Module, path: str | os.PathLike, mode: str = "native", max_seq_len: int = 128) -> Path:
    """Write ``model`` (a model prepared by :func:`moe_export.export.prepare.prepare_for_export`, or any
    supported HF MoE model) as one decoder-step ``.pte``; returns the path."""
    from moe_export.export.seq2seq import Seq2SeqStep, is_seq2seq
    from moe_export.export.wrapper import DecoderStep

    if isinstance(model, Seq2SeqStep) or is_seq2seq(model):
        step = model if isinstance(model, Seq2SeqStep) else Seq2SeqStep(model, max_seq_len)
        return _export_seq2seq(step, path, mode)
    step = model if isinstance(model, DecoderStep) else DecoderStep(model, max_seq_len)
    constant_methods = None
    if mode in NATIVE_MODES:
        step = native_step(step, mode)
        constant_methods = {KV_CACHE_SHAPE_METHOD: list(step.cache_shape()), "get_max_seq_len": step.max_seq_len}
    elif mode == "xnnpack-int":
        from torchao.utils import unwrap_tensor_subclass

        from moe_export.export.fast import to_xnnpack_int_experts

        step, _ = to_xnnpack_int_experts(step)
        # the partitioner matches plain dequantize_affine + linear; the subclass kept in the graph lowers to
        # wrong answers (export-notes.md)
        step = unwrap_tensor_subclass(step)
    with exporting():
        program = lower_to_executorch(export_program(step), mode, constant_methods)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.buffer)
    return path


# .pte modes an encoder-decoder (SwitchTransformers) takes: its top-1 blocks of ungated experts run as packed experts
# (gathered routed experts, in-graph unpack at every width); the native kernel computes SwiGLU experts and the
# xnnpack-int form is built for fused gated stacks
SEQ2SEQ_PTE_MODES = ("packed", "xnnpack")


def _export_seq2seq(step, path: str | os.PathLike, mode: str) -> Path:
    """An encoder-decoder (``export.seq2seq.Seq2SeqStep``) as one program with two methods, as ExecuTorch's seq2seq
    exports are: ``encoder`` (source -> cross-attention keys/values) and ``forward`` (the decoder step)."""
    from moe_export.export.seq2seq import ENCODER_METHOD

    if mode not in SEQ2SEQ_PTE_MODES:
        raise ValueError(f"{mode!r} .pte has no form for encoder-decoder models (SwitchTransformers' top-1 ungated "
                         f"experts) yet; export them with --pte-mode {' or '.join(SEQ2SEQ_PTE_MODES)}")
    with exporting():
        programs = {ENCODER_METHOD: export_program(step.encoder_program), "forward": export_program(step)}
        program = lower_to_executorch(programs, mode)
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(program.buffer)
    return path


def pte_ops(path_or_program) -> dict[str, int]:
    """Operator inventory of a .pte (a path, its bytes, or a deserialized program): ``{"aten::bmm": 4,
    "XnnpackBackend": 3, ...}`` (delegates by backend id)."""
    from executorch.exir._serialize._program import deserialize_pte_binary

    if isinstance(path_or_program, (bytes, bytearray)):
        data = bytes(path_or_program)
    else:
        data = Path(path_or_program).read_bytes() if not hasattr(path_or_program, "execution_plan") else None
    program = deserialize_pte_binary(data).program if data is not None else path_or_program
    if hasattr(program, "program"):
        program = program.program
    counts: dict[str, int] = {}
    for plan in program.execution_plan:
        for chain in plan.chains:
            for ins in chain.instructions:
                args = ins.instr_args
                if hasattr(args, "op_index"):
                    op = plan.operators[args.op_index]
                    name = f"{op.name}.{op.overload}" if op.overload else op.name
                elif hasattr(args, "delegate_index"):
                    name = plan.delegates[args.delegate_index].id
                else:
                    continue
                counts[name] = counts.get(name, 0) + 1
    return counts


def load_native_kernels_for(path_or_bytes) -> list[str]:
    """Load the native kernel library (``moe_export.kernels.et_native``) when the program runs ``moe_export``
    ops; returns those ops. Raises ``NativeKernelError`` (one line) when the library cannot be built or loaded."""
    from moe_export.kernels.et_native import NativeKernelError, load

    ours = sorted(op for op in pte_ops(path_or_bytes) if op.startswith("moe_export::"))
    if ours:
        try:
            load()
        except NativeKernelError as err:
            raise NativeKernelError(f"this program runs {', '.join(ours)}: {err}") from None
    return ours
