"""Run a decoder step (.pte, .onnx, the eager step, or a transformers model) behind one interface, and the one
decode loop over it.

``runner.step(tokens [1, T], pos)`` feeds T tokens at positions ``pos..pos+T-1`` and returns their logits
``[1, T, V]``, keeping the KV cache inside the runner; ``runner.run(tokens, pos, k, v)`` is the same step
without state, for timing one call. ``logits_fn(runner)`` gives the ``input_ids [B, T] -> logits [B, T, V]``
callable that ``moe_export.eval`` scores; ``greedy_generate`` and ``decode_steps`` are the decode loop that
parity, latency, memory and the references share.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import torch

from moe_export.quiet import executorch_first_run


class StepRunner:
    name = "step"

    def __init__(self, cache_shape: tuple[int, ...]):
        self.cache_shape = tuple(cache_shape)
        self.max_seq_len = self.cache_shape[3]
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
        logits, self.k, self.v = self.run(tokens, torch.tensor([pos], dtype=torch.long), self.k, self.v)
        return logits


class EagerStepRunner(StepRunner):
    name = "eager"

    def __init__(self, step_module):
        self.module = step_module
        super().__init__(step_module.cache_shape())

    def run(self, tokens, pos, k, v):
        with torch.no_grad():
            return self.module(tokens, pos, k, v)


class PteRunner(StepRunner):
    name = "executorch"

    def __init__(self, path: str | os.PathLike | bytes, cache_shape: tuple[int, ...] | None = None):
        import executorch.kernels.quantized  # noqa: F401  (registers quantized_decomposed kernels, if a graph uses them)
        from executorch.runtime import Runtime

        from moe_export.export.executorch import load_native_kernels_for

        # the moe_export kernels register into the runtime when their library loads: before the program
        self.native_ops = load_native_kernels_for(path)

        # The runtime reads a bytes program in place: keep the bytes alive as long as the runner.
        self._data = path if isinstance(path, bytes) else None
        program = Runtime.get().load_program(self._data if self._data is not None else str(path))
        self._program = program
        with executorch_first_run():  # an XNNPACK delegate starts the threadpool (and its CPU probe) at load
            self.method = program.load_method("forward")
        if cache_shape is None:
            meta = self.method.metadata
            cache_shape = tuple(meta.input_tensor_meta(2).sizes())
        super().__init__(cache_shape)

    _ran = False  # the runtime probes the CPU (and logs it) on the first execution in a process

    def run(self, tokens, pos, k, v):
        if PteRunner._ran:
            out = self.method.execute([tokens, pos, k, v])
        else:
            with executorch_first_run():
                out = self.method.execute([tokens, pos, k, v])
            PteRunner._ran = True
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
        shape = self.session.get_inputs()[2].shape
        if not all(isinstance(d, int) for d in shape):
            raise ValueError(f"{path}: the k_cache input has a symbolic shape {shape}; not a moe_export decoder step")
        super().__init__(tuple(shape))

    def run(self, tokens, pos, k, v):
        out = self.session.run(None, {"tokens": tokens.numpy(), "input_pos": pos.numpy(), "k_cache": k.numpy(),
                                      "v_cache": v.numpy()})
        return tuple(torch.from_numpy(np.asarray(o)) for o in out)


class FullForwardRunner:
    """A transformers causal LM as a runner that keeps no KV cache: every step re-runs the whole prefix. The
    reference the cached runners are checked against (a cache bug cannot hide in both)."""

    name = "full forward"

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.max_seq_len = getattr(model.config, "max_position_embeddings", None) or 1 << 30
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
        with torch.no_grad():
            logits = self.model(input_ids=self.ids, use_cache=False).logits.float()  # [1, pos + T, V]
        return logits[:, pos:]


class HFCacheRunner(FullForwardRunner):
    """A transformers causal LM stepping through its own KV cache (``past_key_values``), as ``generate`` does."""

    name = "transformers cache"

    def reset(self) -> None:
        super().reset()
        self.cache = None

    def step(self, tokens: torch.Tensor, pos: int) -> torch.Tensor:
        tokens = self._append(tokens, pos)
        with torch.no_grad():
            out = self.model(input_ids=tokens, past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits.float()


def open_runner(path: str | os.PathLike) -> StepRunner:
    p = Path(path)
    if p.suffix == ".pte":
        return PteRunner(p)
    if p.suffix == ".onnx":
        return OnnxRunner(p)
    raise ValueError(f"{p}: expected a .pte or .onnx file written by `moe-export export`")


def logits_fn(runner: StepRunner):
    """``input_ids [B, T] -> logits [B, T, V]``: each row is one prefill from an empty cache."""

    def fn(input_ids: torch.Tensor) -> torch.Tensor:
        rows = []
        for row in input_ids.reshape(-1, input_ids.shape[-1]):
            runner.reset()
            rows.append(runner.step(row[None], 0)[0])
        return torch.stack(rows).reshape(*input_ids.shape, -1)

    return fn


def greedy_generate(runner: StepRunner, prompt: torch.Tensor, new_tokens: int = 32) -> list[int]:
    """Prefill ``prompt`` (``[T]`` or ``[1, T]``), then decode ``new_tokens`` one at a time (argmax)."""
    prompt = prompt.reshape(-1)
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
    again from a new prefill. ``on_step(i, seconds)`` sees the wall time of each decode step."""
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
