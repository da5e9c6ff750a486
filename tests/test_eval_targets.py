"""`moe-export eval` scores exactly what it is given, and `from_pretrained` loads what `quantize` wrote.

The quantized folder's numbers must be the quantized model's (not a model with some weights initialised at
random), its exported artifacts must score like it, and any load that leaves a weight missing or unused fails.
"""

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from moe_export.cli import main

EVAL_ARGS = ["--max-tokens", "2048", "--n-cloze", "20", "-q", "--corpus", "python-stdlib"]


@pytest.fixture(scope="module")
def quantized(tiny_zoo_dir, tmp_path_factory):
    """The tiny zoo model at 2.5 bits (3/2, g32, rtn): in memory, and as the folder `moe-export quantize` writes."""
    from moe_export.api import MoEQuantConfig, quantize_
    from moe_export.checkpoint import save_quantized
    from moe_export.hf import load_pretrained
    from moe_export.plan.methods import PlanConfig, make_plan

    out = tmp_path_factory.mktemp("eval_targets")
    plan = make_plan(tiny_zoo_dir, PlanConfig(avg_bits=2.5, levels=(3, 2), group_size=32), progress=False)
    model = load_pretrained(tiny_zoo_dir / "finetuned")
    quantize_(model, MoEQuantConfig(plan), progress=False)
    qdir = save_quantized(model, out / "q", source_dir=tiny_zoo_dir / "finetuned")
    return dict(model=model, qdir=qdir, out=out, plan=plan)


def _eval(tmp_path, *args) -> dict:
    out = tmp_path / f"e{len(list(tmp_path.glob('e*.json')))}.json"
    r = CliRunner().invoke(main, ["eval", *map(str, args), *EVAL_ARGS, "--json", str(out)])
    assert r.exit_code == 0, r.output
    return json.loads(out.read_text())


def _bpb(res: dict) -> float:
    return res["results"]["python-stdlib"]["bpb"]["bits_per_byte"]


def test_eval_of_quantized_folder_is_the_quantized_model(quantized, tiny_zoo_dir, tmp_path):
    from moe_export.eval import evaluate, logits_fn_for
    from moe_export.hf import load_quantized
    from moe_export.zoo.folders import load

    res = _eval(tmp_path, quantized["qdir"], "--against", tiny_zoo_dir)
    assert res["kind"] == "quantized" and res["against"]["kind"] == "float"
    _, tok = load(tiny_zoo_dir)
    # the in-memory quantized model and the folder through load_quantized: the same numbers to the last bit
    for m in (quantized["model"], load_quantized(quantized["qdir"])):
        direct = evaluate(logits_fn_for(m), tok, ["python-stdlib"], 64, 2048, 20, progress=False)
        assert direct["python-stdlib"] == res["results"]["python-stdlib"]
    # 2.5-bit plan: measured +0.5% bpb over float; random experts are about 20% off
    change = res["change"]["python-stdlib"]["bpb_rel"]
    assert abs(change) < 0.05 and change == pytest.approx(_bpb(res) / _bpb(res["against"]) - 1)


