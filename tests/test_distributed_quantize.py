"""`torchrun --nproc-per-node 2 -m moe_export quantize` (gloo on CPU) writes the bytes of a one-process run."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_export.distributed import assign
from moe_export.plan.methods import PlanConfig, make_plan
from moe_export.streaming import INDEX, quantize_checkpoint

from _synthetic_ckpt import write_mixtral

REPO = Path(__file__).resolve().parents[1]


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_assign_balances_bytes_and_is_deterministic():
    sizes = [50, 50, 50, 50, 10, 7]
    owners = assign(sizes, 2)
    assert owners == assign(sizes, 2)
    load = [sum(s for s, o in zip(sizes, owners) if o == r) for r in range(2)]
    assert sorted(load) == [107, 110]
    assert assign(sizes, 1) == [0] * len(sizes)
    assert set(assign(sizes, 8)) <= set(range(8)) and len(set(assign(sizes, 8))) == len(sizes)
    with pytest.raises(ValueError, match="world_size"):
        assign(sizes, 0)


def test_torchrun_two_ranks_gloo_byte_identical(tmp_path):
    write_mixtral(tmp_path / "src", num_layers=4, hidden=64, inter=128, experts=8)
    plan = make_plan(tmp_path / "src", PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=32), progress=False)
    plan.save(tmp_path / "plan.json")
    one = quantize_checkpoint(tmp_path / "src", tmp_path / "plan.json", tmp_path / "one", progress=False)

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_EXPORT_DIST_TIMEOUT": "120"}
    env.pop("WORLD_SIZE", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           "-m", "moe_export", "quantize", str(tmp_path / "src"), "--plan", str(tmp_path / "plan.json"),
           "-o", str(tmp_path / "two"), "-q"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240, cwd=REPO)
    assert res.returncode == 0, (res.stdout + res.stderr)[-4000:]
    assert "streaming, 2 processes" in res.stdout, res.stdout
    a, b = _hashes(one), _hashes(tmp_path / "two")
    assert INDEX in b and len([n for n in b if n.startswith("model-")]) == 5
    print(f"2-rank run: {len(b)} files, all sha256-identical to the 1-process run: {a == b}")
    assert a == b
