"""Decode on the Mixtral-shaped slice (hidden 1024, intermediate 2816, 8 experts top-2, 4 layers, vocab 8192; random
weights): .onnx native against .onnx fast (MatMulNBits), same quantized model, one thread, interleaved steps.

    python tools/bench_qmoe_slice.py [--widths 3,2] [--steps 64] [--out /tmp/slice]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="3,2")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--modes", default="native,fast")
    ap.add_argument("--out", default="/tmp/slice")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from moe_export.bench.models import quantized_random, slice_model
    from moe_export.export.onnx import export_onnx
    from moe_export.export.prepare import prepare_for_export
    from moe_export.export.runners import OnnxRunner
    from moe_export.export.wrapper import DecoderStep

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    q = quantized_random(slice_model("mixtral-slice"), [int(w) for w in args.widths.split(",")])
    step = DecoderStep(prepare_for_export(q), 128)
    paths = {}
    for mode in args.modes.split(","):
        t0 = time.perf_counter()
        paths[mode] = export_onnx(step, out / f"slice-{mode}.onnx", mode=mode, accuracy_level=4)
        print(f"{mode}: exported in {time.perf_counter() - t0:.0f} s, {paths[mode].stat().st_size / 1e6:.1f} MB",
              flush=True)
    # RSS of each runtime alone, in a fresh process (rss.py measures a session's peak after 16 decode steps)
    for mode, p in paths.items():
        r = subprocess.run([sys.executable, "-m", "moe_export.bench.rss", "onnx", str(p)], capture_output=True,
                           text=True)
        print(mode, "rss", r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:])
    runners = {m: OnnxRunner(p) for m, p in paths.items()}
    for r in runners.values():
        r.reset()
        r.step(torch.zeros(1, 8, dtype=torch.long), 0)
    times = {m: [] for m in runners}
    for i in range(args.steps):
        for m, r in runners.items():
            t0 = time.perf_counter()
            r.step(torch.tensor([[i % 7 + 1]]), 8 + i)
            times[m].append(time.perf_counter() - t0)
    res = {m: float(np.median(v[4:]) * 1e3) for m, v in times.items()}
    for m, ms in res.items():
        print(f"{m:6s} decode {ms:7.2f} ms/token = {1000 / ms:6.1f} tok/s")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
