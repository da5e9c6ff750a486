"""The native .pte on the Mixtral-shaped slice (hidden 1024, intermediate 2816, 8 experts top-2, 4 layers, vocab 8192;
random weights, experts at --widths, symmetric RTN g32, everything else float):

* export memory: a fresh process loads the quantized folder and writes the native .pte (what `moe-export export
  --pte-mode native --no-check` does); its peak RSS against the float weights' bytes;
* size: the .pte against the quantized checkpoint;
* decode (1 token at position 64 of a 128-slot cache) and prefill (128 tokens): native .pte, float XNNPACK .pte and
  the quantized model under torch.compile (the compiled path: the torch extension over the same kernel core),
  interleaved, one thread.

    python tools/bench_native_slice.py [--widths 3,2] [--reps 20] [--out /tmp/native-slice]
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

_EXPORT = """
import resource, sys, time
import torch
torch.set_num_threads(1)
from moe_export.hf import load_quantized
from moe_export.export.executorch import export_pte
from moe_export.export.prepare import prepare_for_export
from moe_export.export.wrapper import DecoderStep
t0 = time.perf_counter()
q = load_quantized(sys.argv[1])
export_pte(DecoderStep(prepare_for_export(q), 128), sys.argv[2], mode="native")
hwm = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(hwm / 1024, time.perf_counter() - t0)
"""

_FLOAT = """
import sys
import torch
from transformers import MixtralConfig, MixtralForCausalLM
from moe_export.export.executorch import export_pte
from moe_export.export.prepare import prepare_for_export
from moe_export.export.wrapper import DecoderStep
torch.manual_seed(0)
cfg = MixtralConfig.from_dict(__import__("json").loads(sys.argv[1]))
export_pte(DecoderStep(prepare_for_export(MixtralForCausalLM(cfg).eval()), 128), sys.argv[2], mode="xnnpack")
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="3,2")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--out", default="/tmp/native-slice")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from moe_export.bench import latency as lat
    from moe_export.bench.models import SLICES, quantized_random, slice_model
    from moe_export.model_configs import tiny_config
    from moe_export.bench.run import _compiled, _runner_fn, _step_fn
    from moe_export.checkpoint import save_quantized
    from moe_export.export.executorch import pte_ops
    from moe_export.export.runners import PteRunner
    from moe_export.export.wrapper import DecoderStep
    from moe_export.kernels import et_native
    from moe_export.size import safetensors_bytes

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    arch, shape = SLICES["mixtral-slice"]
    cfg = tiny_config(arch, **shape)
    with torch.device("meta"):
        float_bytes = 4 * sum(p.numel() for p in slice_model("mixtral-slice").parameters())
    res = {"float_bytes": float_bytes, "widths": args.widths, "kernel_path": et_native.kernel_path()}
    q = quantized_random(slice_model("mixtral-slice"), [int(w) for w in args.widths.split(",")])
    qdir = save_quantized(q, out / "q")
    res["checkpoint_bytes"] = safetensors_bytes(qdir)
    native = out / "slice-native.pte"
    r = subprocess.run([sys.executable, "-c", _EXPORT, str(qdir), str(native)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"native export failed:\n{r.stderr[-3000:]}")
    peak_mb, export_s = (float(v) for v in r.stdout.split()[-2:])
    res.update(export_peak_MB=peak_mb, export_s=export_s, pte_bytes=native.stat().st_size,
               export_peak_vs_float=peak_mb * 2**20 / float_bytes, pte_vs_checkpoint=native.stat().st_size /
               res["checkpoint_bytes"], ops={k: v for k, v in pte_ops(native).items() if k.startswith("moe_export")})
    print(json.dumps(res), flush=True)
    fpte = out / "slice-float-xnnpack.pte"
    if not fpte.is_file():
        subprocess.run([sys.executable, "-c", _FLOAT, json.dumps(cfg.to_dict()), str(fpte)], check=True,
                       capture_output=True)
    for kind, p in (("native", native), ("float", fpte)):
        r = subprocess.run([sys.executable, "-m", "moe_export.bench.rss", "pte", str(p)], capture_output=True, text=True)
        res[f"{kind}_rss"] = json.loads(r.stdout.strip().splitlines()[-1])
    runners = {"pte quantized (native)": PteRunner(native), "pte float (xnnpack)": PteRunner(fpte)}
    gen = torch.Generator().manual_seed(0)
    res["latency"] = {}
    for phase, ids in (("decode", torch.randint(0, 8192, (1, 1), generator=gen)),
                       ("prefill", torch.randint(0, 8192, (1, 128), generator=gen))):
        fns = {n: _runner_fn(r, ids) for n, r in runners.items()}
        fns["quantized compiled"] = _step_fn(_compiled(DecoderStep(q, 128)), ids)
        t0 = time.perf_counter()
        res["latency"][phase] = lat.interleaved(fns, reps=args.reps, desc=phase, burst=3)
        res["latency"][phase]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps(res["latency"][phase]), flush=True)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(json.dumps(res))


if __name__ == "__main__":
    main()
