"""One Mixtral-shaped routed-expert layer, decode (T=1): QMoE nodes per width group (onnxruntime) against our
compiled fused CPU path, timed interleaved on one thread. Random weights (speed only).

    python tools/bench_qmoe_layer.py [--hidden 1024 --inter 2816 --experts 8 --widths 3,2 --reps 200]
"""

import argparse
import resource
import time

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--widths", default="3,2")
    ap.add_argument("--reps", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    from moe_export.bench.models import quantized_random
    from moe_export.export.qmoe import moe_layer_model
    from moe_export.model_configs import tiny_random_model

    widths = [int(w) for w in args.widths.split(",")]
    q = quantized_random(tiny_random_model("MixtralForCausalLM", vocab_size=256, hidden_size=args.hidden,
                                           expert_intermediate_size=args.inter, num_layers=1, num_attention_heads=8,
                                           num_key_value_heads=8, num_experts=args.experts, top_k=2), widths)
    block = q.model.layers[0].mlp
    ex = block.experts
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(moe_layer_model(ex.gate_up_proj.width_groups(), ex.down_proj.width_groups(), block.gate.weight, 2)
                                .SerializeToString(), so, providers=["CPUExecutionProvider"])
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    compiled = torch.compile(block, fullgraph=True, dynamic=False)
    x = torch.randn(1, 1, args.hidden)
    xn = x[0].numpy()
    with torch.no_grad():
        ref = compiled(x)[0]
    got = torch.from_numpy(sess.run(None, {"hidden": xn})[0])
    sq = float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))
    times = {"qmoe (onnxruntime)": [], "moe_export compiled": []}
    for _ in range(args.reps):  # interleaved: both see the same machine state
        t0 = time.perf_counter()
        sess.run(None, {"hidden": xn})
        times["qmoe (onnxruntime)"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        times["moe_export compiled"].append(time.perf_counter() - t0)
    per_expert = sum(t.numel() * t.element_size() for _, *ts in ex.gate_up_proj.groups() for t in ts if t is not None)
    per_expert += sum(t.numel() * t.element_size() for _, *ts in ex.down_proj.groups() for t in ts if t is not None)
    routed_mb = 2 * per_expert / args.experts / 1e6
    print(f"layer H={args.hidden} I={args.inter} E={args.experts} top-2, widths {widths} (sym g32); routed expert "
          f"bytes per token ~{routed_mb:.2f} MB, whole layer {per_expert / 1e6:.1f} MB; SQNR qmoe vs compiled {sq:.1f} dB")
    print(f"ORT session build peak RSS +{rss1 - rss0:.0f} MB")
    med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    for k, v in med.items():
        print(f"{k:24s} {v:7.3f} ms  ({routed_mb / v:.2f} GB/s of routed expert bytes)")
    print(f"ratio compiled / qmoe: {med['moe_export compiled'] / med['qmoe (onnxruntime)']:.2f}x")


if __name__ == "__main__":
    main()
