"""zoo build: manifest, cache hit, determinism, resume; load() and the HF formats on disk."""

import json

import pytest
import torch

from moe_export.zoo import folders, registry, train
from moe_export.zoo.registry import Entry, TrainSpec

_MICRO = dict(hidden=32, layers=1, heads=2, kv_heads=1, expert_ffn=32, experts=4, top_k=2)


def micro_entry(arch="mixtral", steps=8):
    model = dict(_MICRO) if arch != "switch" else dict(hidden=32, layers=2, heads=2, kv_dim=16, dense_ffn=32,
                                                       expert_ffn=32, experts=4, router_init=0.02)
    return Entry(f"micro-{arch}", arch, "test-only micro entry", 1024, 32, model,
                 TrainSpec("shakespeare", steps, 3e-3, 4, warmup=2, ckpt_every=3),
                 TrainSpec("python-stdlib", steps // 2, 1e-3, 4, warmup=1, ckpt_every=3), eval_tokens=512, eval_cloze=8,
                 notes=registry._SWITCH_NOTE if arch == "switch" else ())


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    # builds go to a temporary folder; the BPE (the `tiny` entries' one) and the tokenized corpora come
    # from the $MOE_EXPORT_HOME cache, so only the first run on a machine pays for them
    tmp = tmp_path_factory.mktemp("zoo")
    with pytest.MonkeyPatch.context() as mp:
        for arch in ("mixtral", "switch"):
            e = micro_entry(arch)
            mp.setitem(registry.ENTRIES, e.name, e)
        yield tmp


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def test_build_manifest_cache_and_determinism(home):
    out = train.build("micro-mixtral", home / "a", seed=0, progress=False)
    man = json.loads((out / "manifest.json").read_text())
    assert man["name"] == "micro-mixtral" and man["seed"] == 0 and man["architecture"] == "mixtral"
    for c in ("shakespeare", "python-stdlib"):
        splits = man["data"][c]["splits"]
        assert set(splits) == {"train", "valid", "test"} and all(len(s["sha256"]) == 64 for s in splits.values())
    assert man["stages"]["pretrain"]["steps"] == 8 and man["stages"]["finetune"]["steps"] == 4
    assert man["stages"]["pretrain"]["final_loss"] > 0 and man["versions"]["torch"] == torch.__version__
    assert 0 < man["eval"]["finetuned"]["results"]["shakespeare"]["bpb"]["bits_per_byte"] < 20
    assert (out / "loss.png").stat().st_size > 1000
    assert not list((out / ".state").glob("*.pt"))  # training-state checkpoints are dropped when a stage ends

    # cache hit: nothing is rewritten
    mtime = (out / "manifest.json").stat().st_mtime_ns
    assert train.build("micro-mixtral", home / "a", seed=0, progress=False) == out
    assert (out / "manifest.json").stat().st_mtime_ns == mtime

    # same seed, other folder: bit-identical weights; another seed starts elsewhere
    out2 = train.build("micro-mixtral", home / "b", seed=0, progress=False)
    w1, w2 = (_weights(o / "finetuned") for o in (out, out2))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    assert json.loads((out2 / "manifest.json").read_text())["eval"]["finetuned"]["results"] == man["eval"]["finetuned"]["results"]
    from moe_export.zoo.tokenizer import get_tokenizer

    tok, _ = get_tokenizer(1024, ["python-stdlib", "shakespeare"])
    e = registry.ENTRIES["micro-mixtral"]
    m0, m1 = train.make_model(e, tok, seed=0), train.make_model(e, tok, seed=1)
    assert not torch.equal(m0.lm_head.weight, m1.lm_head.weight)
    # the fine-tune moved the routers away from the pre-trained ones (the method's reference pair)
    pre = _weights(out / "pretrained")
    key = "model.layers.0.block_sparse_moe.gate.weight"  # transformers saves Mixtral in its legacy key layout
    assert not torch.equal(pre[key], w1[key])
    # initial/ is the untrained model of that seed: the reference of the pre-training run's router change
    init = _weights(out / "initial")
    assert torch.equal(init[key], m0.model.layers[0].mlp.gate.weight) and not torch.equal(init[key], pre[key])


def test_hf_formats_load_with_auto_classes(home):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = train.build("micro-mixtral", home / "a", seed=0, progress=False)
    for which in ("pretrained", "finetuned"):
        tok = AutoTokenizer.from_pretrained(out / which)
        model = AutoModelForCausalLM.from_pretrained(out / which)
        assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 4
        ids = tok("ROMEO: what light", return_tensors="pt")["input_ids"]
        assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    model, tok = folders.load(out)  # which="finetuned" by default
    assert torch.equal(model.model.layers[0].mlp.gate.weight,
                       _weights(out / "finetuned")["model.layers.0.block_sparse_moe.gate.weight"])


def test_switch_build_small_router_init(home):
    out = train.build("micro-switch", home / "s", seed=0, progress=False)
    model, tok = folders.load(out, which="pretrained")
    assert type(model).__name__ == "SwitchTransformersForConditionalGeneration"
    man = json.loads((out / "manifest.json").read_text())
    assert man["router_init_std"] == 0.02 and any("std 0.02" in n for n in man["notes"])
    # fresh model before training: the router rows have norm ~ 0.02 * sqrt(d) instead of HF's ~ sqrt(d)
    fresh = train.make_model(registry.ENTRIES["micro-switch"], tok, seed=0)
    w = dict(fresh.named_parameters())["encoder.block.1.layer.1.mlp.router.classifier.weight"]
    assert w.norm(dim=1).mean() < 0.3


def test_resume_is_bit_identical(home, tmp_path):
    from moe_export.zoo.tokenizer import get_tokenizer

    e = micro_entry("mixtral", steps=7)
    tok, _ = get_tokenizer(e.vocab_size, e.corpora)
    stream = torch.randint(0, len(tok), (5000,))
    straight = train.make_model(e, tok, seed=0)
    s1 = train.train_stage(straight, e.arch, stream, e.pretrain, e.seq_len, 0, tmp_path / "s1.pt", progress=False)
    resumed = train.make_model(e, tok, seed=0)
    with pytest.raises(train.Interrupted):
        train.train_stage(resumed, e.arch, stream, e.pretrain, e.seq_len, 0, tmp_path / "s2.pt", stop_after=4, progress=False)
    again = train.make_model(e, tok, seed=0)  # a new process: fresh weights, state comes from the checkpoint
    s2 = train.train_stage(again, e.arch, stream, e.pretrain, e.seq_len, 0, tmp_path / "s2.pt", progress=False)
    assert s1["losses"] == s2["losses"] and s2["steps"] == 7
    for (k, a), b in zip(straight.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), k


def test_changed_recipe_does_not_resume_stale_state(home):
    out = home / "r"
    e = micro_entry("mixtral")
    (out / ".state").mkdir(parents=True)
    (out / ".state" / "fingerprint").write_text("stale")
    (out / ".state" / "pretrain.pt").write_text("not a checkpoint")
    train.build(e.name, out, seed=0, progress=False)  # would fail to torch.load the junk if it resumed
    assert (out / ".state" / "fingerprint").read_text() == train.fingerprint(e, 0)


def test_unknown_entry_error():
    with pytest.raises(KeyError, match="available: tiny"):
        train.build("gpt-5")


def test_cli_zoo_list_and_help():
    from click.testing import CliRunner

    from moe_export.cli import main

    r = CliRunner().invoke(main, ["zoo", "list"])
    assert r.exit_code == 0 and "small-mixtral" in r.output and "tiny-switch" in r.output
    r = CliRunner().invoke(main, ["zoo", "build", "--help"])
    assert r.exit_code == 0 and "--seed" in r.output
    r = CliRunner().invoke(main, ["zoo", "build", "nope"])
    assert r.exit_code != 0 and "unknown zoo entry 'nope'" in r.output


def test_cli_build_files_follow_the_umask_and_the_table_explains_the_bigram(home):
    """Another user of a shared cache can read a build (folders 0755, files 0644 under umask 022); no
    transformers "Writing model shards" bar per save; a model worse than the bigram beside it is explained."""
    import os
    import stat

    from click.testing import CliRunner

    from moe_export.cli import main

    old = os.umask(0o022)
    try:
        r = CliRunner().invoke(main, ["zoo", "build", "micro-mixtral", "-o", str(home / "shared")])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    out = home / "shared"
    for p in [out, *out.rglob("*")]:
        want = 0o755 if p.is_dir() else 0o644
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    assert "Writing model shards" not in r.output
    man = json.loads((out / "manifest.json").read_text())
    ft = man["eval"]["finetuned"]["results"]["python-stdlib"]["bpb"]["bits_per_byte"]
    assert ft > man["baselines"]["python-stdlib"]["token_bigram"]["bits_per_byte"]  # 8 steps: far from a bigram
    assert "note: the token bigram" in r.output and "finetuned on python-stdlib" in r.output
    assert "not for quality" in r.output and "docs/results.md" in r.output
