"""Bad input through the CLI: one clear error naming the file or field and the fix, a non-zero exit code,
and nothing partial left behind. Full disk and read-only output use a real tmpfs when this process may
mount one (root), else the failing call is simulated; each test says which it ran."""

from __future__ import annotations

import errno
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moe_export.cli import main
from moe_export.plan.bitplan import BitPlan, BitPlanError
from moe_export.streaming import INDEX, quantize_checkpoint

from _synthetic_ckpt import write_mixtral


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    root = tmp_path_factory.mktemp("robust")
    write_mixtral(root / "src", num_layers=2, hidden=64, inter=128, experts=4)
    write_mixtral(root / "other", num_layers=2, hidden=64, inter=128, experts=4, seed=5)
    write_mixtral(root / "src6", num_layers=2, hidden=64, inter=128, experts=6, seed=1)
    for name in ("src", "other"):
        res = CliRunner().invoke(main, ["plan", str(root / name), "--avg-bits", "2.5", "--group-size", "32", "-q",
                                        "-o", str(root / f"plan_{name}.json")])
        assert res.exit_code == 0, res.output
    return root


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_clean_failure(res, *needles, absent=()):
    """Exit code != 0, a click error (not a traceback) with every needle in it, and no output left."""
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"unhandled {type(res.exception).__name__}: {res.exception}")
    assert "Error:" in res.output, res.output
    msg = res.output.split("Error:", 1)[1]
    for n in needles:
        assert str(n) in msg, f"{n!r} not in error: {msg}"
    for p in absent:
        assert not Path(p).exists(), f"{p} left behind after a failed run: {sorted(os.listdir(p)) if Path(p).is_dir() else ''}"
    return msg


def _copy(ws, name, to):
    dst = ws / to
    if not dst.exists():
        shutil.copytree(ws / name, dst)
    return dst


