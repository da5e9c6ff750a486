"""CompiledStep: a decoder step under torch.compile that skips dynamo's guards once a call signature is warm."""

import torch

from moe_export.api import MoEQuantConfig, quantize_
from moe_export.export.wrapper import CompiledStep, DecoderStep
from moe_export.kernels import cpu_ops
from moe_export.model_configs import tiny_random_model
from tests._mixed_plans import mixed_plan


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_compiled_step_decodes_like_the_step_skipping_guards_only_on_warm_signatures(monkeypatch):
    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    quantize_(model, MoEQuantConfig(mixed_plan(model)), progress=False)
    step = DecoderStep(model, 16)
    compiled = CompiledStep(step, backend="aot_eager")  # inductor's C++ build takes minutes on the CI box
    skipped = []
    real = torch.compiler.set_stance

    def spy(*args, **kwargs):
        skipped.append(kwargs.get("skip_guard_eval_unsafe", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.compiler, "set_stance", spy)
    prompt = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), cpu_ops.use_accuracy("exact"):
        ke, ve = step.empty_cache()
        kc, vc = compiled.empty_cache()
        tok, pos = prompt, 0
        for i in range(5):  # prefill (4 tokens), then 4 greedy decode steps
            le, ke, ve = step(tok, torch.tensor([pos]), ke, ve)
            lc, kc, vc = compiled(tok, torch.tensor([pos]), kc, vc)
            assert _rel(lc, le) < 1e-5 and _rel(kc, ke) < 1e-5, f"call {i}"
            pos += tok.shape[1]
            tok = le[:, -1:].argmax(-1)
            assert torch.equal(lc[:, -1:].argmax(-1), tok)
        # the prefill and the first decode call ran guarded (each compiled its graph); the 3 later ones skipped
        assert skipped == [True, True, True]
        exact = compiled(tok, torch.tensor([pos]), kc.clone(), vc.clone())[0]
    # another arithmetic selects another graph: guarded (a recompile), not the exact graph with its guards skipped
    with torch.no_grad(), cpu_ops.use_accuracy("int8"):
        n = len(skipped)
        fast = compiled(tok, torch.tensor([pos]), kc.clone(), vc.clone())[0]
        assert len(skipped) == n
        eager_int8 = step(tok, torch.tensor([pos]), kc.clone(), vc.clone())[0]
        assert _rel(fast, eager_int8) < 1e-5
        assert not torch.equal(fast, exact)
        compiled(tok, torch.tensor([pos]), kc.clone(), vc.clone())
        assert skipped[n:] == [True]
    # another thread count (the bench's 2-thread phase) also runs guarded first: skipping its guards raised
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2 if threads == 1 else 1)
        with torch.no_grad(), cpu_ops.use_accuracy("exact"):
            n = len(skipped)
            again = compiled(tok, torch.tensor([pos]), kc.clone(), vc.clone())[0]
            assert len(skipped) == n and _rel(again, exact) < 1e-5
            compiled(tok, torch.tensor([pos]), kc.clone(), vc.clone())
            assert skipped[n:] == [True]
    finally:
        torch.set_num_threads(threads)


def test_compiled_step_leaves_its_step_as_given_and_checks_the_cache_shape():
    from torch.nn.utils import parametrize

    model = tiny_random_model("MixtralForCausalLM", num_layers=1)
    quantize_(model, MoEQuantConfig(mixed_plan(model)), progress=False)
    step = DecoderStep(model, 16)
    before = {n: type(p) for n, p in step.named_parameters()}
    compiled = CompiledStep(step, backend="aot_eager")
    # the subclasses are unwrapped on the compiled copy of the module tree, over the same tensors
    assert not any(parametrize.is_parametrized(m) for m in step.modules())
    assert {n: type(p) for n, p in step.named_parameters()} == before
    assert any(parametrize.is_parametrized(m) for m in compiled.compiled._orig_mod.modules())
    own = {t.data_ptr() for t in compiled.compiled._orig_mod.parameters()}
    inner = {t.data_ptr() for p in step.parameters() for t in
             ([getattr(p, a) for a in p.__tensor_flatten__()[0]] if hasattr(p, "__tensor_flatten__") else [p])}
    assert own == inner
    tok = torch.zeros(1, 1, dtype=torch.long)
    k, v = compiled.empty_cache()
    with torch.no_grad():
        compiled(tok, torch.tensor([0]), k, v)
        try:
            compiled(tok, torch.tensor([0]), k[:, :, :, :8], v[:, :, :, :8])
        except ValueError as e:
            assert "KV cache" in str(e)
        else:
            raise AssertionError("a cache of another shape ran")
