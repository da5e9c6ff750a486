"""Synthetic MoE checkpoints written layer by layer (never whole in memory), for the streaming tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def mixtral_config(num_layers: int, hidden: int, inter: int, experts: int, vocab: int = 256) -> dict:
    return {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": hidden,
        "intermediate_size": inter, "num_hidden_layers": num_layers, "num_attention_heads": 4,
        "num_key_value_heads": 2, "num_local_experts": experts, "num_experts_per_tok": 2, "vocab_size": vocab,
        "max_position_embeddings": 128, "tie_word_embeddings": False, "torch_dtype": "float32",
    }


def write_mixtral(folder, num_layers=6, hidden=256, inter=512, experts=16, vocab=256, seed=0,
                  poison: tuple[str, float] | None = None) -> dict:
    """One safetensors file per layer (+ one for embeddings/head), Mixtral's original per-expert key names.

    Returns {"layer_bytes": bytes of one layer's expert weights, "total_bytes": all tensors}.
    ``poison=(key, value)`` writes ``value`` (e.g. NaN) into element 0 of that tensor.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = mixtral_config(num_layers, hidden, inter, experts, vocab)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    g = torch.Generator().manual_seed(seed)
    kv = hidden // 4 * 2
    weight_map, total, layer_bytes = {}, 0, 0

    def emit(name, tensors):
        nonlocal total
        if poison is not None and poison[0] in tensors:
            tensors[poison[0]].view(-1)[0] = poison[1]
        save_file(tensors, str(folder / name))
        for k, v in tensors.items():
            weight_map[k] = name
            total += v.numel() * v.element_size()

    r = lambda *s: torch.randn(*s, generator=g) * 0.02
    emit("embed.safetensors", {"model.embed_tokens.weight": r(vocab, hidden), "lm_head.weight": r(vocab, hidden),
                               "model.norm.weight": torch.ones(hidden)})
    for i in range(num_layers):
        p = f"model.layers.{i}"
        t = {f"{p}.input_layernorm.weight": torch.ones(hidden), f"{p}.post_attention_layernorm.weight": torch.ones(hidden),
             f"{p}.self_attn.q_proj.weight": r(hidden, hidden), f"{p}.self_attn.k_proj.weight": r(kv, hidden),
             f"{p}.self_attn.v_proj.weight": r(kv, hidden), f"{p}.self_attn.o_proj.weight": r(hidden, hidden),
             f"{p}.block_sparse_moe.gate.weight": r(experts, hidden)}
        for e in range(experts):
            q = f"{p}.block_sparse_moe.experts.{e}"
            t[f"{q}.w1.weight"], t[f"{q}.w3.weight"], t[f"{q}.w2.weight"] = r(inter, hidden), r(inter, hidden), r(hidden, inter)
        layer_bytes = 3 * experts * inter * hidden * 4
        emit(f"layer-{i:03d}.safetensors", t)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                      "weight_map": weight_map}, indent=2))
    return {"layer_bytes": layer_bytes, "total_bytes": total}