def test_truncated_safetensors(ws):
    src = _copy(ws, "src", "trunc")
    f = src / "layer-001.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_clean_failure(cli("quantize", src, "--plan", ws / "plan_src.json", "-o", ws / "q_trunc", "--streaming", "-q"),
                         f, "truncated", "re-create", absent=[ws / "q_trunc"])
    assert_clean_failure(cli("plan", src, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", ws / "p_trunc.json"),
                         f, "re-create", absent=[ws / "p_trunc.json"])


@pytest.fixture(scope="module")
def zoo_copy(tiny_zoo_dir, tmp_path_factory):
    """A copy of the tiny zoo build (pretrained/ + finetuned/), its plan and an rtn checkpoint of it."""
    root = tmp_path_factory.mktemp("robust_zoo")
    for which in ("pretrained", "finetuned"):
        shutil.copytree(tiny_zoo_dir / which, root / "zoo" / which)
    for args in (("plan", root / "zoo", "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", root / "plan.json"),
                 ("quantize", root / "zoo", "--plan", root / "plan.json", "--streaming", "-q", "-o", root / "q")):
        res = cli(*args)
        assert res.exit_code == 0, res.output
    return root


def _truncate(f: Path, keep: float = 0.6) -> None:
    f.write_bytes(f.read_bytes()[: int(f.stat().st_size * keep)])


def test_truncated_float_checkpoint_in_memory_and_as_export_float(zoo_copy):
    """The zoo build's finetuned/model.safetensors cut short: the in-memory quantize (gptq and rtn) and
    `export --float` say so in one line that names the file; nothing is written."""
    bad = zoo_copy / "bad"
    shutil.copytree(zoo_copy / "zoo", bad)
    f = bad / "finetuned" / "model.safetensors"
    _truncate(f)
    for quantizer in ("gptq", "rtn"):
        out = zoo_copy / f"q_{quantizer}"
        msg = assert_clean_failure(cli("quantize", bad, "--plan", zoo_copy / "plan.json", "--quantizer", quantizer,
                                       "--no-streaming", "-q", "-o", out), f, "truncated", "re-create", absent=[out])
        assert len(msg.strip().splitlines()) == 1, msg
    out = zoo_copy / "export_bad_float"
    msg = assert_clean_failure(cli("export", zoo_copy / "q", "--float", bad / "finetuned", "-q", "-o", out), f,
                               "truncated", absent=[out])
    assert len(msg.strip().splitlines()) == 1, msg


def test_hand_edited_bitplan_json_in_a_quantized_folder(zoo_copy, tmp_path):
    """The weights follow the plan stored with them: a bitplan.json edited by hand afterwards is reported, not
    silently ignored."""
    q = tmp_path / "q"
    shutil.copytree(zoo_copy / "q", q)
    d = json.loads((q / "bitplan.json").read_text())
    bits = d["layers"][0]["bits"]
    i = next(i for i in range(1, len(bits)) if bits[i] != bits[0])
    bits[0], bits[i] = bits[i], bits[0]  # still a valid plan, same mean: only the stored copy can tell
    (q / "bitplan.json").write_text(json.dumps(d, indent=2))
    out = tmp_path / "export"
    assert_clean_failure(cli("export", q, "--to", "onnx", "-q", "-o", out), q / "bitplan.json", "differs",
                         absent=[out])


def test_corrupt_safetensors_header(ws):
    src = _copy(ws, "src", "corrupt")
    f = src / "layer-000.safetensors"
    b = bytearray(f.read_bytes())
    b[8:40] = b"\x00garbage" * 4
    f.write_bytes(bytes(b))
    assert_clean_failure(cli("quantize", src, "--plan", ws / "plan_src.json", "-o", ws / "q_corrupt", "--streaming", "-q"),
                         f, "corrupt", absent=[ws / "q_corrupt"])
    assert_clean_failure(cli("plan", src, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", ws / "p_corrupt.json"), f,
                         absent=[ws / "p_corrupt.json"])


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_plan_made_for_another_model(ws, streaming):
    out = ws / f"q_other{streaming}"
    assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_other.json", "-o", out, streaming, "-q"),
                         "another checkpoint", "re-plan", absent=[out])


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_plan_for_another_model_names_it_and_a_command_line_way_out(ws, tmp_path, streaming):
    out = tmp_path / "q"
    msg = assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_other.json", "-o", out, streaming, "-q"),
                               ws / "plan_other.json", "MixtralForCausalLM 'other'", "another checkpoint", "re-plan",
                               absent=[out])
    assert "check_router" not in msg  # a Python argument the command line does not have
    # way out 1: the command it spells out, run as given
    replan = re.search(r"`(moe-export plan [^`]+)`", msg).group(1).replace("NEW_PLAN.json", str(tmp_path / "new.json"))
    assert cli(*shlex.split(replan)[1:]).exit_code == 0
    res = cli("quantize", ws / "src", "--plan", tmp_path / "new.json", "-o", out, streaming, "-q")
    assert res.exit_code == 0, res.output
    # way out 2: the edit it names, to apply the plan to these weights on purpose
    assert '"router_sha256": ""' in msg
    d = json.loads((ws / "plan_other.json").read_text())
    d["model"]["router_sha256"] = ""
    (tmp_path / "anyway.json").write_text(json.dumps(d))
    res = cli("quantize", ws / "src", "--plan", tmp_path / "anyway.json", "-o", tmp_path / "q2", streaming, "-q")
    assert res.exit_code == 0, res.output


def test_expert_count_error_before_the_mean_error(ws, tmp_path):
    """A plan whose layer lists one expert too few: the expert count is the error, not the mean it throws off."""
    d = json.loads((ws / "plan_src.json").read_text())
    del d["layers"][1]["bits"][-1], d["layers"][1]["num_experts"]
    (tmp_path / "short.json").write_text(json.dumps(d))
    for streaming in ("--streaming", "--no-streaming"):
        msg = assert_clean_failure(cli("quantize", ws / "src", "--plan", tmp_path / "short.json", "-o", tmp_path / "q",
                                       streaming, "-q"),
                                   "short.json", "model.layers.1.mlp", "plan has 3 experts, model has 4",
                                   absent=[tmp_path / "q"])
        assert "mean" not in msg


