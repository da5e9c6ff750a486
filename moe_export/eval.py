"""Bits per byte on held-out text and multiple-choice accuracy, for any model behind one callable.

The one interface: ``logits_fn(input_ids: LongTensor[B, T]) -> FloatTensor[B, T, V]`` where
``logits[:, t]`` predicts ``input_ids[:, t + 1]``. Eager HF models, quantized models, ``torch.compile``d
graphs, ExecuTorch and onnxruntime sessions all plug in by wrapping their forward this way.
A logits_fn may define ``score_from(T) -> int``: positions before it carry no prediction and are not
scored (the SwitchTransformers prefix-LM adapter uses it; decoder-only models score every position).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
LN2 = math.log(2.0)


# --- adapters ----------------------------------------------------------------------------------


class HFLogits:
    """logits_fn for a transformers causal LM: one forward, no cache."""

    def __init__(self, model):
        self.model = model

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The forward with autograd as the caller has it (``__call__`` runs it without gradients)."""
        return self.model(input_ids=input_ids, use_cache=False).logits.float()  # [B, T, V]

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids)


def prefix_split(T: int) -> int:
    """How a window of ``T`` tokens splits for an encoder-decoder trained as a prefix LM (as the zoo trains
    SwitchTransformers): the encoder reads ``x[:, :P]``, the decoder starts from ``x[:, P - 1]`` and predicts
    ``x[:, P:]``, with ``P = T // 2``."""
    return T // 2


