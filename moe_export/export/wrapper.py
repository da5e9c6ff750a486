"""An exportable decoder step: tokens + position + static KV cache in, logits + updated cache out.

One signature serves prefill (T tokens) and decode (T = 1), with T a dynamic dim:

    forward(tokens [1, T] int64, input_pos [1] int64, k_cache [L, 1, Hkv, S, D], v_cache [L, 1, Hkv, S, D])
        -> logits [1, T, V], k_cache', v_cache'

The cache is explicit input/output (not a mutable buffer) so the same graph lowers to ExecuTorch and to ONNX.
It is written with a one-hot matmul instead of a scatter: exact (one term of 1.0, the rest 0.0), no
data-dependent slicing, and every backend has a kernel for it. The native .onnx writes the same values with a
scatter (``DecoderStep.scatter_cache``), which onnxruntime runs without the matmul's cache-sized temporaries. The HF decoder layers run unchanged; only the
cache object they update is ours.
"""

from __future__ import annotations

import contextlib
import copy
import itertools

import torch
import torch.nn as nn

SUPPORTED_ARCHITECTURES = ("MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM", "Qwen2MoeForCausalLM",
                           "DeepseekV3ForCausalLM")


def copy_sharing_tensors(module: nn.Module) -> nn.Module:
    """A copy of ``module``'s tree (modules, configs, plain attributes) that shares every parameter and buffer with
    it: no tensor is duplicated, and what the copy changes about itself (attention implementation, parametrizations,
    submodules replaced) leaves ``module`` as it was."""
    shared = {id(t): t for t in itertools.chain(module.parameters(), module.buffers())}
    return copy.deepcopy(module, memo=shared)


class _StepCache:
    """Duck-types the ``update`` method HF attention calls on ``past_key_values``."""

    def __init__(self, k_cache, v_cache, write, keep, v_dim, positions=None):
        self.k_cache, self.v_cache = k_cache, v_cache  # [L, 1, Hkv, S, D]
        self.write, self.keep = write, keep  # [T, S] one-hot of the new positions, [S, 1] = 1 - any(write)
        # [T]: write the new rows with a scatter instead of the one-hot matmul (DecoderStep.scatter_cache)
        self.positions = positions
        self.v_dim = v_dim  # values narrower than keys (DeepSeek's MLA latents) sit zero-padded to D in the v cache
        self.k_out: list[torch.Tensor] = []
        self.v_out: list[torch.Tensor] = []

    def _write(self, cache, new):  # [1, Hkv, S, D], [1, Hkv, T, D] -> [1, Hkv, S, D]
        if self.positions is not None:
            # [1, Hkv, T, D] by a broadcasting add (expand and repeat trace to Expand nodes; the native graph has none)
            index = self.positions.view(1, 1, -1, 1) + new.new_zeros(1, new.shape[1], 1, new.shape[3], dtype=torch.long)
            return cache.scatter(2, index, new)
        return cache * self.keep + torch.matmul(self.write.transpose(0, 1), new)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # [1, Hkv, T, D], [1, Hkv, T, Dv]
        k = self._write(self.k_cache[layer_idx], key_states)  # [1, Hkv, S, D]
        pad = key_states.shape[-1] - value_states.shape[-1]
        if pad:
            value_states = torch.nn.functional.pad(value_states, (0, pad))  # [1, Hkv, T, D]
        v = self._write(self.v_cache[layer_idx], value_states)
        self.k_out.append(k)
        self.v_out.append(v)
        return k, (v[..., : self.v_dim] if pad else v)


def step_positions(input_pos: torch.Tensor, t, max_seq_len: int, dtype: torch.dtype):
    """The positions of a step's T tokens and what the static cache needs of them: ``positions [T]``, the one-hot
    ``write [T, S]`` of the new slots, ``keep [S, 1]`` (1 where a slot is not rewritten) and the additive causal
    ``mask [1, 1, T, S]`` (slots after a token's position are masked)."""
    positions = input_pos + torch.arange(t, dtype=torch.long)  # [T]
    slots = torch.arange(max_seq_len, dtype=torch.long)  # [S]
    write = (positions.unsqueeze(1) == slots.unsqueeze(0)).to(dtype)  # [T, S]
    keep = (1.0 - write.sum(0)).unsqueeze(-1)  # [S, 1]
    visible = slots.unsqueeze(0) <= positions.unsqueeze(1)  # [T, S]
    mask = torch.where(visible, 0.0, torch.finfo(dtype).min)[None, None]  # [1, 1, T, S]
    return positions, write, keep, mask


