"""Run a decoder step (.pte, .onnx, the eager step, or a transformers model) behind one interface, and the one
decode loop over it.

``runner.step(tokens [1, T], pos)`` feeds T tokens at positions ``pos..pos+T-1`` and returns their logits
``[1, T, V]``, keeping the KV cache inside the runner; ``runner.run(tokens, pos, k, v)`` is the same step
without state, for timing one call (a program that keeps its own cache, the native .pte, ignores k and v). An encoder-decoder runner (``runner.seq2seq``, ``export.seq2seq``) first reads
its source with ``runner.encode(source [1, Te])``; its steps are the decoder's, attending to that source. ``logits_fn(runner)`` gives the ``input_ids [B, T] -> logits [B, T, V]``
callable that ``moe_export.eval`` scores; ``greedy_generate`` and ``decode_steps`` are the decode loop that
parity, latency, memory and the references share.
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from pathlib import Path

import numpy as np
import torch

from moe_export.quiet import executorch_first_run


class StepRunner:
    name = "step"
    seq2seq = False  # an encoder-decoder: encode(source) before the decoder's steps

    def __init__(self, cache_shape: tuple[int, ...]):
        self.cache_shape = tuple(cache_shape)
        self.max_seq_len = self.cache_shape[3]
        self.extra: tuple = ()  # inputs after the KV cache: the cross-attention keys/values of the encoded source
        self.max_tokens: int | None = None  # tokens per call an encoder-decoder was exported for (its expert capacity)
        self.reset()

    def _check_tokens(self, n: int, what: str) -> None:
        if self.max_tokens is not None and n > self.max_tokens:
            raise ValueError(f"{self.name}: {n} {what} tokens in one call exceed the {self.max_tokens} this encoder-decoder "
                             "was exported for (the router's expert capacity, within which no token is dropped)")

    def run_encoder(self, source):  # -> cross_k, cross_v
        raise ValueError(f"{self.name}: not an encoder-decoder program; there is no source to encode")

    def encode(self, source: torch.Tensor) -> None:
        """Run the encoder on ``source`` (``[Te]`` or ``[1, Te]``); the decoder cache starts empty."""
        source = source.reshape(1, -1).long()
        self._check_tokens(source.shape[1], "source")
        self.extra = tuple(self.run_encoder(source))
        self.reset()

    def reset(self) -> None:
        self.k = torch.zeros(self.cache_shape)
        self.v = torch.zeros(self.cache_shape)

    def run(self, tokens, pos, k, v):  # -> logits, k, v
        raise NotImplementedError

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        tokens = tokens.reshape(1, -1).long()
        if pos + tokens.shape[1] > self.max_seq_len:
            raise ValueError(f"{self.name}: positions up to {pos + tokens.shape[1]} exceed the exported cache of "
                             f"{self.max_seq_len}; export with a larger max_seq_len")
        if self.seq2seq and not self.extra:
            raise ValueError(f"{self.name}: an encoder-decoder step needs encode(source) first")
        self._check_tokens(tokens.shape[1], "decoder")
        logits, self.k, self.v = self.run(tokens, torch.tensor([pos], dtype=torch.long), self.k, self.v)
        return logits


class EagerStepRunner(StepRunner):
    name = "eager"

    def __init__(self, step_module):
        self.module = step_module
        self.seq2seq = hasattr(step_module, "encoder_program")  # export.seq2seq.Seq2SeqStep
        super().__init__(step_module.cache_shape())
        self.max_tokens = getattr(step_module, "max_tokens", None) if self.seq2seq else None

    def run_encoder(self, source):
        if not self.seq2seq:
            return super().run_encoder(source)
        with torch.no_grad():
            return self.module.encoder_program(source)

    def run(self, tokens, pos, k, v):
        with torch.no_grad():
            return self.module(tokens, pos, k, v, *self.extra)


# The PteRunners alive in this process: the ExecuTorch threadpool can be resized only while none is (see
# executorch_threads).
_LIVE_PTE: weakref.WeakSet = weakref.WeakSet()


def executorch_threads(threads: int | None = None) -> int:
    """The size of the ExecuTorch runtime's threadpool, after resizing it to ``threads`` when given.

    One pool per process: the XNNPACK delegates run on it, and the ``moe_export`` kernels
    (``moe_export/kernels/et_ops.cpp``) split their rows over as many threads, on workers of their own (a native
    program's delegates run on the calling thread, :func:`moe_export.kernels.et_native.serial_delegates`). The
    runtime sizes it to the CPU's cores; a latency comparison with other
    one-thread runtimes (torch at ``set_num_threads(1)``, onnxruntime sessions at one intra-op thread) sets it to 1:
    on a shared machine a 2-thread pool waits at every op for a thread another job holds. An XNNPACK delegate
    keeps the pool it was loaded with, so the pool is resized only while no :class:`PteRunner` is alive
    (``ValueError`` otherwise)."""
    from executorch.extension.pybindings import portable_lib

    if threads is not None and threads < 1:
        raise ValueError(f"ExecuTorch threads must be >= 1, got {threads}")
    with executorch_first_run():  # the pool probes the CPU when first asked for, and logs a resize
        have = int(portable_lib._threadpool_get_thread_count())
        if threads is None or threads == have:
            return have
        if len(_LIVE_PTE):
            raise ValueError(f"the ExecuTorch threadpool has {have} threads and {len(_LIVE_PTE)} loaded .pte "
                             f"program(s) use it (an XNNPACK delegate keeps the pool it was loaded with): drop them "
                             f"before asking for {threads}")
        portable_lib._unsafe_reset_threadpool(threads)
        return int(portable_lib._threadpool_get_thread_count())


class PteRunner(StepRunner):
    """A .pte decoder step in the ExecuTorch Python runtime. ``threads``: the runtime's threadpool size for this
    process (:func:`executorch_threads`; None keeps it as it is: the CPU's cores unless set before)."""

    name = "executorch"

    def __init__(self, path: str | os.PathLike | bytes, cache_shape: tuple[int, ...] | None = None,
                 threads: int | None = None):
        import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed kernels, if a graph uses them)
        from executorch.runtime import Runtime

        from moe_export.export.executorch import KV_CACHE_SHAPE_METHOD, load_native_kernels_for
        from moe_export.export.seq2seq import ENCODER_METHOD
        from moe_export.kernels import et_native

        self.threads = executorch_threads(threads)
        # the moe_export kernels register into the runtime when their library loads: before the program
        self.native_ops = load_native_kernels_for(path)

        # The runtime reads a bytes program in place: keep the bytes alive as long as the runner.
        self._data = path if isinstance(path, bytes) else None
        program = Runtime.get().load_program(self._data if self._data is not None else str(path))
        self._program = program
        self.seq2seq = ENCODER_METHOD in program.method_names
        # an XNNPACK delegate starts the threadpool (and its CPU probe) at load; a native program's delegates run on
        # the calling thread and its moe_export kernels split rows on their own workers (et_native.serial_delegates)
        with executorch_first_run(), (et_native.serial_delegates() if self.native_ops else contextlib.nullcontext()):
            self.method = program.load_method("forward")
            self.encoder = program.load_method(ENCODER_METHOD) if self.seq2seq else None
        # a program that keeps its KV cache (the native .pte, ``wrapper.StatefulStep``) takes tokens and position only
        self.stateful = KV_CACHE_SHAPE_METHOD in program.method_names
        if cache_shape is None and self.stateful:
            cache_shape = tuple(program.load_method(KV_CACHE_SHAPE_METHOD).execute([]))
        elif cache_shape is None:
            cache_shape = tuple(self.method.metadata.input_tensor_meta(2).sizes())
        super().__init__(cache_shape)
        _LIVE_PTE.add(self)

    _ran = False  # the runtime probes the CPU (and logs it) on the first execution in a process

    def _execute(self, method, inputs):
        # The runtime hands its outputs back as torch tensors copied by torch's intra-op pool. With that pool at more
        # than one thread, its workers wake for the copies (the KV cache: MBs a step) and spin after them on the cores
        # the ExecuTorch pool works on: on the Mixtral slice a decode step took 24-36 ms instead of 9 (2 cores, torch at
        # 2 threads, the ExecuTorch pool at 1 or 2). So torch runs at one thread while a program executes.
        torch_threads = torch.get_num_threads()
        if torch_threads != 1:
            torch.set_num_threads(1)
        try:
            if PteRunner._ran:
                return method.execute(inputs)
            with executorch_first_run():
                out = method.execute(inputs)
            PteRunner._ran = True
            return out
        finally:
            if torch_threads != 1:
                torch.set_num_threads(torch_threads)

    def run_encoder(self, source):
        if not self.seq2seq:
            return super().run_encoder(source)
        out = self._execute(self.encoder, [source])
        return out[0], out[1]

    def run(self, tokens, pos, k, v):
        if self.stateful:  # the program reads and writes its own cache: k and v are not read and come back as given
            return self._execute(self.method, [tokens, pos])[0], k, v
        out = self._execute(self.method, [tokens, pos, k, v, *self.extra])
        return out[0], out[1], out[2]


class OnnxRunner(StepRunner):
    name = "onnxruntime"

    def __init__(self, path: str | os.PathLike, threads: int = 1):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        # fp32 compute if ORT fuses a dequantize into MatMulNBits (its default is int8 activations: ~39 dB).
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        meta = self.session.get_modelmeta().custom_metadata_map
        if "moe_export.decoder" in meta:
            raise ValueError(f"{path} is the encoder of {meta['moe_export.decoder']} beside it; pass that one")
        encoder = meta.get("moe_export.encoder")  # an encoder-decoder's decoder step names its encoder
        self.seq2seq = encoder is not None
        if self.seq2seq and not (Path(path).parent / encoder).is_file():
            raise ValueError(f"{path}: its encoder {encoder} is not beside it")
        self.encoder = ort.InferenceSession(str(Path(path).parent / encoder), so, providers=["CPUExecutionProvider"]) \
            if self.seq2seq else None
        shape = self.session.get_inputs()[2].shape
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{path}: the k_cache input has a symbolic shape {shape}; not a moe_export decoder step")
        super().__init__(tuple(shape))
        self.max_tokens = int(meta["moe_export.max_tokens"]) if "moe_export.max_tokens" in meta else None

    def run_encoder(self, source):
        if not self.seq2seq:
            return super().run_encoder(source)
        return tuple(torch.from_numpy(np.asarray(o)) for o in self.encoder.run(None, {"source": source.numpy()}))

    def run(self, tokens, pos, k, v):
        feed = {"tokens": tokens.numpy(), "input_pos": pos.numpy(), "k_cache": k.numpy(), "v_cache": v.numpy()}
        if self.extra:
            feed["cross_k"], feed["cross_v"] = (t.numpy() for t in self.extra)
        out = self.session.run(None, feed)
        return tuple(torch.from_numpy(np.asarray(o)) for o in out)


class FullForwardRunner:
    """A transformers causal LM as a runner that keeps no KV cache: every step re-runs the whole prefix. The
    reference the cached runners are checked against (a cache bug cannot hide in both)."""

    name = "full forward"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.max_seq_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        self.seq2seq = bool(getattr(model.config, "is_encoder_decoder", False))
        self.source = None
        self.reset()

    def encode(self, source: torch.Tensor) -> None:
        """An encoder-decoder's source: every step re-runs the encoder on it with the decoder's prefix."""
        if not self.seq2seq:
            raise ValueError(f"{self.name}: {type(self.model).__name__} is not an encoder-decoder")
        self.source = source.reshape(1, -1).long()
        self.reset()

    def reset(self) -> None:
        self.ids = torch.zeros(1, 0, dtype=torch.long)

    def _append(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        # the tokens so far: a step must continue exactly where the last one ended
        tokens = tokens.reshape(1, -1).long()
        if pos != self.ids.shape[1]:
            raise ValueError(f"{self.name}: step at position {pos} after {self.ids.shape[1]} tokens")
        self.ids = torch.cat([self.ids, tokens], dim=1)
        return tokens

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        self._append(tokens, pos)
        inputs = {"input_ids": self.source, "decoder_input_ids": self.ids} if self.seq2seq else {"input_ids": self.ids}
        with torch.no_grad():
            logits = self.model(**inputs, use_cache=False).logits.float()  # [1, pos + T, V]
        return logits[:, pos:]


class HFCacheRunner(FullForwardRunner):
    """A transformers causal LM stepping through its own KV cache (``past_key_values``), as ``generate`` does."""

    name = "transformers cache"

    def reset(self) -> None:
        if self.seq2seq:
            raise ValueError(f"{self.name}: encoder-decoder models step through FullForwardRunner or an exported step")
        super().reset()
        self.cache = None

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        tokens = self._append(tokens, pos)
        with torch.no_grad():
            out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits.float()


def open_runner(path: str | os.PathLike, threads: int | None = None) -> StepRunner:
    """The runner of a .pte or .onnx file; ``threads``: the runtime's threads (None: each runtime's default here,
    the CPU's cores for ExecuTorch, one for onnxruntime)."""
    p = Path(path)
    if p.suffix == ".pte":
        return PteRunner(p, threads=threads)
    if p.suffix == ".onnx":
        return OnnxRunner(p) if threads is None else OnnxRunner(p, threads=threads)
    raise ValueError(f"{p}: expected a .pte or .onnx file written by `moe-export export`")


def logits_fn(runner: StepRunner):
    """``input_ids [B, T] -> logits [B, T, V]``: each row is one prefill from an empty cache. An encoder-decoder's is
    the prefix LM of ``moe_export.eval.PrefixLMLogits`` (as ``eval.logits_fn_for`` scores the model): each row's first
    half encoded, its decoder half one prefill."""
    if runner.seq2seq:
        from moe_export.eval import PrefixLMLogits

        def seq2seq(source: torch.Tensor, decoder_ids: torch.Tensor) -> torch.Tensor:
            rows = []
            for src, tgt in zip(source, decoder_ids):
                runner.encode(src)
                rows.append(runner.step(tgt[None], 0)[0])
            return torch.stack(rows)

        return PrefixLMLogits(seq2seq)

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in input_ids.reshape(-1, input_ids.shape[-1]):
            runner.reset()
            rows.append(runner.step(row[None], 0)[0])
        return torch.stack(rows).reshape(*input_ids.shape, -1)

    return fn


def greedy_generate(runner: StepRunner, prompt: torch.Tensor, new_tokens: int = 32) -> list[int]:
    """Prefill ``prompt`` (``[T]`` or ``[1, T]``), then decode ``new_tokens`` one at a time (argmax). An
    encoder-decoder encodes the prompt and its decoder starts from the prompt's last token (the prefix LM of
    ``moe_export.eval.PrefixLMLogits``)."""
    prompt = prompt.reshape(-1)
    if runner.seq2seq:
        runner.encode(prompt)
        prompt = prompt[-1:]
    runner.reset()
    logits = runner.step(prompt[None], 0)
    out: list[int] = []
    pos = prompt.numel()
    for _ in range(new_tokens):
        nxt = int(logits[0, -1].argmax())
        out.append(nxt)
        if len(out) == new_tokens:
            break
        logits = runner.step(torch.tensor([[nxt]]), pos)
        pos += 1
    return out


def decode_steps(runner: StepRunner, prompt_len: int = 8, steps: int = 32, on_step=None) -> None:
    """Prefill ``prompt_len`` tokens, then ``steps`` single-token decode steps; when the cache is full it starts
    again from a new prefill. ``on_step(i, seconds)`` sees the wall time of each decode step. An encoder-decoder
    first encodes ``prompt_len`` source tokens (untimed) and its decoder prefills as many."""
    if runner.seq2seq:
        runner.encode(torch.zeros(1, prompt_len, dtype=torch.long))
    runner.reset()
    runner.step(torch.zeros(1, prompt_len, dtype=torch.long), 0)
    pos = prompt_len
    for i in range(steps):
        if pos >= runner.max_seq_len:
            runner.reset()
            runner.step(torch.zeros(1, prompt_len, dtype=torch.long), 0)
            pos = prompt_len
        t0 = time.perf_counter()
        runner.step(torch.tensor([[i % 7 + 1]]), pos)
        if on_step is not None:
            on_step(i, time.perf_counter() - t0)
        pos += 1


def decode_latency_ms(runner: StepRunner, prompt_len: int = 8, steps: int = 32, warmup: int = 4) -> float:
    """Median wall time of one T=1 decode step after a ``prompt_len`` prefill."""
    times = []
    decode_steps(runner, prompt_len, warmup + steps, lambda i, dt: times.append(dt) if i >= warmup else None)
    return float(np.median(times) * 1e3)
