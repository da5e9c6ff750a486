"""The kernels compile for real GPUs (sm80 Ampere, sm90 Hopper) on a machine without one.

The interpreter runs kernel bodies as numpy and so cannot see code-generation limits: layouts, register
pressure, shared memory. ``moe_export.kernels.aot`` lowers them with Triton's bundled ptxas to cubins and
reads registers, spills (local memory) and shared memory. Runs in a subprocess without TRITON_INTERPRET,
which the rest of the test session needs set.

Limits: 255 registers per thread (hardware), no spills, shared memory within the per-block opt-in
maximum (sm80: 163 KB, sm90: 227 KB).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]' installs it")

SHARED_LIMIT = {80: 163 * 1024, 90: 227 * 1024}

_SCRIPT = """
import dataclasses, json, sys, torch
torch.set_num_threads(1)
from moe_export.kernels import aot
jobs = json.loads(sys.argv[1])
out = []
for kind, arch, bits, dtype, i in jobs:
    configs = aot.configs_for(kind, arch, getattr(torch, dtype))
    for c in (configs if i is None else [configs[i]]):
        out.append(dataclasses.asdict(aot.compile_one(kind, arch, bits, c, x_dtype=getattr(torch, dtype))))
print("RESULT" + json.dumps(out))
"""


def _compile(jobs) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(jobs)], capture_output=True, text=True, env=env,
                          timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def _check(results):
    assert results
    for r in results:
        where = f"{r['kind']} sm{r['arch']} {r['bits']}-bit {r['x_dtype']} {r['config']}"
        assert r["registers"] <= 255, where
        assert r["spill_bytes"] == 0, f"{where}: spills {r['spill_bytes']} bytes/thread"
        assert r["shared_bytes"] <= SHARED_LIMIT[r["arch"]], f"{where}: {r['shared_bytes']} bytes of shared memory"


def test_grouped_kernel_compiles_for_hopper_3bit():
    # the most involved kernel (tile map + straddling 3-bit unpack + tl.dot) at Hopper's largest tile
    _check(_compile([["grouped", 90, 3, "bfloat16", 1]]))


@pytest.mark.slow
def test_every_config_compiles_without_spills():
    # bf16: 2 archs x 2 kernels x 5 widths x 6 configs; float32 grouped: 2 archs x 5 widths x 3 configs.
    # 150 compiles, ~3 s each on an idle core
    jobs = [[kind, arch, bits, "bfloat16", None] for arch in (80, 90) for kind in ("gather", "grouped")
            for bits in (1, 2, 3, 4, 8)]
    jobs += [["grouped", arch, bits, "float32", None] for arch in (80, 90) for bits in (1, 2, 3, 4, 8)]
    _check(_compile(jobs))