def test_nan_and_inf_weights(ws):
    # NaN in the last layer's expert: found after the first shards were written, which are removed again
    bad = ws / "nan"
    write_mixtral(bad, num_layers=2, hidden=64, inter=128, experts=4,
                  poison=("model.layers.1.block_sparse_moe.experts.2.w2.weight", float("nan")))
    plan = BitPlan.load(ws / "plan_src.json")
    plan.model["router_sha256"] = ""  # same layers, other weights: let the run reach the poisoned tensor
    plan.save(ws / "plan_nohash.json")
    assert_clean_failure(cli("quantize", bad, "--plan", ws / "plan_nohash.json", "-o", ws / "q_nan", "--streaming", "-q"),
                         "model.layers.1.block_sparse_moe.experts.2.w2.weight", "NaN/Inf", "re-export", absent=[ws / "q_nan"])
    inf = ws / "inf"
    write_mixtral(inf, num_layers=2, hidden=64, inter=128, experts=4,
                  poison=("model.layers.0.block_sparse_moe.gate.weight", float("inf")))
    assert_clean_failure(cli("plan", inf, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", ws / "p_inf.json"),
                         "model.layers.0.mlp", "NaN/Inf", absent=[ws / "p_inf.json"])
    w1 = ws / "nan_w1"
    write_mixtral(w1, num_layers=2, hidden=64, inter=128, experts=4,
                  poison=("model.layers.1.block_sparse_moe.experts.3.w1.weight", float("nan")))
    assert_clean_failure(cli("plan", w1, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", ws / "p_nan.json"),
                         "model.layers.1.mlp", "[3]", "NaN/Inf", absent=[ws / "p_nan.json"])


def test_unsupported_architecture(ws):
    src = _copy(ws, "src", "llama")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    for args, out in ((("plan", src, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", ws / "p_llama.json"), ws / "p_llama.json"),
                      (("quantize", src, "--plan", ws / "plan_src.json", "-o", ws / "q_llama", "--streaming", "-q"),
                       ws / "q_llama")):
        assert_clean_failure(cli(*args), "LlamaForCausalLM", "MixtralForCausalLM", "add an adapter", absent=[out])


@pytest.mark.parametrize("bits", [0, 9])
def test_bits_outside_1_to_8(ws, bits):
    res = cli("plan", ws / "src", "--avg-bits", "2.5", "--levels", f"{bits},2", "-q", "-o", ws / "p_bits.json")
    assert res.exit_code == 2 and "--levels" in res.output and "1..8" in res.output, res.output
    assert not (ws / "p_bits.json").exists()
    d = json.loads((ws / "plan_src.json").read_text())
    d["layers"][1]["bits"][2] = bits
    (ws / f"p_bits{bits}.json").write_text(json.dumps(d))
    assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / f"p_bits{bits}.json", "-o", ws / "q_bits",
                             "--streaming", "-q"),
                         f"p_bits{bits}.json", "model.layers.1.mlp", "expert 2", f"{bits} bits", "1-8", absent=[ws / "q_bits"])


def test_group_size_not_dividing_the_dim(ws):
    assert_clean_failure(cli("plan", ws / "src", "--avg-bits", "2.5", "--group-size", "48", "-q", "-o", ws / "p_g.json"),
                         "group size 48", "input dim 64", "--group-size", absent=[ws / "p_g.json"])
    d = json.loads((ws / "plan_src.json").read_text())
    d["quantizer"]["group_size"] = 48
    (ws / "p_g48.json").write_text(json.dumps(d))
    assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "p_g48.json", "-o", ws / "q_g", "--streaming", "-q"),
                         "p_g48.json", "group size 48", absent=[ws / "q_g"])


def test_default_group_size_fits_the_model(ws, tmp_path):
    """Without --group-size, plan takes the largest of 128/64/32/16 dividing every expert input dim, and says so."""
    res = cli("plan", ws / "src", "--avg-bits", "2.5", "--levels", "3,2", "-q", "-o", tmp_path / "p.json")
    assert res.exit_code == 0, res.output
    assert BitPlan.load(tmp_path / "p.json").quantizer.group_size == 64  # hidden 64, expert intermediate 128
    assert "group size 64" in res.output and "(64, 128)" in res.output and "--group-size" in res.output
    write_mixtral(tmp_path / "m96", num_layers=1, hidden=96, inter=192, experts=4)
    res = cli("plan", tmp_path / "m96", "--avg-bits", "2.5", "-q", "-o", tmp_path / "p96.json")
    assert res.exit_code == 0 and BitPlan.load(tmp_path / "p96.json").quantizer.group_size == 32, res.output
    write_mixtral(tmp_path / "m40", num_layers=1, hidden=40, inter=80, experts=4)
    assert_clean_failure(cli("plan", tmp_path / "m40", "--avg-bits", "2.5", "-q", "-o", tmp_path / "p40.json"),
                         "(40, 80)", "--group-size", absent=[tmp_path / "p40.json"])
    # an explicit size is kept as given, the plan byte-identical to one made before the default existed
    res = cli("plan", ws / "src", "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", tmp_path / "p32.json")
    assert res.exit_code == 0 and "group size" not in res.output
    assert (tmp_path / "p32.json").read_bytes() == (ws / "plan_src.json").read_bytes()


