"""The one MODEL resolver (zoo build, zoo name, checkpoint folder) and the one decode loop over every runner."""

import pytest
import torch

from moe_export.export.runners import FullForwardRunner, HFCacheRunner, decode_steps, greedy_generate
from moe_export.model_configs import tiny_random_model
from moe_export.zoo.folders import FolderError, find_manifest, resolve


def test_resolve_zoo_build_and_plain_folder(tiny_zoo_dir, tmp_path):
    f = resolve(tiny_zoo_dir)
    assert f.checkpoint == tiny_zoo_dir / "finetuned" and f.reference == tiny_zoo_dir / "pretrained"
    assert f.entry["seq_len"] == 64 and f.manifest == find_manifest(tiny_zoo_dir / "finetuned")
    p = resolve(tiny_zoo_dir, which="pretrained")
    assert p.checkpoint == tiny_zoo_dir / "pretrained" and p.reference == tiny_zoo_dir / "initial"
    # a checkpoint folder inside the build is itself, with the build's manifest
    inner = resolve(tiny_zoo_dir / "finetuned")
    assert inner.checkpoint == tiny_zoo_dir / "finetuned" and inner.reference is None and inner.entry == f.entry
    with pytest.raises(FolderError, match="not a zoo build folder or checkpoint"):
        resolve(tmp_path)
    with pytest.raises(FolderError):
        resolve("no-such-entry-or-folder", build=True)
    with pytest.raises(ValueError, match="a zoo build holds"):
        resolve(tiny_zoo_dir, which="nope")


def test_cached_and_full_forward_decode_agree():
    model = tiny_random_model("MixtralForCausalLM").eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 6))
    full, cached = FullForwardRunner(model), HFCacheRunner(model)
    # the same prompt and tokens, one at a time: the cache must not change a logit
    a = [full.step(prompt, 0)[0, -1]] + [full.step(torch.tensor([[t]]), 6 + i)[0, -1] for i, t in enumerate((3, 5))]
    b = [cached.step(prompt, 0)[0, -1]] + [cached.step(torch.tensor([[t]]), 6 + i)[0, -1] for i, t in enumerate((3, 5))]
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-5 * x.abs().max())
    assert greedy_generate(full, prompt, 8) == greedy_generate(cached, prompt, 8)
    with pytest.raises(ValueError, match="step at position"):
        cached.step(torch.tensor([[1]]), 99)


def test_decode_steps_restarts_when_the_cache_is_full():
    model = tiny_random_model("MixtralForCausalLM").eval()
    runner = HFCacheRunner(model)
    runner.max_seq_len = 12
    seen = []
    decode_steps(runner, prompt_len=8, steps=10, on_step=lambda i, dt: seen.append((i, runner.ids.shape[1])))
    # 4 steps fill positions 8..11, then a new prefill of 8 and 4 more steps, then again
    assert [n for _, n in seen] == [9, 10, 11, 12, 9, 10, 11, 12, 9, 10]
