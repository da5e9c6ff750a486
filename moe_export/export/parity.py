"""Parity of an exported artifact: logits vs the eager quantized model (max abs error, same weights, so
tight), vs the float model (SQNR: what the plan costs), and greedy generation vs eager quantized.

A lowering that silently computes something else (export-notes.md: XNNPACK on torchao weight-only
tensors, SQNR about -100 dB against eager) fails :func:`check_parity`, whatever the file size or speed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# Measured on the tiny zoo model and random tiny Mixtral/Qwen3-MoE/OLMoE (float32, 1 thread): .pte and .onnx
# logits differ from eager by <= 1e-6 relative to the largest logit (summation order only). 1e-4 leaves room
# for other BLAS builds and still fails any wrong weight, wrong width or dropped expert by orders of magnitude.
DEFAULT_REL_TOL = 1e-4
# Speed modes whose kernels quantize activations to int8 (ONNX fast at accuracy_level 4, .pte xnnpack-int) are
# not the same arithmetic as eager: measured 46.6 dB (onnx fast) and 49.6 dB (xnnpack-int) SQNR vs eager on the
# tiny zoo model, 32/32 greedy tokens. 30 dB leaves room for other models and still fails a wrong lowering
# (measured -44 dB) by 70 dB.
APPROX_MIN_SQNR_DB = 30.0


class ParityError(AssertionError):
    """An artifact's outputs do not match the eager quantized model."""


def sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    """``10 log10(|ref|^2 / |ref - x|^2)`` in dB (inf when equal)."""
    ref, x = ref.double(), x.double()
    err = (ref - x).pow(2).sum()
    if err == 0:
        return float("inf")
    return float(10 * torch.log10(ref.pow(2).sum() / err))


def max_abs_err(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float((ref.double() - x.double()).abs().max())


def hf_greedy(model: torch.nn.Module, prompt: torch.Tensor, new_tokens: int = 32) -> list[int]:
    """Greedy decode with a full re-forward every step: the cache-free reference for runner generation."""
    from moe_export.export.runners import FullForwardRunner, greedy_generate

    return greedy_generate(FullForwardRunner(model), prompt, new_tokens)


@dataclass
class ParityReport:
    target: str
    max_abs_err_vs_eager: float  # prefill logits, artifact vs eager quantized
    decode_max_abs_err_vs_eager: float  # the same positions fed one token at a time through the cache
    logit_scale: float  # max |eager logit|, for the relative tolerance
    sqnr_vs_eager_db: float
    sqnr_vs_float_db: float | None  # artifact vs float model
    eager_sqnr_vs_float_db: float | None  # eager quantized vs float model (the plan's cost)
    greedy_match: int | None  # leading generated tokens identical to eager quantized
    greedy_len: int | None
    decode_sqnr_vs_eager_db: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def compare(runner, eager_logits_fn, input_ids: torch.Tensor, float_logits_fn=None, gen_model=None,
            gen_prompt: torch.Tensor | None = None, new_tokens: int = 32) -> ParityReport:
    """Measure ``runner`` (see runners.py) against the eager quantized model on ``input_ids [1, T]``."""
    from moe_export.export.runners import greedy_generate, logits_fn
    from moe_export.kernels import cpu_ops

    # the eager reference in the exact arithmetic: an artifact reproduces the quantized weights, not the
    # int8-activation rounding the CPU kernels use for inference by default
    with cpu_ops.use_accuracy("exact"):
        ref = eager_logits_fn(input_ids)[0]  # [T, V]
        got = logits_fn(runner)(input_ids)[0]
        # decode path: the same tokens one at a time through the KV cache
        T = input_ids.shape[1]
        if runner.seq2seq:  # an encoder-decoder's decoder half (eval.PrefixLMLogits), after encoding the first half
            from moe_export.eval import prefix_split

            P = prefix_split(T)
            runner.encode(input_ids[:, :P])
            dec = torch.cat([runner.step(input_ids[:, P - 1 + t : P + t], t)[0] for t in range(T - P)])
            ref_dec = ref[P - 1 : -1]
        else:
            runner.reset()
            dec = torch.cat([runner.step(input_ids[:, t : t + 1], t)[0] for t in range(T)])
            ref_dec = ref
        f = float_logits_fn(input_ids)[0] if float_logits_fn is not None else None
        match = length = None
        if gen_model is not None and gen_prompt is not None:
            want = hf_greedy(gen_model, gen_prompt, new_tokens)
            have = greedy_generate(runner, gen_prompt, new_tokens)
            length = new_tokens
            match = next((i for i, (a, b) in enumerate(zip(want, have)) if a != b), new_tokens)
        return ParityReport(
            target=runner.name,
            max_abs_err_vs_eager=max_abs_err(ref, got),
            decode_max_abs_err_vs_eager=max_abs_err(ref_dec, dec),
            logit_scale=float(ref.abs().max()),
            sqnr_vs_eager_db=sqnr(ref, got),
            sqnr_vs_float_db=None if f is None else sqnr(f, got),
            eager_sqnr_vs_float_db=None if f is None else sqnr(f, ref),
            greedy_match=match,
            greedy_len=length,
            decode_sqnr_vs_eager_db=sqnr(ref_dec, dec),
        )


def check_parity(report: ParityReport, rel_tol: float = DEFAULT_REL_TOL, min_sqnr_db: float | None = None) -> ParityReport:
    """Raise :class:`ParityError` unless the artifact reproduces the eager quantized model.

    ``min_sqnr_db``: for artifacts with int8 activation arithmetic (see ``APPROX_MIN_SQNR_DB``), prefill and
    decode logits must be within that SQNR of eager instead of ``rel_tol``; greedy divergence is reported,
    not an error (near-tied logits may flip).
    """
    if min_sqnr_db is not None:
        problems = []
        for what, val in (("prefill", report.sqnr_vs_eager_db), ("decode (KV cache)", report.decode_sqnr_vs_eager_db)):
            if val is not None and not val >= min_sqnr_db:
                problems.append(f"{what} logits SQNR vs eager {val:.1f} dB < {min_sqnr_db:.1f} dB")
        if problems:
            raise ParityError(f"{report.target}: " + "; ".join(problems))
        return report
    tol = rel_tol * max(report.logit_scale, 1.0)
    problems = []
    if not report.max_abs_err_vs_eager <= tol:  # `not <=` also catches NaN
        problems.append(f"prefill logits max abs err {report.max_abs_err_vs_eager:.3g} > {tol:.3g}")
    if not report.decode_max_abs_err_vs_eager <= tol:
        problems.append(f"decode (KV cache) logits max abs err {report.decode_max_abs_err_vs_eager:.3g} > {tol:.3g}")
    if report.greedy_match is not None and report.greedy_match < report.greedy_len:
        problems.append(f"greedy generation diverges from eager at token {report.greedy_match} of {report.greedy_len}")
    if problems:
        raise ParityError(f"{report.target}: " + "; ".join(problems) + f" (SQNR vs eager {report.sqnr_vs_eager_db:.1f} dB)")
    return report