def test_planted_random_experts_are_seen(quantized, tmp_path):
    """Replace every expert's packed codes by random bytes: eval must score that damage, not something else."""
    from safetensors import safe_open

    from moe_export.checkpoint import WEIGHTS_NAME
    from moe_export.io import save_safetensors

    src = quantized["qdir"]
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    g = torch.Generator().manual_seed(0)
    with safe_open(str(src / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    planted = 0
    for k, t in tensors.items():
        if ".experts." in k and ".packed_" in k:
            tensors[k] = torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=g)
            planted += 1
    assert planted >= 4
    save_safetensors(tensors, bad / WEIGHTS_NAME, meta)
    good, broken = _eval(tmp_path, src), _eval(tmp_path, bad)
    assert _bpb(broken) > 1.1 * _bpb(good)


def test_weights_that_do_not_fit_fail_in_one_line(quantized, tmp_path):
    from safetensors import safe_open

    from moe_export.checkpoint import WEIGHTS_NAME
    from moe_export.io import save_safetensors

    src = quantized["qdir"]
    with safe_open(str(src / WEIGHTS_NAME), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    # a float weight the file lacks: transformers alone would initialise it at random and warn
    missing = tmp_path / "missing"
    shutil.copytree(src, missing)
    save_safetensors({k: v for k, v in tensors.items() if not k.endswith("input_layernorm.weight")},
                     missing / WEIGHTS_NAME, meta)
    # a tensor the model has no place for
    extra = tmp_path / "extra"
    shutil.copytree(src, extra)
    save_safetensors({**tensors, "model.layers.0.not_a_weight": torch.zeros(3)}, extra / WEIGHTS_NAME, meta)
    # a quantized folder whose config lost its quantization_config: the packed parts fit no float model
    noconf = tmp_path / "noconf"
    shutil.copytree(src, noconf)
    cfg = json.loads((noconf / "config.json").read_text())
    del cfg["quantization_config"]
    (noconf / "config.json").write_text(json.dumps(cfg))
    for folder, words in ((missing, "missing keys"), (extra, "unexpected keys"), (noconf, "missing keys")):
        r = CliRunner().invoke(main, ["eval", str(folder), *EVAL_ARGS])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in r.output and words in lines[0], r.output


def test_from_pretrained_after_import_matches_load_quantized(quantized, tmp_path):
    import transformers

    import moe_export  # noqa: F401  (what teaches transformers quant_method "moe_export")
    from moe_export.checkpoint import encode_model
    from moe_export.hf import load_quantized
    from moe_export.tensors import MixedWidthExpertsTensor

    qdir = quantized["qdir"]
    model = transformers.AutoModelForCausalLM.from_pretrained(qdir)
    assert isinstance(model.model.layers[0].mlp.experts.gate_up_proj, MixedWidthExpertsTensor)
    assert model.config.quantization_config.to_dict()["quant_method"] == "moe_export"
    ref = load_quantized(qdir)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with torch.no_grad():
        logits = model(ids).logits
        assert torch.equal(logits, ref(ids).logits)
        assert torch.equal(logits, quantized["model"](ids).logits)
        compiled = torch.compile(model)
        assert (compiled(ids).logits - logits).abs().max() < 1e-4 * logits.abs().max()
    gen = model.generate(ids[:1, :8], max_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 14)
    # save_pretrained writes a folder that loads again to the same bytes
    model.save_pretrained(tmp_path / "sp")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sp")
    a, b = encode_model(model, model.moe_export_plan)[0], encode_model(again, again.moe_export_plan)[0]
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
    assert again.moe_export_plan.to_json() == quantized["plan"].to_json()


def test_eval_of_exported_artifacts_matches_the_checkpoint(quantized, tmp_path):
    qdir = quantized["qdir"]
    out = quantized["out"] / "export"
    r = CliRunner().invoke(main, ["export", str(qdir), "--to", "pte,onnx", "--pte-mode", "native,packed",
                                  "--onnx-mode", "packed,fast,native", "--no-latency", "-q", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert (out / "tokenizer.json").is_file()  # the artifacts carry their tokenizer
    ref = _bpb(_eval(tmp_path, qdir))
    rows = json.loads((out / "export_report.json").read_text())["artifacts"]
    seen = set()
    for row in rows:
        res = _eval(tmp_path, row["path"])
        exact = row["mode"] == "packed" or (row["target"] == "pte" and row["mode"] == "native")
        assert res["kind"] == Path(row["path"]).suffix.lstrip(".")
        # exact modes compute what eager does up to summation order; fast and native ONNX use int8 activations
        assert abs(_bpb(res) / ref - 1) < (0.001 if exact else 0.01), (row["path"], _bpb(res), ref)
        seen.add((row["target"], row["mode"]))
        if (row["target"], row["mode"]) == ("pte", "native"):
            # every code, scale and float weight once (as in the checkpoint); the rest is the program's graph:
            # 0.048 MB, 1.049x this 0.809 MB checkpoint (1.070x while XNNPACK took the float graph in 21 pieces)
            assert row["bytes"] <= 1.05 * (qdir / "model.safetensors").stat().st_size, row["bytes"]
    assert {("pte", "native"), ("pte", "packed"), ("onnx", "packed"), ("onnx", "fast"), ("onnx", "native")} <= seen


def test_eval_refuses_what_it_cannot_score(tmp_path):
    for arg, words in ((tmp_path / "nothing.onnx", "no such file"), (tmp_path, "not a zoo build folder")):
        r = CliRunner().invoke(main, ["eval", str(arg), "-q"])
        assert r.exit_code == 1 and words in r.output and "Traceback" not in r.output, r.output


def test_library_loads_models_only_through_the_strict_loader():
    """transformers' own from_pretrained (which initialises what it cannot find) is called in one place."""
    root = Path(__file__).resolve().parent.parent / "moe_export"
    calls = []
    for f in root.rglob("*.py"):
        for i, line in enumerate(f.read_text().splitlines(), 1):
            if re.search(r"\.from_pretrained\(", line) and "Tokenizer" not in line and not line.lstrip().startswith("#"):
                calls.append(f"{f.relative_to(root)}:{i}")
    assert calls and all(c.startswith("hf.py:") for c in calls), calls
