"""Tiny configs of every supported MoE architecture, for tests and the zoo.

Every config is small enough to build in well under a second on one CPU thread: hidden 64, 8 routed
experts of intermediate 128 (so expert weights are [128, 64] / [64, 128], multiples of 8 and of the
usual group sizes 32/64), top-2 (top-1 for Switch), a 512-token vocabulary.

    cfg = tiny_config("MixtralForCausalLM", num_hidden_layers=4)
    model = tiny_random_model("SwitchTransformersForConditionalGeneration", seed=0)
"""

from __future__ import annotations

from typing import Any

import torch

# Routed-expert intermediate size shared by every tiny config; shared/dense MLPs use other sizes
# so that a test mixing them up fails on shapes.
_H, _I, _E, _V = 64, 128, 8, 512

_TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "MixtralForCausalLM": ("MixtralConfig", dict(
        vocab_size=_V, hidden_size=_H, intermediate_size=_I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, num_local_experts=_E, num_experts_per_tok=2,
        max_position_embeddings=512, router_jitter_noise=0.0, tie_word_embeddings=False,
    )),
    "Qwen3MoeForCausalLM": ("Qwen3MoeConfig", dict(
        vocab_size=_V, hidden_size=_H, intermediate_size=96, moe_intermediate_size=_I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=_E, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512,
        tie_word_embeddings=False,
    )),
    "OlmoeForCausalLM": ("OlmoeConfig", dict(
        vocab_size=_V, hidden_size=_H, intermediate_size=_I, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=_E, num_experts_per_tok=2,
        max_position_embeddings=512, pad_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )),
    "Qwen2MoeForCausalLM": ("Qwen2MoeConfig", dict(
        vocab_size=_V, hidden_size=_H, intermediate_size=96, moe_intermediate_size=_I,
        shared_expert_intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=_E, num_experts_per_tok=2, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=512, tie_word_embeddings=False,
    )),
    # Layer 0 is a dense MLP (first_k_dense_replace=1), layer 1 is MoE with two shared experts (V2-Lite's layout).
    "DeepseekV2ForCausalLM": ("DeepseekV2Config", dict(
        vocab_size=_V, hidden_size=_H, intermediate_size=96, moe_intermediate_size=_I, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=_E,
        n_shared_experts=2, num_experts_per_tok=2, n_group=1, topk_group=1, topk_method="greedy", kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, routed_scaling_factor=1.0,
        norm_topk_prob=False, max_position_embeddings=512, tie_word_embeddings=False,
    )),
    # Layer 0 is a dense MLP (first_k_dense_replace=1), layers 1-2 are MoE with one shared expert.
    "DeepseekV3ForCausalLM": ("DeepseekV3Config", dict(
        vocab_size=_V, hidden_size=_H, intermediate_size=96, moe_intermediate_size=_I, num_hidden_layers=3,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=_E,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, kv_lora_rank=16,
        q_lora_rank=32, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, head_dim=8,
        routed_scaling_factor=1.0, norm_topk_prob=True, max_position_embeddings=512,
        num_nextn_predict_layers=0, tie_word_embeddings=False,
    )),
    # Block 0 dense, block 1 sparse, in both the encoder and the decoder (sparse step 2).
    "SwitchTransformersForConditionalGeneration": ("SwitchTransformersConfig", dict(
        vocab_size=_V, d_model=_H, d_kv=16, d_ff=_I, num_heads=4, num_layers=2, num_decoder_layers=2,
        num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=_E, expert_capacity=64,
        router_jitter_noise=0.0, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )),
}

TINY_ARCHITECTURES: tuple[str, ...] = tuple(_TINY)

# Architecture-neutral override names -> each config's own field(s).
_ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "num_experts": {"MixtralForCausalLM": ("num_local_experts",), "DeepseekV2ForCausalLM": ("n_routed_experts",),
                    "DeepseekV3ForCausalLM": ("n_routed_experts",)},
    "top_k": {"SwitchTransformersForConditionalGeneration": ()},  # Switch is always top-1
    "expert_intermediate_size": {
        "MixtralForCausalLM": ("intermediate_size",), "OlmoeForCausalLM": ("intermediate_size",),
        "SwitchTransformersForConditionalGeneration": ("d_ff",),
    },
    "num_layers": {"SwitchTransformersForConditionalGeneration": ("num_layers", "num_decoder_layers")},
    "hidden_size": {"SwitchTransformersForConditionalGeneration": ("d_model",)},
}
_ALIAS_DEFAULT = {
    "num_experts": ("num_experts",), "top_k": ("num_experts_per_tok",),
    "expert_intermediate_size": ("moe_intermediate_size",), "num_layers": ("num_hidden_layers",),
    "hidden_size": ("hidden_size",),
}


def _translate(arch: str, overrides: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in overrides.items():
        if k not in _ALIASES:
            out[k] = v
            continue
        fields = _ALIASES[k].get(arch, _ALIAS_DEFAULT[k])
        if k == "top_k" and not fields and v != 1:
            raise ValueError(f"{arch} routes every token to one expert; top_k={v} is not possible")
        out.update({f: v for f in fields})
    return out


def tiny_config(arch: str, **overrides):
    """A transformers config of architecture ``arch`` (e.g. "MixtralForCausalLM") at toy size.

    ``overrides`` are the config's own fields, or these names that mean the same for every
    architecture: ``num_experts``, ``top_k``, ``expert_intermediate_size`` (routed experts),
    ``num_layers`` (Switch: encoder and decoder each), ``hidden_size``.
    """
    import transformers

    if arch not in _TINY:
        raise ValueError(f"no tiny config for architecture {arch!r}; known: {', '.join(_TINY)}")
    cls_name, kwargs = _TINY[arch]
    kwargs = {**kwargs, **_translate(arch, overrides)}
    cfg = getattr(transformers, cls_name)(**kwargs)
    cfg.architectures = [arch]
    return cfg


def tiny_random_model(arch: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A randomly initialised model of ``arch`` built from ``tiny_config`` (float32, eval mode).

    The same seed gives bit-identical weights.
    """
    import transformers

    cfg = tiny_config(arch, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = getattr(transformers, arch)(cfg)
    return model.float().eval()
