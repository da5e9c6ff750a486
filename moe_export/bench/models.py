"""The model a benchmark runs on: a trained zoo build when one exists, else a random model of the same shape; or a
*slice*: a few layers of a real model's shape with random weights, for speed, size and memory at realistic sizes.

    model, info = load_bench_model("mixtral-slice")
    q = quantized_random(slice_model("mixtral-slice"), widths=[3, 2])   # expert e at widths[e % 2], in place
"""

from __future__ import annotations

from pathlib import Path

import torch

# Layer shapes of real models, few layers, random weights (timings, sizes and memory do not depend on the values).
# The tiny zoo models sit in the caches; these do not: the mixtral slice's experts are 4 x 26 MB at 2.5 bits
# (float 1.2 GB), the qwen3 slice's 2 x 148 MB (float 5.1 GB). Vocabulary 8192 for both (Qwen3's 151936 would
# make the float embedding and lm_head alone 2.5 GB).
SLICES: dict[str, tuple[str, dict]] = {
    "mixtral-slice": ("MixtralForCausalLM", dict(  # Mixtral-8x7B's routing (8 experts, top-2), a quarter of its width
        hidden_size=1024, expert_intermediate_size=2816, num_experts=8, top_k=2, num_layers=4, vocab_size=8192,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256)),
    "qwen3-slice": ("Qwen3MoeForCausalLM", dict(  # Qwen3-30B-A3B's layer shape, 2 of its 48 layers
        hidden_size=2048, expert_intermediate_size=768, num_experts=128, top_k=8, num_layers=2, vocab_size=8192,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, intermediate_size=6144,
        max_position_embeddings=256)),
}


def slice_model(name: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random float32 model of the slice ``name`` (``SLICES``); the same seed gives the same weights."""
    from moe_export.model_configs import tiny_random_model

    arch, shape = SLICES[name]
    return tiny_random_model(arch, seed=seed, **{**shape, **overrides})


def describe_slice(name: str) -> str:
    arch, s = SLICES[name]
    return (f"random init of a {arch.removesuffix('ForCausalLM')} slice: hidden {s['hidden_size']}, expert intermediate "
            f"{s['expert_intermediate_size']}, {s['num_experts']} experts top-{s['top_k']}, {s['num_layers']} layers, "
            f"vocab {s['vocab_size']}")


def cycled_plan(model: torch.nn.Module, widths: list[int], group_size: int | None = 32, symmetric: bool = True):
    """A plan giving expert e of every MoE layer ``widths[e % len(widths)]`` bits (RTN, ``group_size``): the
    fixed width mix of the speed benchmarks (no scores to compute on random weights)."""
    from moe_export.models import find_moe_layers
    from moe_export.plan.bitplan import BitPlan

    plan = BitPlan.uniform(find_moe_layers(model), max(widths), group_size=group_size, symmetric=symmetric)
    for lp in plan.layers:
        lp.bits = [widths[e % len(widths)] for e in range(lp.num_experts)]
    plan.levels = sorted(set(widths), reverse=True)
    plan.target_avg_bits = plan.mean_bits()
    return plan


def quantized_random(model: torch.nn.Module, widths: list[int], group_size: int | None = 32,
                     symmetric: bool = True) -> torch.nn.Module:
    """``model`` quantized in place by :func:`cycled_plan` (no float copy kept: a slice's float weights are GBs)."""
    from moe_export.api import MoEQuantConfig, quantize_

    return quantize_(model, MoEQuantConfig(cycled_plan(model, widths, group_size, symmetric)), progress=False)


def load_bench_model(spec, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """``(float model, description)`` for ``spec`` = a zoo name (``tiny``, ``small-mixtral``), a slice name
    (``SLICES``: ``mixtral-slice``, ``qwen3-slice``; the description has ``"slice": True``) or a checkpoint path.

    A zoo entry that is not built yet is replaced by a random model of its shape (latency, sizes and the
    roofline do not depend on the weight values; the plan then has no trained routers to read), and the
    description says so. Nothing is trained here.
    """
    from moe_export.zoo.registry import ENTRIES
    from moe_export.zoo.folders import load
    from moe_export.zoo.train import default_dir

    if isinstance(spec, torch.nn.Module):
        return spec.float().eval(), {"model": type(spec).__name__, "source": "in-memory model", "trained": False}
    if isinstance(spec, str) and spec in SLICES:
        return slice_model(spec, seed), {"model": spec, "source": describe_slice(spec), "trained": False, "slice": True}
    if spec in ENTRIES:
        entry = ENTRIES[spec]
        built = default_dir(spec, seed)
        if (built / "manifest.json").exists():
            model, _ = load(built)
            return model.float().eval(), {"model": spec, "source": str(built / "finetuned"), "trained": True}
        if entry.arch != "mixtral":
            raise ValueError(f"zoo entry {spec!r} ({entry.arch}) is not built and only Mixtral shapes have a random "
                             f"stand-in; build it first: moe-export zoo build {spec}")
        from moe_export.model_configs import tiny_random_model

        m = entry.model
        model = tiny_random_model(
            "MixtralForCausalLM", seed=seed, hidden_size=m["hidden"], num_layers=m["layers"], num_experts=m["experts"],
            top_k=m["top_k"], expert_intermediate_size=m["expert_ffn"], num_attention_heads=m["heads"],
            num_key_value_heads=m["kv_heads"], vocab_size=entry.vocab_size, max_position_embeddings=max(entry.seq_len, 128),
        )
        return model, {"model": spec, "source": f"random init of the {spec} shape ({built} not built)", "trained": False}
    path = Path(spec).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {spec}: neither a zoo entry ({', '.join(ENTRIES)}), a slice "
                                f"({', '.join(SLICES)}) nor an existing folder")
    model, _ = load(path)
    return model.float().eval(), {"model": spec, "source": str(path), "trained": True}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