GROUPED_ATTENTION = "moe_export_grouped_eager"  # an attention implementation name (transformers' AttentionInterface)
GROUPED_ROWS_ATTENTION = "moe_export_grouped_rows"  # the same with rows=True (see grouped_eager_attention)


def grouped_eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, *, rows=False, **kwargs):
    """transformers' eager attention (``eager_attention_forward``: scores, additive mask, float32 softmax, weighted
    values) without ``repeat_kv``: the ``n_rep`` query heads that share a key/value head are one broadcast batch
    over it (query ``[B, Hkv, n_rep, T, D]`` against key ``[B, Hkv, 1, S, D]``), so a traced step does not copy the
    cache ``n_rep`` times per layer (``Expand`` of ``[1, Hkv, n_rep, S, D]`` every decode step). The same products
    and sums as the eager form, row for row.

    ``rows=True``: the ``n_rep`` heads are ``n_rep * T`` rows of one product per key/value head (query
    ``[B, Hkv, n_rep * T, D]`` against key ``[B, Hkv, S, D]``). For ExecuTorch: torch.export decomposes a broadcast
    batch matmul into expand + copy + bmm, which copies the cache ``n_rep`` times again; a product over equal batch
    dims is one bmm of the cache in place. The same dot products, but torch's eager kernels pick other blockings
    for the taller rows, so the sums round differently (a few ulp) from ``rows=False``."""
    b, h, t, _ = query.shape
    hkv = key.shape[1]
    if h % hkv:
        raise ValueError(f"{h} query heads do not divide into {hkv} key/value heads")
    n_rep = h // hkv
    s, dv = key.shape[2], value.shape[-1]
    if rows:
        # head j * n_rep + r reads kv head j (repeat_kv's order). 3-D products, and their outputs viewed with the
        # n_rep and T dims apart: merging Hkv and n_rep of a product's output makes torch.export guard on a stride
        # relation it cannot prove for every token count (a constraint violation of T)
        q = query.reshape(b * hkv, n_rep * t, query.shape[-1])  # [B * Hkv, n_rep * T, D]
        scores = torch.bmm(q, key.reshape(b * hkv, s, -1).transpose(1, 2))  # [B * Hkv, n_rep * T, S]
        scores = scores.view(b, hkv, n_rep, t, s) * scaling  # [B, Hkv, n_rep, T, S]
    else:
        q = query.reshape(b, hkv, n_rep, t, -1)  # head j * n_rep + r reads kv head j, as repeat_kv orders them
        # the transpose last, next to the product: onnxruntime folds a Transpose of a MatMul's last two dims into
        # the product (FusedMatMul), where one before an Unsqueeze copies the layer's whole key cache a step
        scores = torch.matmul(q, key[:, :, None].transpose(3, 4)) * scaling  # [B, Hkv, n_rep, T, S]
    if attention_mask is not None:
        scores = scores + attention_mask[:, :, None]  # [B, 1, 1, T, S]
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    if rows:
        out = torch.bmm(weights.view(b * hkv, n_rep * t, s), value.reshape(b * hkv, s, dv))  # [B * Hkv, n_rep * T, Dv]
        # [B, Hkv, n_rep, T, Dv] -> [B, T, H, Dv] (a strided view; the caller copies it into [B, T, H * Dv]). Not
        # viewed as [B, H, T, Dv] first: that view meets the same export guard as above
        out = out.view(b, hkv, n_rep, t, dv).permute(0, 3, 1, 2, 4).reshape(b, t, h, dv)
        return out, weights.view(b, h, t, s)
    out = torch.matmul(weights, value[:, :, None])  # [B, Hkv, n_rep, T, Dv]
    return out.reshape(b, h, t, -1).transpose(1, 2).contiguous(), weights.reshape(b, h, t, -1)