class PrefixLMLogits:
    """logits_fn for an encoder-decoder trained as a prefix LM (:func:`prefix_split`), over
    ``seq2seq(source [B, P], decoder_ids [B, T - P]) -> logits [B, T - P, V]``: a transformers model
    (:class:`SwitchPrefixLMLogits`) or an exported encoder + decoder step (``export.runners.logits_fn``).
    Positions before ``P - 1`` are filled with zeros and excluded through ``score_from``."""

    def __init__(self, seq2seq: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
        self.seq2seq = seq2seq

    @staticmethod
    def score_from(T: int) -> int:
        return prefix_split(T) - 1

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The forward with autograd as the caller has it (``__call__`` runs it without gradients)."""
        B, T = input_ids.shape
        P = prefix_split(T)
        out = self.seq2seq(input_ids[:, :P], input_ids[:, P - 1 : -1])  # [B, T - P, V]
        logits = out.new_zeros(B, T, out.shape[-1])  # [B, T, V]
        logits[:, P - 1 : -1] = out
        return logits.float()

    @torch.no_grad()
    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(input_ids)


class SwitchPrefixLMLogits(PrefixLMLogits):
    """:class:`PrefixLMLogits` of a transformers SwitchTransformers model: one forward, no cache."""

    def __init__(self, model):
        self.model = model
        super().__init__(lambda src, tgt: model(input_ids=src, decoder_input_ids=tgt, use_cache=False).logits)


def logits_fn_for(model) -> LogitsFn:
    """The adapter for a transformers model: prefix LM for SwitchTransformers, plain causal LM otherwise."""
    if getattr(model.config, "model_type", None) == "switch_transformers":
        return SwitchPrefixLMLogits(model)
    if getattr(model.config, "is_encoder_decoder", False):
        raise ValueError(f"{type(model).__name__}: encoder-decoder models other than SwitchTransformers have no "
                         f"logits adapter; wrap the forward as logits_fn(input_ids[B, T]) -> logits[B, T, V]")
    return HFLogits(model)


def _score_from(logits_fn, T: int) -> int:
    f = getattr(logits_fn, "score_from", None)
    return int(f(T)) if f is not None else 0


def _check_logits(logits: torch.Tensor, x: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != x.shape:
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input {tuple(x.shape)}; expected [B, T, V]")


# --- bits per byte -----------------------------------------------------------------------------


def bits_per_byte(logits_fn: LogitsFn, tokenizer, ids: torch.Tensor | str, seq_len: int, batch_size: int = 8,
                  max_tokens: int | None = None, progress: bool = True, desc: str = "bpb",
                  accuracy: str = "exact") -> dict:
    """Bits per UTF-8 byte of held-out text, scored in non-overlapping windows of ``seq_len`` tokens.

    Evaluate at the training context length: RoPE models were never trained on longer positions.
    Within a window, ``logits[:, t]`` is scored against token ``t + 1`` for ``t >= score_from(T)``;
    the byte count is that of the scored target tokens, so bpb is tokenizer-independent.
    ``accuracy``: the CPU kernels' arithmetic while scoring (``_scoring``).
    """
    with _scoring(accuracy):
        return _bits_per_byte(logits_fn, tokenizer, ids, seq_len, batch_size, max_tokens, progress, desc)


def _scoring(accuracy: str):
    """The CPU kernels' arithmetic while a quality number is computed: "exact" (default) scores the quantized
    weights themselves, whatever the process's inference default (int8 activations); "int8" scores that."""
    from moe_export.kernels import cpu_ops

    return cpu_ops.use_accuracy(accuracy)


def _bits_per_byte(logits_fn, tokenizer, ids, seq_len, batch_size, max_tokens, progress, desc) -> dict:
    from moe_export.zoo.data import encode
    from moe_export.zoo.tokenizer import token_bytes

    if isinstance(ids, str):
        ids = encode(tokenizer, ids)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n_win = len(ids) // seq_len
    if n_win == 0:
        raise ValueError(f"bits_per_byte: {len(ids)} tokens is less than one window of seq_len={seq_len}")
    windows = ids[: n_win * seq_len].view(n_win, seq_len)  # [N, T]
    nbytes = token_bytes(tokenizer)
    s0 = _score_from(logits_fn, seq_len)
    nats, n_bytes, n_tok = 0.0, 0, 0
    for i in tqdm(range(0, n_win, batch_size), desc=desc, disable=not progress, leave=False):
        x = windows[i : i + batch_size]
        logits = logits_fn(x)
        _check_logits(logits, x)
        logp = torch.log_softmax(logits[:, s0:-1].double(), dim=-1)  # [B, T-1-s0, V]
        tgt = x[:, s0 + 1 :]
        nats -= logp.gather(-1, tgt.unsqueeze(-1)).sum().item()
        n_bytes += int(nbytes[tgt].sum())
        n_tok += tgt.numel()
    if not math.isfinite(nats):
        raise FloatingPointError("bits_per_byte: the model produced non-finite log-probabilities")
    return {"bits_per_byte": nats / LN2 / n_bytes, "nats_per_token": nats / n_tok, "tokens_scored": n_tok,
            "bytes_scored": n_bytes, "seq_len": seq_len}


# --- multiple choice ---------------------------------------------------------------------------


def _tail_logprobs(logits_fn: LogitsFn, seqs: torch.Tensor, C: int, batch: int, progress: bool, desc: str) -> torch.Tensor:
    """Sum of log p(seqs[:, C:] | seqs[:, :C]) for each row of ``seqs`` [M, C + L] -> [M]."""
    if _score_from(logits_fn, seqs.shape[1]) > C - 1:
        raise ValueError(f"context of {C} tokens is too short for this logits_fn at length {seqs.shape[1]}")
    out = []
    for i in tqdm(range(0, seqs.shape[0], batch), desc=desc, disable=not progress, leave=False):
        x = seqs[i : i + batch]
        logits = logits_fn(x)
        _check_logits(logits, x)
        logp = torch.log_softmax(logits[:, C - 1 : -1].double(), dim=-1)  # [b, L, V]
        out.append(logp.gather(-1, x[:, C:].unsqueeze(-1)).squeeze(-1).sum(-1))
    return torch.cat(out)


def choice_logprobs(logits_fn: LogitsFn, contexts: torch.Tensor, choices: torch.Tensor, batch_size: int = 8,
                    progress: bool = True, desc: str = "choices") -> torch.Tensor:
    """Sum of log p(choice tokens | context) for contexts [N, C] and choices [N, K, L] -> [N, K]."""
    N, K, L = choices.shape
    C = contexts.shape[1]
    seqs = torch.cat([contexts.unsqueeze(1).expand(N, K, C), choices], dim=-1).reshape(N * K, C + L)  # [N*K, T]
    return _tail_logprobs(logits_fn, seqs, C, batch_size * K, progress, desc).view(N, K)


def multiple_choice_accuracy(logits_fn: LogitsFn, contexts, choices, answer, batch_size: int = 8,
                             progress: bool = True, desc: str = "choices") -> dict:
    scores = choice_logprobs(logits_fn, contexts, choices, batch_size, progress, desc)
    acc = (scores.argmax(-1) == answer).double().mean().item()
    return {"accuracy": acc, "n": len(answer), "chance": 1.0 / choices.shape[1]}


def context_logprobs(logits_fn: LogitsFn, contexts: torch.Tensor, continuation: torch.Tensor, batch_size: int = 8,
                     progress: bool = True, desc: str = "contexts") -> torch.Tensor:
    """Sum of log p(continuation | context_k) for contexts [N, K, C] and continuation [N, L] -> [N, K]."""
    N, K, C = contexts.shape
    L = continuation.shape[1]
    seqs = torch.cat([contexts, continuation.unsqueeze(1).expand(N, K, L)], dim=-1).reshape(N * K, C + L)  # [N*K, T]
    return _tail_logprobs(logits_fn, seqs, C, batch_size * K, progress, desc).view(N, K)


def cloze(logits_fn: LogitsFn, tokenizer, corpus: str, seq_len: int, n_items: int = 200, choice_len: int | None = None,
          split: str = "test", seed: int = 0, batch_size: int = 8, progress: bool = True,
          accuracy: str = "exact") -> dict:
    """Context cloze on held-out text: which of 4 passages (1 true, 3 from elsewhere) precedes the next
    ``choice_len`` tokens? Scored by log p(continuation | passage), so span frequency cancels out.
    ``accuracy``: the CPU kernels' arithmetic while scoring (``_scoring``)."""
    from moe_export.zoo.data import cloze_items, token_stream

    L = choice_len or seq_len // 4
    ctx, cont, ans = cloze_items(token_stream(tokenizer, corpus, split), n_items, seq_len - L, L, 4, seed)
    with _scoring(accuracy):
        scores = context_logprobs(logits_fn, ctx, cont, batch_size, progress, desc=f"cloze {corpus}")
    acc = (scores.argmax(-1) == ans).double().mean().item()
    return {"accuracy": acc, "n": n_items, "chance": 0.25,
            "task": f"{corpus}/{split} context cloze: which of 4 passages of {seq_len - L} tokens precedes {L} tokens"}


# --- everything at once ------------------------------------------------------------------------


def evaluate(logits_fn: LogitsFn, tokenizer, corpora: list[str], seq_len: int, max_tokens: int | None = 16384,
             n_cloze: int = 200, batch_size: int = 8, progress: bool = True, accuracy: str = "exact") -> dict:
    """bpb on each corpus' test split + cloze accuracy on each: the numbers every later stage compares.
    ``accuracy``: the CPU kernels' arithmetic while scoring (``_scoring``; "exact" unless asked)."""
    from moe_export.zoo.data import token_stream

    out = {}
    for c in corpora:
        r = {"bpb": bits_per_byte(logits_fn, tokenizer, token_stream(tokenizer, c, "test"), seq_len, batch_size,
                                  max_tokens, progress, desc=f"bpb {c}", accuracy=accuracy)}
        if n_cloze:
            r["cloze"] = cloze(logits_fn, tokenizer, c, seq_len, n_cloze, batch_size=batch_size, progress=progress,
                               accuracy=accuracy)
        out[c] = r
    return out
