"""An exportable encoder-decoder (SwitchTransformers): an encoder program and a decoder step with a cross-attention
cache, as the runtimes' own seq2seq exports split it (ExecuTorch: one program with an ``encoder`` method beside the
decoder's ``forward``; onnxruntime: an encoder model and a decoder model).

    encoder(source [1, Te] int64) -> cross_k, cross_v [Ld, 1, Hh, Te, D]
        the encoder stack, then every decoder block's cross-attention keys and values of its output: computed once
        per source, read by every decoder step
    forward(tokens [1, T] int64, input_pos [1] int64, k_cache, v_cache [Ld, 1, Hh, S, D], cross_k, cross_v)
        -> logits [1, T, V], k_cache', v_cache'

The decoder step is :class:`~moe_export.export.wrapper.DecoderStep`'s contract (explicit static self-attention cache,
one-hot writes, T a dynamic dim) with the cross-attention keys/values as two more inputs, so the runners' decode
loop, parity and eval take it unchanged once ``encode`` has run. The HF blocks run as they are; the cache object they
update is ours, and the relative position bias of the decoder is computed for the cache slots (positions
``input_pos .. input_pos + T - 1`` against slots ``0 .. S - 1``; future slots are masked).

Tokens per call (Te, T) are bounded by the router's expert capacity: within it the eager model drops no token, and
the exported MoE blocks (:class:`~moe_export.export.experts.PackedTop1MLP`) drop none either.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from transformers.cache_utils import EncoderDecoderCache

from moe_export.export.wrapper import _StepCache, copy_sharing_tensors, step_positions

SEQ2SEQ_ARCHITECTURES = ("SwitchTransformersForConditionalGeneration",)
ENCODER_METHOD = "encoder"  # the .pte method name of the encoder program (the decoder step is "forward")


def is_seq2seq(model: nn.Module) -> bool:
    return type(model).__name__ in SEQ2SEQ_ARCHITECTURES


def encoder_path(path: str | Path) -> Path:
    """Where the encoder of the decoder-step ``.onnx`` at ``path`` is written: ``model.onnx`` -> ``model.encoder.onnx``."""
    path = Path(path)
    return path.with_name(path.stem + ".encoder" + path.suffix)


class _CrossCache(EncoderDecoderCache):
    """Duck-types what HF's SwitchTransformers attention reads from ``past_key_values``: the self-attention cache
    (:class:`_StepCache`: static slots, one-hot writes) and cross-attention keys/values already computed (the encoder
    program's outputs), marked as updated so the attention reads them instead of projecting the encoder states."""

    def __init__(self, self_cache: _StepCache, cross_k: torch.Tensor, cross_v: torch.Tensor):  # noqa: D107
        # no super().__init__: it builds dynamic caches the step never uses
        self.self_attention_cache = self_cache
        layers = [_KV(cross_k[i], cross_v[i]) for i in range(cross_k.shape[0])]  # [1, Hh, Te, D] each
        self.cross_attention_cache = _Layers(layers)
        self.is_updated = {i: True for i in range(len(layers))}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # only read for the relative position bias, which the step passes in


class _KV:
    def __init__(self, keys, values):
        self.keys, self.values = keys, values


class _Layers:
    def __init__(self, layers):
        self.layers = layers


def _eager_copy(model: nn.Module) -> nn.Module:
    """A copy of the module tree sharing every parameter and buffer, whose configs say eager attention (plain
    matmul/softmax with the additive bias and mask, which every backend lowers); the caller's model is unchanged."""
    model = copy_sharing_tensors(model)
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            cfg._attn_implementation = "eager"
    return model.eval()


def _max_tokens(cfg, max_seq_len: int) -> int:
    capacity = getattr(cfg, "expert_capacity", None)
    return min(max_seq_len, capacity) if capacity else max_seq_len


class EncoderProgram(nn.Module):
    """``source [1, Te] -> cross_k, cross_v [Ld, 1, Hh, Te, D]``."""

    def __init__(self, model: nn.Module, max_source_len: int):
        super().__init__()
        self.encoder = model.encoder
        blocks = model.decoder.block
        self.cross = nn.ModuleList(b.layer[1].EncDecAttention for b in blocks)  # their k and v projections
        self.max_source_len = max_source_len
        self.eval()

    def example_inputs(self):
        return (torch.zeros(1, 4, dtype=torch.long),)

    def dynamic_shapes(self, max_tokens: int | None = None):
        return ({1: torch.export.Dim("Te", min=1, max=min(max_tokens or self.max_source_len, self.max_source_len))},)

    def forward(self, source):  # [1, Te]
        # an explicit all-ones mask: the stack builds one itself only outside tracing
        h = self.encoder(input_ids=source, attention_mask=torch.ones_like(source)).last_hidden_state  # [1, Te, H]
        ks, vs = [], []
        for att in self.cross:
            shape = (1, h.shape[1], att.n_heads, att.key_value_proj_dim)
            ks.append(att.k(h).view(shape).transpose(1, 2))  # [1, Hh, Te, D]
            vs.append(att.v(h).view(shape).transpose(1, 2))
        return torch.stack(ks), torch.stack(vs)


class Seq2SeqStep(nn.Module):
    """The decoder step of an encoder-decoder; ``self.encoder_program`` is its :class:`EncoderProgram` (not a
    submodule: the two are exported as separate programs and the decoder's holds no encoder weight)."""

    def __init__(self, model: nn.Module, max_seq_len: int = 128):
        super().__init__()
        arch = type(model).__name__
        if arch not in SEQ2SEQ_ARCHITECTURES:
            raise ValueError(f"encoder-decoder export supports {', '.join(SEQ2SEQ_ARCHITECTURES)}; got {arch}")
        model = _eager_copy(model)
        cfg = model.config
        self.max_seq_len = max_seq_len
        self.max_tokens = _max_tokens(cfg, max_seq_len)  # tokens per call: the router's capacity drops none
        self.embed = model.decoder.embed_tokens
        self.blocks = model.decoder.block
        self.final_norm = model.decoder.final_layer_norm
        self.lm_head = model.lm_head
        # tied embeddings: the decoder output is rescaled before lm_head (mesh-tensorflow's convention, as HF does)
        self.output_scale = cfg.d_model ** -0.5 if cfg.tie_word_embeddings else None
        att = self.blocks[0].layer[0].SelfAttention
        self.num_layers, self.num_heads, self.head_dim = len(self.blocks), att.n_heads, att.key_value_proj_dim
        self.vocab_size = cfg.vocab_size
        self.__dict__["encoder_program"] = EncoderProgram(model, self.max_tokens)
        self.eval()

    def cache_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 1, self.num_heads, self.max_seq_len, self.head_dim)

    def cross_shape(self, source_len: int) -> tuple[int, ...]:
        return (self.num_layers, 1, self.num_heads, source_len, self.head_dim)

    def empty_cache(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.cache_shape(), dtype=dtype), torch.zeros(self.cache_shape(), dtype=dtype)

    def example_inputs(self, seq_len: int = 4, source_len: int = 4):
        k, v = self.empty_cache()
        ck = torch.zeros(self.cross_shape(source_len))
        return (torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.long), k, v, ck, ck.clone())

    def dynamic_shapes(self, max_tokens: int | None = None):
        t = torch.export.Dim("T", min=1, max=min(max_tokens or self.max_tokens, self.max_tokens))
        te = torch.export.Dim("Te", min=1, max=self.max_tokens)
        return ({1: t}, None, None, None, {3: te}, {3: te})

    def forward(self, tokens, input_pos, k_cache, v_cache, cross_k, cross_v):
        t = tokens.shape[1]
        _, write, keep, mask = step_positions(input_pos, t, self.max_seq_len, k_cache.dtype)
        cache = _CrossCache(_StepCache(k_cache, v_cache, write, keep, self.head_dim), cross_k, cross_v)
        # relative position bias of positions against cache slots, from the first block's table (shared by all)
        bias = self.blocks[0].layer[0].SelfAttention.compute_bias(t, self.max_seq_len, past_seen_tokens=input_pos)
        h = self.embed(tokens)  # [1, T, H]
        for block in self.blocks:
            # encoder_hidden_states only switches cross-attention on: its keys/values come from the cache
            h = block(h, attention_mask=mask, position_bias=bias, encoder_hidden_states=cross_k[0],
                      past_key_values=cache)[0]
        h = self.final_norm(h)
        if self.output_scale is not None:
            h = h * self.output_scale
        logits = self.lm_head(h)  # [1, T, V]
        return logits, torch.stack(cache.self_attention_cache.k_out), torch.stack(cache.self_attention_cache.v_out)