def test_reference_with_another_expert_count(ws):
    assert_clean_failure(cli("plan", ws / "src", "--avg-bits", "2.5", "--group-size", "32", "--reference", ws / "src6", "-q", "-o", ws / "p_ref.json"),
                         str(ws / "src6"), "(6, 64)", "(4, 64)", "expert count", absent=[ws / "p_ref.json"])


def test_streaming_refuses_a_calibrated_quantizer(ws):
    assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_src.json", "--quantizer", "gptq", "-o",
                             ws / "q_gptq", "--streaming", "-q"), "gptq", "data-free", absent=[ws / "q_gptq"])


@pytest.mark.parametrize("damage", ["truncated", "nan", "llama"])
def test_run_recipe_on_a_bad_local_model(ws, tmp_path, damage):
    """`moe-export run` of a recipe whose model.path is damaged: one line naming the problem, exit 1, and no
    work folder left behind."""
    model = tmp_path / "model"
    if damage == "nan":
        write_mixtral(model, num_layers=2, hidden=64, inter=128, experts=4,
                      poison=("model.layers.1.block_sparse_moe.experts.2.w2.weight", float("nan")))
        needles = ("NaN/Inf", "re-export")
    else:
        shutil.copytree(ws / "src", model)
        if damage == "truncated":
            _truncate(model / "layer-001.safetensors", 0.9)
            needles = (model / "layer-001.safetensors", "truncated")
        else:
            cfg = json.loads((model / "config.json").read_text())
            cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
            (model / "config.json").write_text(json.dumps(cfg))
            needles = ("LlamaForCausalLM", "add an adapter")
    recipe = {"format": "moe_export.recipe", "version": 1, "name": "bad", "model": {"path": str(model)},
              "plan": {"method": "router+maxvar", "levels": [3, 2], "avg_bits": 2.5},
              "quantizer": {"name": "rtn", "group_size": 32, "symmetric": False},
              "export": {"targets": ["pte", "onnx"], "pte_modes": ["packed"], "onnx_modes": ["packed"]}}
    (tmp_path / "bad.json").write_text(json.dumps(recipe))
    res = cli("run", tmp_path / "bad.json", "-o", tmp_path / "work", "-q")
    msg = assert_clean_failure(res, *needles, absent=[tmp_path / "work"])
    assert res.exit_code == 1 and len(msg.strip().splitlines()) == 1, msg


@pytest.mark.parametrize("quantizer,streaming", [("rtn", "--streaming"), ("hqq", "--streaming"), ("rtn", "--no-streaming"),
                                                 ("hqq", "--no-streaming"), ("gptq", "--no-streaming")])
def test_nan_weight_with_each_quantizer(ws, tmp_path, quantizer, streaming):
    bad = tmp_path / "nan"
    write_mixtral(bad, num_layers=2, hidden=64, inter=128, experts=4,
                  poison=("model.layers.1.block_sparse_moe.experts.2.w2.weight", float("nan")))
    d = json.loads((ws / "plan_src.json").read_text())
    d["model"]["router_sha256"] = ""  # same layers, other weights: let the run reach the poisoned tensor
    (tmp_path / "plan.json").write_text(json.dumps(d))
    msg = assert_clean_failure(cli("quantize", bad, "--plan", tmp_path / "plan.json", "--quantizer", quantizer, streaming,
                                   "-q", "-o", tmp_path / "q"), "NaN/Inf", "re-export", absent=[tmp_path / "q"])
    assert "experts.2.w2" in msg or "experts.down_proj (experts [2])" in msg, msg  # disk name, or model name + expert


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_output_is_the_input(ws, zoo_copy):
    src = _copy(ws, "src", "same")
    before = _tree(src)
    for streaming in ("--streaming", "--no-streaming"):
        assert_clean_failure(cli("quantize", src, "--plan", ws / "plan_src.json", "-o", src, streaming, "-q"),
                             str(src), "is the folder the model is read from", "-o")
    assert _tree(src) == before  # the float checkpoint is untouched (the in-memory path used to overwrite it)
    # a zoo build folder: neither the build nor its finetuned/ may be the output
    for out in (zoo_copy / "zoo", zoo_copy / "zoo" / "finetuned"):
        assert_clean_failure(cli("quantize", zoo_copy / "zoo", "--plan", zoo_copy / "plan.json", "-o", out,
                                 "--no-streaming", "-q"), "-o")
    q = zoo_copy / "q"
    before = _tree(q)
    assert_clean_failure(cli("export", q, "--to", "onnx", "-o", q, "-q"), str(q), "read from")
    assert _tree(q) == before


