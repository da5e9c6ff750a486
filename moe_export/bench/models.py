"""The model a benchmark runs on: a trained zoo build when one exists, else a random model of the same shape."""

from __future__ import annotations

from pathlib import Path

import torch


def load_bench_model(spec, seed: int = 0) -> tuple[torch.nn.Module, dict]:
    """``(float model, description)`` for ``spec`` = a zoo name (``tiny``, ``small-mixtral``) or a checkpoint path.

    A zoo entry that is not built yet is replaced by a random model of its shape (latency, sizes and the
    roofline do not depend on the weight values; the plan then has no trained routers to read), and the
    description says so. Nothing is trained here.
    """
    from moe_export.zoo.registry import ENTRIES
    from moe_export.zoo.folders import load
    from moe_export.zoo.train import default_dir

    if isinstance(spec, torch.nn.Module):
        return spec.float().eval(), {"model": type(spec).__name__, "source": "in-memory model", "trained": False}
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
        raise FileNotFoundError(f"--model {spec}: neither a zoo entry ({', '.join(ENTRIES)}) nor an existing folder")
    model, _ = load(path)
    return model.float().eval(), {"model": spec, "source": str(path), "trained": True}


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
