"""What a newcomer sees between the README's commands: no library noise around our output, tables whose
headers sit over their own columns, progress bars that leave no cleared line behind."""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import warnings

import pytest
from click.testing import CliRunner

from moe_export.cli import main

from _synthetic_ckpt import write_mixtral


def _columns(header: str, line: str, names) -> None:
    """Every header is two or more spaces from the previous one, and ends where its right-aligned cell ends."""
    for name in names:
        start = header.index(name)
        assert start == 0 or header[start - 2:start] == "  ", f"{name!r} runs into its neighbour: {header!r}"
        end = start + len(name)
        assert line[end - 1] != " " and (end == len(line) or line[end] == " "), (
            f"cell under {name!r} does not end where its header does:\n{header}\n{line}")


def test_export_table_headers_over_their_columns():
    from moe_export.export.pipeline import format_report

    parity = {"max_abs_err_vs_eager": 3.3e-6, "sqnr_vs_eager_db": 132.5, "sqnr_vs_float_db": 21.2,
              "greedy_match": 32, "greedy_len": 32}
    report = {"theoretical": {"total": 8e5, "packed": 1.7e5},
              "artifacts": [{"path": "out/model-packed.pte", "bytes": 900000, "size_vs_theoretical": 1.126,
                             "parity": parity, "decode_ms": 5.95},
                            {"path": "out/float.onnx", "bytes": 2234000, "decode_ms": 0.22}]}
    header, rule, packed, float_row, theory = format_report(report).splitlines()
    assert set(rule) == {"-"} and len(rule) == len(header)
    names = ("MB", "vs theory", "max|err| vs eager", "SQNR vs eager", "SQNR vs float", "greedy match", "decode ms")
    _columns(header, packed, names)
    _columns(header, float_row, names)
    assert packed[header.index("greedy match"):].split()[0] == "32/32"
    assert theory.startswith("theoretical size")


def test_recipe_summary_headers_over_their_columns():
    from moe_export.pipeline import format_summary

    s = {"quantized": {"float_bytes": 2.2e6, "bytes": 8e5, "path": "runs/q", "theoretical_bytes": 8e5},
         "model": "runs/tiny/finetuned", "plan": {"mean_bits": 2.5}, "latency_ms": {"float eager": 1.0},
         "compile": {"max_abs_err_vs_eager": 1e-6, "sqnr_vs_float_db": 21.0}, "work_dir": "runs/x", "wall_s": 1.0,
         "export": {"artifacts": [{"target": "pte", "mode": "packed", "bytes": 9e5, "decode_ms": 5.0, "path": "a.pte",
                                   "parity": {"max_abs_err_vs_eager": 3e-6, "sqnr_vs_float_db": 21.2}}]}}
    lines = format_summary(s).splitlines()
    header = lines[0]
    for row in lines[2:6]:
        _columns(header, row, ("bits", "MB", "vs float", "max|err| vs eager", "SQNR dB", "decode ms"))


def test_plan_progress_leaves_no_cleared_line(tmp_path):
    write_mixtral(tmp_path / "m", num_layers=2, hidden=64, inter=128, experts=4)
    # a fresh process with both streams in one unbuffered pipe: what a terminal or a log file receives, in order
    res = subprocess.run([sys.executable, "-m", "moe_export", "plan", str(tmp_path / "m"), "--avg-bits", "2.5",
                          "--group-size", "32", "-o", str(tmp_path / "p.json")], stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=300)
    out = res.stdout.decode()  # not text=True: that would turn every carriage return into a newline
    assert res.returncode == 0, out
    # a bar cleared with spaces stays a blank line in a log, and the next output starts after it on that line
    assert not re.search(r"\r *\r", out), repr(out)
    assert any(line.startswith("layer ") for line in out.split("\n")), repr(out)


def test_exporting_silences_only_the_leaf_spec_deprecation():
    from torch.utils._pytree import tree_flatten

    from moe_export.quiet import exporting

    spec = tree_flatten([1, (2, 3)])[1]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        copy.deepcopy(spec)  # what torch.export and ExecuTorch do to an exported program's specs
    assert any("LeafSpec" in str(w.message) for w in seen)  # still reaches a caller outside our export calls
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with exporting():
            copy.deepcopy(spec)
            warnings.warn("something else", FutureWarning)
    assert [str(w.message) for w in seen] == ["something else"]


def test_executorch_first_run_drops_only_the_cpu_probe_lines(capfd):
    from moe_export.quiet import executorch_first_run

    with executorch_first_run():
        os.write(2, b"[cpuinfo_utils.cpp:87] Failed to open midr file /sys/devices/soc0/image_version\n")
        os.write(2, b"[method.cpp:1234] a real runtime error\n")
    assert capfd.readouterr().err == "[method.cpp:1234] a real runtime error\n"


def test_export_prints_no_library_noise(tmp_path):
    """The README's export step on a small quantized model, in a fresh process: stderr holds none of the
    libraries' warnings or log lines (LeafSpec FutureWarning, ExecuTorch's cpuinfo probe)."""
    import torch

    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.checkpoint import save_quantized
    from moe_export.model_configs import tiny_random_model
    from moe_export.models import find_moe_layers
    from moe_export.plan.bitplan import BitPlan

    torch.manual_seed(0)
    model = tiny_random_model("MixtralForCausalLM", seed=0, num_hidden_layers=1).eval()
    plan = BitPlan.uniform(find_moe_layers(model), 4, group_size=32)
    quantize_(model, MoEQuantConfig(plan=plan), progress=False)
    qdir = save_quantized(model, tmp_path / "q", plan=plan)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters, as a user has them
    res = subprocess.run([sys.executable, "-m", "moe_export", "export", str(qdir), "--to", "pte,onnx", "-o",
                          str(tmp_path / "out"), "--max-seq-len", "48", "--no-latency", "-q"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    for noise in ("Warning", "LeafSpec", "cpuinfo", "midr", "Writing model shards"):
        assert noise not in res.stderr, res.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "export_report.json").read_text())
    assert all(r["parity_ok"] for r in report["artifacts"])


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_atomic_dir_follows_the_umask(tmp_path, umask):
    from moe_export.io import atomic_dir

    old = os.umask(umask)
    try:
        with atomic_dir(tmp_path / "ck") as tmp:
            (tmp / "sub").mkdir()
            (tmp / "model.safetensors").write_bytes(b"x")
            os.chmod(tmp / "model.safetensors", 0o600)  # what a library's own temp-file-and-rename leaves
    finally:
        os.umask(old)
    assert (tmp_path / "ck").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "ck" / "sub").stat().st_mode & 0o777 == 0o777 & ~umask
    assert (tmp_path / "ck" / "model.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temporary folder left