def use_grouped_attention(step: "DecoderStep", rows: bool = False) -> None:
    """Make ``step`` (its own module tree and config) attend with :func:`grouped_eager_attention` (``rows``: as it
    says there; the native .pte takes ``rows=True``, the native .onnx ``rows=False``, as onnxruntime's MatMul
    broadcasts without copying). Registers it under ``GROUPED_ATTENTION`` / ``GROUPED_ROWS_ATTENTION`` (explicit
    and idempotent)."""
    import functools

    from transformers import AttentionInterface

    name = GROUPED_ROWS_ATTENTION if rows else GROUPED_ATTENTION
    AttentionInterface.register(name, functools.partial(grouped_eager_attention, rows=True) if rows
                                else grouped_eager_attention)
    step.model.config._attn_implementation = name


class DecoderStep(nn.Module):
    def __init__(self, model: nn.Module, max_seq_len: int = 128):
        super().__init__()
        arch = type(model).__name__
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"export supports {', '.join(SUPPORTED_ARCHITECTURES)}; got {arch}")
        cfg = model.config
        window = getattr(cfg, "sliding_window", None)
        if "sliding_attention" not in (getattr(cfg, "layer_types", None) or ("sliding_attention",)):
            window = None  # no layer slides (Qwen2-MoE records sliding_window=0 when use_sliding_window is off)
        if window is not None and window < max_seq_len:
            raise ValueError(f"sliding_window={window} < max_seq_len={max_seq_len}: use max_seq_len <= {window}")
        # The attention modules read the implementation from the config they share; eager attention is plain
        # matmul/softmax with our additive mask, which every backend lowers. The step runs its own copy of the
        # module tree: the copy shares the caller's parameters and buffers (no weight is duplicated) but holds
        # its own config, so setting eager attention (and eval mode) leaves the caller's model as it was.
        model = copy_sharing_tensors(model)
        cfg = model.config
        cfg._attn_implementation = "eager"
        self.model = model
        self.max_seq_len = max_seq_len
        self.num_layers = cfg.num_hidden_layers
        if getattr(cfg, "kv_lora_rank", None):
            # DeepSeek's MLA caches its compressed latents, one "head": the kv latent [kv_lora_rank] as keys and the
            # rotary key part [qk_rope_head_dim] as values (zero-padded to kv_lora_rank in the v cache)
            self.num_kv_heads, self.head_dim, self.v_head_dim = 1, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        else:
            self.num_kv_heads = cfg.num_key_value_heads
            self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
            self.v_head_dim = self.head_dim
        self.vocab_size = cfg.vocab_size
        # write a step's new cache rows with a scatter instead of the one-hot matmul: the same values; the native
        # .onnx sets it (onnxruntime's ScatterElements copies a layer's cache once and writes T rows, where the
        # matmul form makes three cache-sized tensors a layer: keep-Mul, one-hot MatMul, Add)
        self.scatter_cache = False
        self._rope = self._rope_table(model.model.rotary_emb, max_seq_len)
        self.eval()

    @staticmethod
    def _rope_table(rotary, max_seq_len):
        """cos/sin ``[1, S, D]`` of every cache position, from the model's own rotary embedding, or None when
        its frequencies depend on the sequence (dynamic rope types). torch.compile reads rows of it: computed
        in the graph, inductor fuses cos/sin into the KV-cache and score loops and recomputes them for every
        cache slot (per layer and decode step, thousands of vector sin/cos for one token's worth of angles).
        Plain attributes, not buffers, so exported programs do not change."""
        if getattr(rotary, "rope_type", "default") != "default":
            return None
        with torch.no_grad():
            return rotary(torch.zeros(1), torch.arange(max_seq_len).unsqueeze(0))

    @contextlib.contextmanager
    def rope_table_buffers(self):
        """Inside the block the rotary table is two buffers of the step (``rope_cos``, ``rope_sin``, not saved) and an
        export reads its rows, as torch.compile does: the AOTInductor programs (``export.aot``) look their constants
        up by name. Outside it, .pte and .onnx programs compute rotary with the model's own module, as before."""
        if self._rope is None:
            yield
            return
        self.register_buffer("rope_cos", self._rope[0], persistent=False)
        self.register_buffer("rope_sin", self._rope[1], persistent=False)
        try:
            yield
        finally:
            del self.rope_cos, self.rope_sin

    def cache_shape(self) -> tuple[int, ...]:
        return (self.num_layers, 1, self.num_kv_heads, self.max_seq_len, self.head_dim)

    def empty_cache(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(self.cache_shape(), dtype=dtype), torch.zeros(self.cache_shape(), dtype=dtype)

    def example_inputs(self, seq_len: int = 4):
        k, v = self.empty_cache()
        return (torch.zeros(1, seq_len, dtype=torch.long), torch.zeros(1, dtype=torch.long), k, v)

    def dynamic_shapes(self, max_tokens: int | None = None):
        t = torch.export.Dim("T", min=1, max=max_tokens or self.max_seq_len)
        return ({1: t}, None, None, None)

    def forward(self, tokens, input_pos, k_cache, v_cache):
        positions, write, keep, mask = step_positions(input_pos, tokens.shape[1], self.max_seq_len, k_cache.dtype)
        cache = _StepCache(k_cache, v_cache, write, keep, self.v_head_dim, positions if self.scatter_cache else None)
        logits = self.decode(tokens, positions, mask, cache)
        return logits, torch.stack(cache.k_out), torch.stack(cache.v_out)

    def decode(self, tokens, positions, mask, cache):
        """Logits ``[1, T, V]`` of ``tokens`` ``[1, T]`` at ``positions`` ``[T]`` under the additive causal ``mask``
        ``[1, 1, T, S]``, each layer attending through ``cache`` (``past_key_values``: its ``update`` writes the
        layer's new keys/values and returns the layer's whole cache)."""
        inner = self.model.model
        h = inner.embed_tokens(tokens)  # [1, T, H]
        position_ids = positions.unsqueeze(0)  # [1, T]
        rope_buffers = "rope_cos" in self._buffers  # inside rope_table_buffers
        if self._rope is None or (torch.compiler.is_exporting() and not rope_buffers):
            pe = inner.rotary_emb(h, position_ids)
        else:
            table = (self.rope_cos, self.rope_sin) if rope_buffers else self._rope
            pe = tuple(t[:, positions].to(h.dtype) for t in table)  # [1, T, D] each
        for layer in inner.layers:
            out = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache, position_embeddings=pe)
            h = out[0] if isinstance(out, tuple) else out
        return self.model.lm_head(inner.norm(h))  # [1, T, V]


