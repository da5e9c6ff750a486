"""A decoder step compiled ahead of time by AOTInductor, called like ``CompiledStep``.

Under ``torch.compile`` every call of a step runs Python between the kernels: dynamo's frame, the unwrapping of the
packed weight subclasses and inductor's Python wrapper, which calls each kernel and checks each input's size (on
the Mixtral slice about a third of a quantized decode step's CPU time, docs/benchmarks.md). AOTInductor compiles
the same graph (``torch.export`` of the step with the C++ weight ops in it, ``kernels.cpu_ops.ops_in_export``) to
a shared library whose C++ wrapper calls the kernels itself. One program per call signature (token count, cache
dtype, the ops' arithmetic, intra-op threads: inductor's CPU kernels are built for a thread count), each compiled
when first seen (tens of seconds on the slices).

The step's weights reach the library in place (AOTInductor's user-managed constants): nothing is copied, so the
library reads the tensors the model holds; weights replaced or changed in place after a program was compiled
are read as they are then (the program's shapes and widths fixed), unlike a ``CompiledStep``'s guards, which only
see its signature.
"""

from __future__ import annotations

import os
import tempfile

import torch

from moe_export.export.wrapper import DecoderStep, step_signature


class AotStep:
    """A :class:`DecoderStep` run by AOTInductor programs (:func:`compile_step`), one per call signature, compiled
    on first sight; called like the step (``step(tokens, input_pos, k_cache, v_cache)``)."""

    def __init__(self, step: DecoderStep):
        self.step = step
        self._programs: dict[tuple, _Program] = {}

    def cache_shape(self) -> tuple[int, ...]:
        return self.step.cache_shape()

    def empty_cache(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step.empty_cache(dtype)

    def __call__(self, tokens, input_pos, k_cache, v_cache):
        key = step_signature(tokens, k_cache)  # no grad mode: an AOTInductor program records no autograd
        program = self._programs.get(key)
        if program is None:
            program = self._programs[key] = compile_step(self.step, (tokens, input_pos, k_cache, v_cache))
        return program(tokens, input_pos, k_cache, v_cache)


class _Program:
    """A loaded AOTInductor model and the tensors it reads in place (kept alive with it)."""

    def __init__(self, model, constants: dict[str, torch.Tensor], ops: list[str]):
        self.model = model
        self.constants = constants
        self.ops = ops  # the C++ weight ops the program calls, as the export recorded them

    def __call__(self, *inputs):
        return tuple(self.model(*inputs))


def _constants(ep: torch.export.ExportedProgram) -> dict[str, torch.Tensor]:
    """Every tensor an AOTInductor build of ``ep`` reads, by the name it asks for: parameters and buffers with the
    packed subclasses unwrapped into their plain tensors as AOTInductor names them (``...parametrizations.W.original{i}``),
    and the lifted constants. The tensors alias the model's (no copy)."""
    from torch._functorch._aot_autograd.subclass_parametrization import unwrap_tensor_subclass_parameters

    module = unwrap_tensor_subclass_parameters(ep.module())
    out = {n: t.detach() for n, t in module.named_parameters(remove_duplicate=False)}
    out.update((n, t.detach()) for n, t in module.named_buffers(remove_duplicate=False))
    out.update((n, t.detach()) for n, t in ep.constants.items() if isinstance(t, torch.Tensor))
    return out


def compile_step(step: DecoderStep, example_inputs: tuple) -> _Program:
    """Export ``step`` at ``example_inputs``' signature with the C++ weight ops in the graph, compile it with
    AOTInductor, and load it with the step's own tensors as its constants."""
    from moe_export.kernels import cpu_ops

    with step.rope_table_buffers(), cpu_ops.ops_in_export(), torch.no_grad():
        ep = torch.export.export(step, tuple(example_inputs), strict=False)
    ops = sorted({str(n.target) for n in ep.graph.nodes if n.op == "call_function" and "moe_export" in str(n.target)})
    constants = _constants(ep)
    with tempfile.TemporaryDirectory(prefix="moe_export_aot_") as tmp:
        # no weights in the package: the library reads the model's tensors (load_constants below)
        path = torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(tmp, "step.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        model = torch._inductor.aoti_load_package(path)
    wanted = model.get_constant_fqns()
    missing = [n for n in wanted if n not in constants]
    if missing:
        raise RuntimeError(f"AOTInductor asks for constants the exported step does not hold: {missing[:5]}")
    used = {n: constants[n] for n in wanted}
    model.load_constants(used, check_full_update=True, user_managed=True)
    return _Program(model, used, ops)
