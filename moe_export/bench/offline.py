"""Offline costs: time to plan per method, and quantization throughput (expert weights per second)."""

from __future__ import annotations

import copy
import time

import torch
from tqdm.auto import tqdm

DATA_FREE = ("router+maxvar", "maxvar", "weight-error")
CALIBRATED = ("frequency", "pmq")


def plan_times(model, avg_bits: float, levels: list[int], group_size: int, batches: torch.Tensor,
               methods=DATA_FREE + CALIBRATED, progress: bool = True) -> list[dict]:
    """Seconds :func:`make_plan` takes per method on the loaded model (``batches`` [B, S] for calibrated ones)."""
    from moe_export.plan.methods import CALIBRATED as NEEDS_DATA
    from moe_export.plan.methods import PlanConfig, make_plan

    rows = []
    for method in tqdm(methods, desc="plan methods", disable=not progress, leave=False):
        cfg = PlanConfig(avg_bits=avg_bits, levels=list(levels), method=method, group_size=group_size)
        data = [b[None] for b in batches] if method in NEEDS_DATA else None
        t0 = time.perf_counter()
        try:
            make_plan(model, cfg, batches=data, progress=False)
            rows.append({"method": method, "calibrated": method in NEEDS_DATA, "s": time.perf_counter() - t0,
                         "calibration_tokens": int(batches.numel()) if data else 0})
        except Exception as err:
            rows.append({"method": method, "calibrated": method in NEEDS_DATA, "error": f"{type(err).__name__}: {err}"[:200]})
    return rows


def quantize_throughput(model, plan, batches: torch.Tensor, quantizers=("rtn", "hqq", "gptq"),
                        progress: bool = True) -> list[dict]:
    """Expert weights quantized per second by each quantizer (GPTQ includes its calibration forward passes)."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.export.experts import moe_blocks
    from moe_export.quant.calibration import CalibrationConfig

    n_weights = sum(b.experts.gate_up_proj.numel() + b.experts.down_proj.numel() for _, b in moe_blocks(model))
    rows = []
    for name in tqdm(quantizers, desc="quantizers", disable=not progress, leave=False):
        m = copy.deepcopy(model)
        cal = CalibrationConfig(n_tokens=int(batches.numel()), batches=batches) if name == "gptq" else None
        t0 = time.perf_counter()
        try:
            quantize_(m, MoEQuantConfig(plan, quantizer=name, calibration=cal), progress=False)
            s = time.perf_counter() - t0
            rows.append({"quantizer": name, "s": s, "expert_weights": n_weights, "weights_per_s": n_weights / s,
                         "calibration_tokens": int(batches.numel()) if cal else 0})
        except Exception as err:
            rows.append({"quantizer": name, "error": f"{type(err).__name__}: {err}"[:200]})
        del m
    return rows
