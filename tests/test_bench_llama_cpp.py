"""The llama.cpp peer's plumbing, against stand-in executables (llama.cpp itself is not built in CI)."""

import json
import stat

import pytest

from moe_export.bench.llama_cpp import LlamaCpp


def _fake_build(tmp_path, bench_json):
    src = tmp_path / "llama.cpp"
    (src / "build" / "bin").mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("")
    bench = src / "build" / "bin" / "llama-bench"
    # Echo the arguments into a file so the test sees the command line llama-bench got.
    bench.write_text(f"#!/bin/sh\necho \"$@\" > {tmp_path}/args\ncat <<'X'\n{json.dumps(bench_json)}\nX\n")
    quant = src / "build" / "bin" / "llama-quantize"
    quant.write_text("#!/bin/sh\ncp \"$1\" \"$2\"\n")
    for f in (bench, quant):
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return src / "build"


def test_find_without_a_build_is_none(monkeypatch):
    monkeypatch.delenv("MOE_EXPORT_LLAMA_CPP", raising=False)
    assert LlamaCpp.find(None) is None


def test_find_names_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="llama-bench"):
        LlamaCpp.find(tmp_path)


def test_decode_and_prefill_read_llama_bench_json(tmp_path):
    peer = LlamaCpp.find(_fake_build(tmp_path, [{"avg_ts": 123.5, "n_prompt": 0, "n_gen": 64}]))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"x")
    assert peer.decode_tps(gguf, threads=2) == 123.5
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-p") + 1] == "0" and args[args.index("-n") + 1] == "64"
    assert args[args.index("-t") + 1] == "2" and args[args.index("-o") + 1] == "json"
    peer.prefill_tps(gguf, threads=1)
    args = (tmp_path / "args").read_text().split()
    assert args[args.index("-p") + 1] == "128" and args[args.index("-n") + 1] == "0"


def test_quantize_is_cached_and_named_by_type(tmp_path):
    peer = LlamaCpp.find(_fake_build(tmp_path, []))
    f32 = tmp_path / "model-f32.gguf"
    f32.write_bytes(b"weights")
    q = peer.quantize(f32, "Q2_K")
    assert q.name == "model-Q2_K.gguf" and q.read_bytes() == b"weights"
    q.write_bytes(b"kept")
    assert peer.quantize(f32, "Q2_K").read_bytes() == b"kept"


def test_a_failed_run_raises_with_its_output(tmp_path):
    peer = LlamaCpp.find(_fake_build(tmp_path, [{"avg_ts": 1.0}, {"avg_ts": 2.0}]))
    with pytest.raises(RuntimeError, match="2 results"):
        peer.decode_tps(tmp_path / "m.gguf", threads=1)


def _fake_source(build):
    """A converter stand-in that writes its --outfile, with the module the real one patches."""
    src = build.parent
    (src / "conversion").mkdir()
    (src / "conversion" / "__init__.py").write_text("")
    (src / "conversion" / "base.py").write_text("class TextModel:\n    pass\n")
    (src / "convert_hf_to_gguf.py").write_text(
        "import sys\nfrom pathlib import Path\nimport conversion.base as b\n"
        "assert b.TextModel.get_vocab_base_pre(None, None) == 'gpt-2'\n"
        "a = sys.argv\nPath(a[a.index('--outfile') + 1]).write_bytes(Path(a[1], 'config.json').read_bytes())\n")


def test_the_bench_converts_its_float_model_and_keeps_llama_bench_tok_s(tmp_path):
    from moe_export.bench.run import _LlamaBenchRun, _llama_cpp_models
    from moe_export.model_configs import tiny_random_model

    build = _fake_build(tmp_path, [{"avg_ts": 50.0}])
    _fake_source(build)
    peer = LlamaCpp.find(build)
    model = tiny_random_model("MixtralForCausalLM", seed=0)
    ggufs = _llama_cpp_models(peer, model, tmp_path / "out", ["Q2_K", "Q4_K_M"])
    assert sorted(ggufs) == ["Q2_K", "Q4_K_M"] and all(p.exists() for p in ggufs.values())
    assert (tmp_path / "out" / "hf" / "tokenizer.json").exists()  # the converter needs one
    run = _LlamaBenchRun(peer, ggufs["Q2_K"], threads=1, n_prompt=0, n_gen=64)
    assert run.row("decode") == {}
    run(), run()
    assert run.row("decode") == {"decode_tok_s": 50.0, "decode_n": 2}
