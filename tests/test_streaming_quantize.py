"""Streaming quantization: same checkpoint as the in-memory path, bounded memory, crash-safe resume."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moe_export.checkpoint import save_quantized
from moe_export.hf import load_quantized
from moe_export.cli import main
from moe_export.model_configs import tiny_random_model
from moe_export.plan.bitplan import BitPlan
from moe_export.plan.methods import PlanConfig, make_plan
from moe_export.streaming import INDEX, quantize_checkpoint

from _synthetic_ckpt import write_mixtral

REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "tests") + os.pathsep + os.environ.get("PYTHONPATH", "")}


def hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("arch,quantizer", [("MixtralForCausalLM", "rtn"), ("MixtralForCausalLM", "hqq"),
                                            ("Qwen2MoeForCausalLM", "rtn"), ("SwitchTransformersForConditionalGeneration", "rtn")])
def test_streamed_checkpoint_equals_in_memory_quantize(tmp_path, arch, quantizer):
    """Streamed shards load (through checkpoint.load_quantized) into the same packed model as quantize_."""
    from moe_export.api import MoEQuantConfig, quantize_

    model = tiny_random_model(arch, seed=1)
    model.save_pretrained(tmp_path / "src")
    plan = make_plan(tmp_path / "src", PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=32, method="random"),
                     progress=False)
    if arch == "Qwen2MoeForCausalLM":  # a non-expert role at a width, too
        plan.non_expert["shared_experts"] = {"bits": 8, "group_size": 32, "symmetric": True}
    if arch.startswith("Switch"):  # attention at a width: its relative-bias table [buckets, heads] does not pack
        plan.non_expert["attention"] = {"bits": 8, "group_size": None, "symmetric": False}  # and stays float in both
    quantize_checkpoint(tmp_path / "src", BitPlan.from_json(plan.to_json()), tmp_path / "q", quantizer, progress=False)
    streamed = load_quantized(tmp_path / "q")

    ref = quantize_(tiny_random_model(arch, seed=1), MoEQuantConfig(BitPlan.from_json(plan.to_json()), quantizer),
                    progress=False)
    save_quantized(ref, tmp_path / "d")
    ref = load_quantized(tmp_path / "d")
    a, b = dict(streamed.named_parameters()), dict(ref.named_parameters())
    assert sorted(a) == sorted(b)
    for k in b:
        assert type(a[k]) is type(b[k]), k
        if hasattr(b[k], "__tensor_flatten__") and type(b[k]) is not torch.nn.Parameter:
            names, _ = b[k].__tensor_flatten__()
            for n in names:  # packed bytes, scales, zeros, expert tables: bit-exact
                assert torch.equal(getattr(a[k], n), getattr(b[k], n)), f"{k}.{n}"
        else:
            assert torch.equal(a[k], b[k]), k
    x = torch.randint(0, 512, (2, 8))
    kw = {"decoder_input_ids": x} if arch.startswith("Switch") else {}
    with torch.no_grad():
        assert torch.equal(streamed(input_ids=x, **kw).logits, ref(input_ids=x, **kw).logits)


def test_rerun_skips_done_shards_and_cleans_stale_files(tmp_path):
    info = write_mixtral(tmp_path / "src", num_layers=3, hidden=64, inter=128, experts=4)
    assert info["total_bytes"] > 0
    plan = make_plan(tmp_path / "src", PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=32), progress=False)
    plan.save(tmp_path / "plan.json")
    out = quantize_checkpoint(tmp_path / "src", tmp_path / "plan.json", tmp_path / "q", progress=False)
    first = hashes(out)
    shard = out / "model-00001-of-00004.safetensors"
    mtime = shard.stat().st_mtime_ns
    (out / ".model-00002-of-00004.safetensors.abc123.tmp").write_bytes(b"half a shard")  # a killed write
    (out / "model.safetensors").write_bytes(b"stale in-memory output")
    (out / INDEX).unlink()
    quantize_checkpoint(tmp_path / "src", tmp_path / "plan.json", out, progress=False)
    assert shard.stat().st_mtime_ns == mtime, "a finished shard was rewritten instead of skipped"
    assert hashes(out) == first

    # another plan: every shard is redone and the index says so
    plan2 = make_plan(tmp_path / "src", PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=64), progress=False)
    plan2.save(tmp_path / "plan2.json")
    quantize_checkpoint(tmp_path / "src", tmp_path / "plan2.json", out, progress=False)
    second = hashes(out)
    assert second["bitplan.json"] != first["bitplan.json"]
    assert all(second[k] != first[k] for k in first if k.startswith("model-"))
    assert load_quantized(out).moe_export_plan.quantizer.group_size == 64


# The CLI in a child whose shard writes take 0.3 s longer, so that a SIGKILL lands midway for sure.
_SLOW_CLI = textwrap.dedent("""
    import sys, time
    import moe_export.streaming as s
    write = s._write_shard
    s._write_shard = lambda *a: (write(*a), time.sleep(0.3))
    from moe_export.cli import main
    main(sys.argv[1:])
