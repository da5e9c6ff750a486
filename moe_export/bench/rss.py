"""Peak resident memory of one runtime running decode, in a fresh process (``VmHWM``).

    python -m moe_export.bench.rss {pte,onnx,hf,quantized} PATH [--steps 16]

Prints one JSON line: ``base_MB`` = resident set after the imports, before the model is loaded; ``peak_MB``
= peak resident set (``VmHWM``) after an 8-token prefill and ``--steps`` decode steps; ``delta_MB`` = peak - base (an upper
bound of the runtime's own share: an import-time peak above the settled RSS also counts).
"""

from __future__ import annotations

import argparse
import json
import resource


def _status_mb(field: str) -> float | None:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _peak_mb() -> float:
    # VmHWM belongs to this exec's address space; ru_maxrss also keeps the parent's peak from before the
    # fork (a benchmark parent holding compiled models reads as GBs in every child).
    hwm = _status_mb("VmHWM")
    return hwm if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mb() -> float:
    rss = _status_mb("VmRSS")
    return rss if rss is not None else _peak_mb()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("pte", "onnx", "hf", "quantized"))
    ap.add_argument("path")
    ap.add_argument("--steps", type=int, default=16)
    args = ap.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from moe_export.export.runners import EagerStepRunner, decode_steps, open_runner
    from moe_export.export.wrapper import DecoderStep

    if args.kind == "onnx":
        import onnxruntime  # noqa: F401
    elif args.kind == "pte":
        import executorch.kernels.quantized  # noqa: F401
        from executorch.runtime import Runtime  # noqa: F401
    else:
        import transformers  # noqa: F401

        from moe_export.runtime import register as register_runtime

        register_runtime()  # the experts implementation, with transformers
    base = _current_mb()  # import-time peaks (ru_maxrss) are not the runtime's; count from the settled RSS
    if args.kind in ("pte", "onnx"):
        runner = open_runner(args.path)
    elif args.kind == "hf":
        from moe_export.hf import load_pretrained

        runner = EagerStepRunner(DecoderStep(load_pretrained(args.path, dtype=torch.float32)))
    else:
        from moe_export.hf import load_quantized

        runner = EagerStepRunner(DecoderStep(load_quantized(args.path).eval()))
    decode_steps(runner, prompt_len=8, steps=args.steps)
    peak = _peak_mb()
    print(json.dumps({"kind": args.kind, "path": args.path, "base_MB": round(base, 1), "peak_MB": round(peak, 1),
                      "delta_MB": round(peak - base, 1)}))


if __name__ == "__main__":
    main()
