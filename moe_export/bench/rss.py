"""Peak resident memory of one runtime running decode, in a fresh process (``ru_maxrss``).

    python -m moe_export.bench.rss {pte,onnx,hf,quantized} PATH [--steps 16]

Prints one JSON line: ``base_MB`` = peak after the imports, before the model is loaded; ``peak_MB`` =
peak after a 8-token prefill and ``--steps`` decode steps; ``delta_MB`` = the runtime's own share.
"""

from __future__ import annotations

import argparse
import json
import resource


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("pte", "onnx", "hf", "quantized"))
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from moe_export.export.runners import EagerStepRunner, open_runner
    from moe_export.export.wrapper import DecoderStep

    if args.kind in ("pte", "onnx"):
        import onnxruntime  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    else:
        import transformers  # noqa: F401

        import moe_export.experts  # noqa: F401
    base = _peak_mb()
    if args.kind in ("pte", "onnx"):
        runner = open_runner(args.path)
    elif args.kind == "hf":
        from transformers import AutoModelForCausalLM

        runner = EagerStepRunner(DecoderStep(AutoModelForCausalLM.from_pretrained(args.path).float().eval()))
    else:
        from moe_export.checkpoint import load_quantized

        runner = EagerStepRunner(DecoderStep(load_quantized(args.path).eval()))
    runner.reset()
    runner.step(torch.zeros(1, 8, dtype=torch.long), 0)
    for i in range(args.steps):
        runner.step(torch.tensor([[i + 1]]), 8 + i)
    peak = _peak_mb()
    print(json.dumps({"kind": args.kind, "path": args.path, "base_MB": round(base, 1), "peak_MB": round(peak, 1),
                      "delta_MB": round(peak - base, 1)}))


if __name__ == "__main__":
    main()
