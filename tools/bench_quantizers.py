"""Held-out bits per byte of a zoo model quantized with RTN / HQQ / GPTQ at several average widths.

    python tools/bench_quantizers.py ZOO_DIR [--avg-bits 2.25,2.5,2.75] [--levels 3,2] [--group-size 64]
        [--quantizers rtn,hqq,gptq] [--calib-tokens 8192] [--json OUT]

Plans come from `moe_export.plan.methods.make_plan` (router+maxvar, the paper's method); the same plan
is quantized by each quantizer. Quantized experts are installed as fake-quant float weights (the
dequantized float16-grid values, what every runtime reproduces), so the numbers do not depend on the
packed-tensor path. GPTQ calibrates on the fine-tune corpus' train split. bpb is on the test split of
every corpus of the entry, at the training context length; KL(float || quantized) in bits per token on
the fine-tune corpus' test split (first 4096 tokens) measures the distance to the float model with
less noise than a bpb difference.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import torch


def _bpb(model, tok, corpora, seq_len, max_tokens):
    from moe_export.eval import bits_per_byte, logits_fn_for
    from moe_export.zoo.data import token_stream

    fn = logits_fn_for(model)
    return {c: round(bits_per_byte(fn, tok, token_stream(tok, c, "test"), seq_len, max_tokens=max_tokens,
                                   progress=False)["bits_per_byte"], 4) for c in corpora}


@torch.no_grad()
def _logprobs(model, tok, corpus, seq_len, max_tokens):
    """log-softmax of the model on held-out windows ``[N, T', V]`` (only the positions it scores)."""
    from moe_export.eval import _score_from, logits_fn_for
    from moe_export.zoo.data import token_stream

    ids = token_stream(tok, corpus, "test")[:max_tokens]
    windows = ids[: len(ids) // seq_len * seq_len].view(-1, seq_len)  # [N, T]
    fn = logits_fn_for(model)
    s0 = _score_from(fn, seq_len)
    return torch.cat([torch.log_softmax(fn(windows[i : i + 8])[:, s0:-1].double(), -1) for i in range(0, len(windows), 8)])


def _kl_bits(ref_logp, logp) -> float:
    """Mean KL(float || quantized) per scored token, in bits: a low-noise distance to the float model."""
    return float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean() / torch.log(torch.tensor(2.0)))


def _quantize(model, plan, name, tok, cal):
    from moe_export.api import calibration_batches_for
    from moe_export.eval import logits_fn_for
    from moe_export.models import find_moe_layers
    from moe_export.quant.apply import install_fake_quant
    from moe_export.quant.base import get_quantizer
    from moe_export.quant.calibration import quantize_sequential

    quantizer = get_quantizer(name)
    g, sym = plan.quantizer.group_size, plan.quantizer.symmetric
    if quantizer.needs_calibration:
        batches = cal.batches if cal.batches is not None else calibration_batches_for(model, cal, tok)
        rep = quantize_sequential(model, plan, quantizer, cal, batches=batches, forward=logits_fn_for(model),
                                  install=install_fake_quant, progress=False)
        return {"rtn_fallback": {k: v for k, v in rep.rtn_fallback.items() if v}}
    for layer in find_moe_layers(model):
        bits = plan.bits_for(layer.name)
        q = {p: [quantizer.quantize(layer.expert_weight(p, e), bits[e], g, sym) for e in range(layer.num_experts)]
             for p in layer.projections}
        install_fake_quant(model, layer, q)
    return {}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("zoo_dir")
    ap.add_argument("--avg-bits", default="2.25,2.5,2.75")
    ap.add_argument("--levels", default="3,2")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--quantizers", default="rtn,hqq,gptq")
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--all-experts", choices=["on", "off"], default="on")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)

    from moe_export.plan.methods import PlanConfig, make_plan
    from moe_export.quant.calibration import CalibrationConfig
    from moe_export.zoo import get_entry, load

    root = Path(args.zoo_dir)
    manifest = json.loads((root / "manifest.json").read_text())
    entry = get_entry(manifest["name"])
    float_model, tok = load(root, "finetuned")
    corpora, seq_len = entry.corpora, entry.seq_len
    cal = CalibrationConfig(n_tokens=args.calib_tokens, seq_len=seq_len, corpus=entry.finetune.corpus,
                            all_experts=args.all_experts == "on")
    from moe_export.zoo.data import token_stream

    token_stream(tok, cal.corpus, "train")  # tokenize the calibration corpus once, outside the timings
    from moe_export.quant.base import get_quantizer

    get_quantizer("hqq").quantize(torch.randn(8, 32), 2, 32, False)  # torchao's import, outside the timings
    kl_corpus, kl_tokens = entry.finetune.corpus, min(args.eval_tokens, 4096)
    ref_logp = _logprobs(float_model, tok, kl_corpus, seq_len, kl_tokens)
    rows = [{"quantizer": "float", "avg_bits": 16, "bpb": _bpb(float_model, tok, corpora, seq_len, args.eval_tokens)}]
    print(json.dumps(rows[-1]), flush=True)
    for avg in [float(x) for x in args.avg_bits.split(",")]:
        plan = make_plan(root, PlanConfig(avg_bits=avg, levels=[int(b) for b in args.levels.split(",")],
                                          group_size=args.group_size))
        for name in args.quantizers.split(","):
            model = copy.deepcopy(float_model)
            p = copy.deepcopy(plan)
            t0, c0 = time.perf_counter(), time.process_time()
            extra = _quantize(model, p, name, tok, cal)
            dt, cpu = time.perf_counter() - t0, time.process_time() - c0  # CPU time: robust on a shared machine
            kl = _kl_bits(ref_logp, _logprobs(model, tok, kl_corpus, seq_len, kl_tokens))
            rows.append({"quantizer": name, "avg_bits": avg, "seconds": round(dt, 2), "cpu_seconds": round(cpu, 2),
                         "bpb": _bpb(model, tok, corpora, seq_len, args.eval_tokens),
                         f"kl_bits_{kl_corpus}": round(kl, 5), **extra})
            print(json.dumps(rows[-1]), flush=True)
    if args.json:
        from moe_export.io import atomic_write_json

        atomic_write_json(args.json, {"zoo_dir": str(root), "group_size": args.group_size, "levels": args.levels,
                                      "calibration": dataclasses.asdict(cal), "rows": rows})


if __name__ == "__main__":
    main()