""")


def test_sigkill_midway_then_rerun_is_byte_identical(tmp_path):
    """SIGKILL `moe-export quantize --streaming` after its first shard; rerunning the same command resumes
    (finished shards untouched) and gives the bytes of an uninterrupted run."""
    write_mixtral(tmp_path / "src", num_layers=6, hidden=64, inter=128, experts=8)
    plan = make_plan(tmp_path / "src", PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=32), progress=False)
    plan.save(tmp_path / "plan.json")
    ref = quantize_checkpoint(tmp_path / "src", tmp_path / "plan.json", tmp_path / "ref", progress=False)

    out = tmp_path / "q"
    args = ["quantize", str(tmp_path / "src"), "--plan", str(tmp_path / "plan.json"), "-o", str(out), "--streaming", "-q"]
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_CLI, *args], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while not list(out.glob("model-*.safetensors")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert proc.returncode == -signal.SIGKILL, proc.stdout.read().decode()[-2000:]
    assert done and len(done) < 7 and not (out / INDEX).exists(), f"the run was not interrupted midway: {done}"
    mtimes = {n: (out / n).stat().st_mtime_ns for n in done}

    rerun = CliRunner().invoke(main, args)  # the same command again (in this process: saves a start-up)
    assert rerun.exit_code == 0, rerun.output
    assert {n: (out / n).stat().st_mtime_ns for n in done} == mtimes, "finished shards were redone"
    assert hashes(out) == hashes(ref)


_MEMORY_CHILD = textwrap.dedent("""
    import json, sys, tempfile, torch
    torch.set_num_threads(1)
    from moe_export.plan.methods import PlanConfig, make_plan
    from moe_export.streaming import quantize_checkpoint
    from _synthetic_ckpt import write_mixtral

    def status():
        out = {}
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS"):
                out[k] = int(v.split()[0]) * 1024
        return out

    def reset_peak():
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS (Linux >= 4.0)
            f.write("5")

    src, warm = sys.argv[1], tempfile.mkdtemp()
    cfg = PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=64)
    # warm-up on a tiny checkpoint: lazy imports and first-use allocations are not the run's memory
    write_mixtral(warm + "/src", num_layers=1, hidden=64, inter=128, experts=4)
    make_plan(warm + "/src", cfg, progress=False).save(warm + "/plan.json")
    quantize_checkpoint(warm + "/src", warm + "/plan.json", warm + "/q", progress=False)
    result = {}
    reset_peak(); before = status()
    make_plan(src, cfg, progress=False).save(sys.argv[2])
    result["plan"] = [before["VmRSS"], status()["VmHWM"]]
    reset_peak(); before = status()
    quantize_checkpoint(src, sys.argv[2], sys.argv[3], progress=False)
    result["quantize"] = [before["VmRSS"], status()["VmHWM"]]
    print("RESULT" + json.dumps(result))
""")


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_plan_and_quantize_stream_under_a_memory_cap(tmp_path):
    """A checkpoint ~6x the memory cap (1.5x its largest layer, above the process's warm baseline) is planned
    and quantized with the peak RSS of the run under the cap."""
    info = write_mixtral(tmp_path / "src", num_layers=6, hidden=256, inter=512, experts=16)  # 24 MiB layers, fp32
    layer = info["layer_bytes"]
    cap = 1.5 * layer
    assert info["total_bytes"] > 4 * cap
    res = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tmp_path / "src"), str(tmp_path / "plan.json"),
                          str(tmp_path / "q")], env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(res.stdout.split("RESULT")[1])
    lines = []
    for what, (before, peak) in result.items():
        lines.append(f"{what}: +{(peak - before) / 2**20:.1f} MiB peak over a {before / 2**20:.0f} MiB baseline = "
                     f"{(peak - before) / layer:.2f}x the largest layer ({layer / 2**20:.0f} MiB); checkpoint "
                     f"{info['total_bytes'] / 2**20:.0f} MiB")
    print("\n".join(lines))
    for what, (before, peak) in result.items():
        assert peak - before <= cap, "\n".join(lines)
    assert (tmp_path / "q" / INDEX).is_file()


def test_in_memory_quantize_rerun_is_byte_identical(tmp_path):
    """The non-streaming path (checkpoint.save_quantized) writes the same bytes when the command is rerun."""
    tiny_random_model("MixtralForCausalLM", seed=2).save_pretrained(tmp_path / "src")
    make_plan(tmp_path / "src", PlanConfig(avg_bits=2.5, levels=[3, 2], group_size=32), progress=False).save(
        tmp_path / "plan.json")
    runs = []
    for out in ("a", "b"):
        res = CliRunner().invoke(main, ["quantize", str(tmp_path / "src"), "--plan", str(tmp_path / "plan.json"),
                                        "-o", str(tmp_path / out), "--no-streaming", "-q"])
        assert res.exit_code == 0, res.output
        runs.append(hashes(tmp_path / out))
    assert runs[0] == runs[1]
    assert "model.safetensors" in runs[0]