def test_existing_non_empty_output_folder(ws, zoo_copy, tmp_path):
    """A folder holding other files (or another model) is refused before any work and left as it was; a
    finished output of the same command is replaced."""
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for streaming in ("--streaming", "--no-streaming"):
        assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_src.json", "-o", other, streaming, "-q"),
                             str(other), "not empty", "notes.txt", "new or empty folder")
    assert_clean_failure(cli("export", zoo_copy / "q", "--to", "onnx", "-o", other, "-q"), "not empty", "notes.txt")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    # another model's checkpoint folder as the output: refused, not overwritten
    floats = _copy(ws, "other", "other_as_output")
    before = _tree(floats)
    assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_src.json", "-o", floats, "--no-streaming", "-q"),
                         "not empty", "config.json")
    assert _tree(floats) == before
    # its own finished output, streamed or in memory, is replaced as a whole: never a mix of the two
    out = tmp_path / "q"
    for streaming in ("--streaming", "--no-streaming", "--streaming"):
        res = cli("quantize", ws / "src", "--plan", ws / "plan_src.json", "-o", out, streaming, "-q")
        assert res.exit_code == 0, res.output
        names = sorted(p.name for p in out.iterdir())
        weights = [n for n in names if n.endswith(".safetensors")]
        if streaming == "--streaming":
            assert "model.safetensors" not in names and INDEX in names, names
        else:
            assert weights == ["model.safetensors"] and INDEX not in names, names
        assert not [n for n in names if n.startswith(".")], names  # no lock or temp file left


def test_second_run_on_a_folder_in_use(ws, zoo_copy, tmp_path):
    from moe_export.io import output_lock

    out = tmp_path / "busy"
    with output_lock(out):  # another run holds the folder
        for streaming in ("--streaming", "--no-streaming"):
            assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_src.json", "-o", out, streaming, "-q"),
                                 str(out), "another moe-export run")
        assert_clean_failure(cli("export", zoo_copy / "q", "--to", "onnx", "-o", out, "-q"), "another moe-export run")
        assert [p.name for p in out.iterdir()] == [".moe_export.lock"]
    assert not out.exists()  # the holder created it and left nothing in it


def _quantize_cmd(src, plan, out, *extra):
    return [sys.executable, "-m", "moe_export", "quantize", str(src), "--plan", str(plan), "-o", str(out), "-q", *extra]