class _BufferCache:
    """``past_key_values`` of a :class:`StatefulStep`: each layer's keys and values are buffers of the step, and an
    update writes the step's T rows into them in place (``index_put_`` at the step's positions); no other slot is
    read or written."""

    def __init__(self, k, v, positions):
        self.k, self.v = k, v  # per layer [1, Hkv, S, D], [1, Hkv, S, Dv]
        self.positions = positions  # [T]

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):  # [1, Hkv, T, D], [1, Hkv, T, Dv]
        k, v = self.k[layer_idx], self.v[layer_idx]
        torch.ops.aten.index_put_.default(k, [None, None, self.positions], key_states)
        torch.ops.aten.index_put_.default(v, [None, None, self.positions], value_states)
        return k, v


class StatefulStep(nn.Module):
    """A :class:`DecoderStep` that keeps its KV cache: ``forward(tokens [1, T], input_pos [1]) -> logits [1, T, V]``,
    the signature of ExecuTorch's own LLM exports. Each layer's keys and values are buffers of the module
    (``k_cache_{i}`` ``[1, Hkv, S, D]``, ``v_cache_{i}`` ``[1, Hkv, S, Dv]``; Dv is the value width, DeepSeek's
    rotary key part unpadded) that a step writes at its T positions in place.

    For ExecuTorch: a program keeps mutable buffers in its memory plan from call to call and, after its reinplace
    pass, writes the rows in place, so a decode step neither passes the cache in and out (the runtime copies every
    input and output tensor of a call: 4 MB a step on the Mixtral slice) nor rewrites every slot (the functional
    step's one-hot matmul over the whole cache, its layer selects and stacked outputs). Slots the current sequence
    has not written hold an earlier sequence's values (zeros at first); the causal mask gives them weight exactly 0,
    so a sequence starts with a prefill at position 0 and needs no reset."""

    def __init__(self, step: DecoderStep):
        super().__init__()
        self.step = step
        self.max_seq_len = step.max_seq_len
        _, _, hkv, s, d = step.cache_shape()
        for i in range(step.num_layers):
            self.register_buffer(f"k_cache_{i}", torch.zeros(1, hkv, s, d), persistent=False)
            self.register_buffer(f"v_cache_{i}", torch.zeros(1, hkv, s, step.v_head_dim), persistent=False)

    def cache_shape(self) -> tuple[int, ...]:
        """The functional step's cache shape (``DecoderStep.cache_shape``): what a runner reads the cache size from."""
        return self.step.cache_shape()

    def example_inputs(self, seq_len: int = 4):
        return self.step.example_inputs(seq_len)[:2]

    def dynamic_shapes(self, max_tokens: int | None = None):
        return self.step.dynamic_shapes(max_tokens)[:2]

    def forward(self, tokens, input_pos):
        layers = range(self.step.num_layers)
        k = [getattr(self, f"k_cache_{i}") for i in layers]
        v = [getattr(self, f"v_cache_{i}") for i in layers]
        positions, _, _, mask = step_positions(input_pos, tokens.shape[1], self.max_seq_len, k[0].dtype)
        return self.step.decode(tokens, positions, mask, _BufferCache(k, v, positions))


