"""AotStep: a decoder step compiled ahead of time by AOTInductor, reading the model's own tensors."""

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.export.aot import AotStep
from moe_export.export.wrapper import DecoderStep
from moe_export.kernels import cpu_ops
from moe_export.model_configs import tiny_random_model
from tests._mixed_plans import mixed_plan


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _plain_tensors(t):  # a packed subclass's inner tensors, recursively
    if not is_traceable_wrapper_subclass(t):
        return [t]
    names, _ = t.__tensor_flatten__()
    return [p for n in names for p in _plain_tensors(getattr(t, n))]


def test_aot_step_decodes_like_the_step_with_the_weight_ops_and_no_weight_copies():
    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    quantize_(model, MoEQuantConfig(mixed_plan(model)), progress=False)
    step = DecoderStep(model, 16)
    aot = AotStep(DecoderStep(model, 16))
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cpu_ops.use_accuracy("exact"):
        ke, ve = step.empty_cache()
        ka, va = aot.empty_cache()
        tok, pos = prompt, 0
        for i in range(4):  # prefill (4 tokens), then 3 greedy decode steps
            le, ke, ve = step(tok, torch.tensor([pos]), ke, ve)
            la, ka, va = aot(tok, torch.tensor([pos]), ka, va)
            assert _rel(la, le) < 1e-5 and _rel(ka, ke) < 1e-5 and _rel(va, ve) < 1e-5, f"call {i}"
            pos += tok.shape[1]
            tok = le[:, -1:].argmax(-1)
            assert torch.equal(la[:, -1:].argmax(-1), tok)
    # one program per token count, compiled once: the prefill's and the decode's
    assert len(aot._programs) == 2
    for program in aot._programs.values():
        # the packed experts run in the C++ op, not as a dequantizing graph
        assert "moe_export.cpu_moe_ffn.default" in program.ops
        # every constant the library reads is one of the model's own tensors (or the step's rotary table): no copy
        live = {p.data_ptr() for t in (*model.parameters(), *model.buffers()) for p in _plain_tensors(t)}
        live |= {t.data_ptr() for t in aot.step._rope}
        assert program.constants and all(t.data_ptr() in live for t in program.constants.values())
    # the int8 arithmetic is another signature: its own program, equal to the eager step at int8
    with torch.no_grad(), cpu_ops.use_accuracy("int8"):
        fast = aot(tok, torch.tensor([pos]), ka.clone(), va.clone())[0]
        eager = step(tok, torch.tensor([pos]), ka.clone(), va.clone())[0]
    assert len(aot._programs) == 3 and _rel(fast, eager) < 1e-5