def test_two_runs_writing_one_folder_at_once(tmp_path):
    """Two processes, two plans, one output folder at the same time: one wins (or they run one after the other),
    the loser fails in one line, and the folder is exactly one plan's output, never a mix."""
    src = tmp_path / "src"
    write_mixtral(src, num_layers=4, hidden=128, inter=256, experts=8)
    plans = []
    for i, bits in enumerate(("2.5", "3")):
        p = tmp_path / f"plan{i}.json"
        assert cli("plan", src, "--avg-bits", bits, "--levels", "4,3,2", "--group-size", "32", "-q", "-o", p).exit_code == 0
        plans.append(p)
    refs = [quantize_checkpoint(src, p, tmp_path / f"ref{i}", progress=False) for i, p in enumerate(plans)]
    out = tmp_path / "out"
    procs = [subprocess.Popen(_quantize_cmd(src, p, out, "--streaming"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for p in plans]
    results = [(p.wait(timeout=600), p.stdout.read() + p.stderr.read()) for p in procs]
    assert any(rc == 0 for rc, _ in results), results
    for rc, text in results:
        assert rc in (0, 1), text
        if rc:
            assert "another moe-export run" in text and "Traceback" not in text, text
    got = _tree(out)
    assert any(got == _tree(r) for r in refs), sorted(got)


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_sigkill_mid_run_then_rerun(tmp_path, streaming):
    """kill -9 in the middle of a quantize, then the same command again: it resumes (streaming: finished shards
    are kept) or restarts, and gives the bytes of a run that was never interrupted."""
    import signal
    import time

    src = tmp_path / "src"
    write_mixtral(src, num_layers=6, hidden=128, inter=256, experts=8)
    plan = tmp_path / "plan.json"
    assert cli("plan", src, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", plan).exit_code == 0
    ref = tmp_path / "ref"
    subprocess.run(_quantize_cmd(src, plan, ref, streaming), check=True, capture_output=True, timeout=600)
    out = tmp_path / "out"
    proc = subprocess.Popen(_quantize_cmd(src, plan, out, streaming), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once the run holds its output folder (streaming: after its first shard), before it finishes
    first = "model-00001-of-*.safetensors" if streaming == "--streaming" else ".moe_export.lock"
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and not (out.is_dir() and list(out.glob(first))):
        time.sleep(0.01)
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print("killed mid-run:", killed, "left:", sorted(p.name for p in out.iterdir()) if out.is_dir() else None)
    res = subprocess.run(_quantize_cmd(src, plan, out, streaming), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert _tree(out) == _tree(ref)


# ------------------------------------------------------------------------------ read-only output, full disk


def _mount_tmpfs(where: Path, opts: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_output_folder_not_writable(ws, monkeypatch):
    ro = ws / "ro"
    mounted = _mount_tmpfs(ro, "ro,size=64k")
    try:
        if not mounted:
            if os.geteuid() != 0:
                ro.chmod(0o555)  # a real permission error for a normal user
            else:  # root without mount rights: simulate the refusal of the filesystem
                real = os.access
                monkeypatch.setattr(os, "access", lambda p, m, **k: False if str(p).startswith(str(ro)) else real(p, m, **k))
                real_mkstemp = __import__("tempfile").mkstemp

                def mkstemp(*a, dir=None, **k):
                    if str(dir).startswith(str(ro)):
                        raise PermissionError(errno.EACCES, "Permission denied", str(dir))
                    return real_mkstemp(*a, dir=dir, **k)

                monkeypatch.setattr("tempfile.mkstemp", mkstemp)
        print("read-only output:", "tmpfs mounted ro" if mounted else "chmod 555 / simulated")
        assert_clean_failure(cli("quantize", ws / "src", "--plan", ws / "plan_src.json", "-o", ro / "q", "--streaming", "-q"),
                             str(ro), "-o")
        assert_clean_failure(cli("plan", ws / "src", "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", ro / "plan.json"), str(ro / "plan.json"))
        assert sorted(os.listdir(ro)) == []
    finally:
        if mounted:
            _umount(ro)
        else:
            ro.chmod(0o755)


def test_full_disk_then_resume(ws, monkeypatch, tmp_path):
    """ENOSPC midway: one clear error, no temp file, no index, finished shards intact; after space is freed the
    same command resumes and gives the bytes of a run that never failed."""
    src = tmp_path / "big"
    write_mixtral(src, num_layers=4, hidden=128, inter=256, experts=8)
    r = cli("plan", src, "--avg-bits", "2.5", "--group-size", "32", "-q", "-o", tmp_path / "plan.json")
    assert r.exit_code == 0, r.output
    ref = quantize_checkpoint(src, tmp_path / "plan.json", tmp_path / "ref", progress=False)
    total = sum(p.stat().st_size for p in ref.iterdir())
    disk = tmp_path / "disk"
    mounted = _mount_tmpfs(disk, f"size={total // 2}")
    try:
        if not mounted:  # simulate: the third shard write hits a full disk
            import moe_export.io as mio

            real, calls = mio.save_safetensors, []

            def full(tensors, path, metadata=None):
                calls.append(path)
                if len(calls) == 3:
                    with mio.atomic_path(path) as tmp:
                        tmp.write_bytes(b"x" * 100)
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                return real(tensors, path, metadata)

            monkeypatch.setattr(mio, "save_safetensors", full)
        print("full disk:", f"tmpfs of {total // 2} bytes" if mounted else "simulated ENOSPC on the third shard")
        out = disk / "q"
        args = ("quantize", src, "--plan", tmp_path / "plan.json", "-o", out, "--streaming", "-q")
        msg = assert_clean_failure(cli(*args), "No space left on device", "rerun the same command")
        assert "model-" in msg  # names the shard it was writing
        left = sorted(p.name for p in out.iterdir())
        assert left and all(n.startswith("model-0") for n in left), left  # no .tmp, no index
        from safetensors import safe_open

        for n in left:  # what is there is complete
            with safe_open(str(out / n), framework="pt") as f:
                for k in f.keys():
                    f.get_tensor(k)
        if mounted:
            subprocess.run(["mount", "-o", f"remount,size={4 * total}", str(disk)], check=True)
        else:
            monkeypatch.undo()
        res = cli(*args)
        assert res.exit_code == 0, res.output
        assert {p.name: p.read_bytes() for p in out.iterdir()} == {p.name: p.read_bytes() for p in ref.iterdir()}
    finally:
        if mounted:
            _umount(disk)


# ------------------------------------------------------------------------------------------------- fuzz

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 300) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
_FIELDS = [("format",), ("version",), ("model",), ("model", "router_sha256"), ("target_avg_bits",), ("levels",),
           ("quantizer",), ("quantizer", "name"), ("quantizer", "group_size"), ("quantizer", "symmetric"), ("layers",),
           ("layers", 0), ("layers", 0, "name"), ("layers", 0, "bits"), ("layers", 0, "bits", 1), ("layers", 0, "num_experts"),
           ("layers", 0, "in_dims"), ("non_expert",), ("non_expert", "attention"), ("provenance",)]


def _valid_plan_dict() -> dict:
    return {"format": "moe_export.bitplan", "version": 1,
            "model": {"name": "m", "architecture": "MixtralForCausalLM", "router_sha256": ""},
            "target_avg_bits": 2.5, "levels": [3, 2], "quantizer": {"name": "rtn", "group_size": 32, "symmetric": False},
            "layers": [{"name": "model.layers.0.mlp", "num_experts": 4, "bits": [3, 2, 3, 2], "in_dims": [64, 128]}],
            "non_expert": {"attention": "float"}, "provenance": {}}


def _loads_or_bitplan_error(text: str) -> None:
    try:
        plan = BitPlan.from_json(text, source="fuzz.json")
    except BitPlanError as err:
        assert str(err).startswith("fuzz.json: "), err  # names the file
        return
    plan.validate()
    assert BitPlan.from_json(plan.to_json()).to_json() == plan.to_json()  # what loads, round-trips


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_json)
def test_fuzz_bitplan_loader_arbitrary_json(doc):
    _loads_or_bitplan_error(json.dumps(doc))


@settings(max_examples=200, deadline=None)
@given(field=st.sampled_from(_FIELDS), value=_json, delete=st.booleans())
def test_fuzz_bitplan_loader_mutated_plan(field, value, delete):
    d = _valid_plan_dict()
    node = d
    for k in field[:-1]:
        node = node[k]
    if delete and isinstance(node, dict):
        node.pop(field[-1], None)
    else:
        node[field[-1]] = value
    _loads_or_bitplan_error(json.dumps(d))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_cli_arguments(ws, data):
    """Any mix of known options and junk values: exit 0, 1 or 2 with a message, never a traceback."""
    sub = data.draw(st.sampled_from(["plan", "quantize"]))
    values = st.sampled_from(["2.5", "3", "0", "-1", "9", "3,2", "3,,2", "x", "none", "32", "48", "", "1e9", "nan",
                              str(ws / "src"), str(ws / "plan_src.json"), str(ws / "nope")])
    if sub == "plan":
        opts = ["--avg-bits", "--levels", "--method", "--group-size", "--zeta", "--seed", "--reference", "--quantizer"]
        args = ["plan", str(ws / "src"), "-q", "-o", str(ws / "fuzz" / "p.json")]
    else:
        opts = ["--plan", "--quantizer", "--calib-tokens"]
        args = ["quantize", str(ws / "src"), "--streaming", "-q", "-o", str(ws / "fuzz" / "q")]
    for _ in range(data.draw(st.integers(0, 4))):
        args += [data.draw(st.sampled_from(opts)), data.draw(values)]
    if data.draw(st.booleans()):
        args.insert(data.draw(st.integers(1, len(args))), data.draw(values))
    res = CliRunner().invoke(main, args)
    assert res.exit_code in (0, 1, 2), (args, res.output)
    assert res.exception is None or isinstance(res.exception, SystemExit), (args, repr(res.exception))
    if res.exit_code:
        assert "Error" in res.output or "Usage" in res.output, (args, res.output)
    shutil.rmtree(ws / "fuzz", ignore_errors=True)