def step_signature(tokens: torch.Tensor, k_cache: torch.Tensor) -> tuple:
    """What selects another compiled program for a step's call: the token count, the cache dtype, the fused ops'
    arithmetic (``cpu_ops.accuracy``) and the intra-op thread count (inductor's CPU kernels are built for it)."""
    from moe_export.kernels import cpu_ops

    return tuple(tokens.shape), k_cache.dtype, cpu_ops.ACCURACY, torch.get_num_threads()


class CompiledStep:
    """A :class:`DecoderStep` under ``torch.compile`` for a decode loop: full graph, static shapes (one graph per
    token count), called like the step (``step(tokens, input_pos, k_cache, v_cache)``).

    Once a call signature has run, its later calls skip dynamo's guard evaluation
    (``torch.compiler.set_stance(skip_guard_eval_unsafe=True)``, which keeps only the guards that tell compiled
    graphs apart). A step's weights, cache shape and code stay fixed between decode steps, so its guards could
    only confirm the graph they already picked, and checking them (a few hundred tensor and attribute checks over
    the packed weights) costs a tenth of a quantized decode step on the Mixtral slice. What can select another
    graph between calls is part of the signature and runs guarded (compiling on first sight): the token count,
    the cache dtype, grad mode, the fused ops' arithmetic (``cpu_ops.accuracy``) and the intra-op thread count
    (inductor's CPU kernels are compiled for it). Weights replaced or
    changed in place after the first call are not seen: compile a new step for them.

    Two more costs of every call are removed, each a few percent of a quantized decode step on the Mixtral slice:
    the packed weight subclasses reach the graph as their plain tensors (torch's
    ``unwrap_tensor_subclass_parameters`` on the step's own copy of the module tree, sharing every tensor), so a
    call does not flatten each subclass in Python; and inductor's wrapper does not check the size and stride of
    each of its hundreds of inputs (``size_asserts``): the weights' are fixed, and the cache, the one input a
    caller could get wrong without changing the signature, is checked here against the step's cache shape.
    ``backend`` and ``options``: as ``torch.compile`` takes them (``options`` over the defaults above)."""

    def __init__(self, step: DecoderStep, backend: str = "inductor", **options):
        from torch._functorch._aot_autograd.subclass_parametrization import unwrap_tensor_subclass_parameters

        self.step = step
        # the step's module tree copied around its tensors (as DecoderStep copies the model's): the
        # parametrizations go on the copy, so ``step`` stays as given (exportable, usable eagerly)
        own = unwrap_tensor_subclass_parameters(copy_sharing_tensors(step))
        if backend == "inductor":
            options = {"size_asserts": False, **options}
        self.compiled = torch.compile(own, fullgraph=True, dynamic=False, backend=backend, options=options or None)
        self._shape = torch.Size(step.cache_shape())
        self._warm: set[tuple] = set()

    def cache_shape(self) -> tuple[int, ...]:
        return self.step.cache_shape()

    def empty_cache(self, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        return self.step.empty_cache(dtype)

    def __call__(self, tokens, input_pos, k_cache, v_cache):
        if k_cache.shape != self._shape or v_cache.shape != self._shape:
            raise ValueError(f"the step's KV cache is {tuple(self._shape)}; got {tuple(k_cache.shape)} and "
                             f"{tuple(v_cache.shape)} (empty_cache() makes one)")
        key = (*step_signature(tokens, k_cache), torch.is_grad_enabled())
        if key in self._warm:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return self.compiled(tokens, input_pos, k_cache, v_cache)
        out = self.compiled(tokens, input_pos, k_cache, v_cache)
        self._warm.add(key)
        return out
