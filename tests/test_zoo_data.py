"""Corpora, BPE tokenizer, calibration batches, cloze items and n-gram baselines of the zoo."""

import math

import pytest
import torch

from moe_export.zoo import data
from moe_export.zoo.tokenizer import token_bytes, train_bpe


def test_strip_play_markdown():
    md = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \nNay, **answer** me.\n\n\n\nEnd"
    assert data.strip_play_markdown(md) == "Hamlet\n\nACT I\n\n[Enter BERNARDO]\n\nBERNARDO:\nWho's there?\nNay, answer me.\n\nEnd\n"


def test_split_by_position_covers_text_at_line_boundaries():
    text = "".join(f"line {i}\n" for i in range(1000))
    parts = data._split_by_position(text)
    assert "".join(parts) == text
    assert [round(len(p) / len(text), 2) for p in parts] == [0.90, 0.05, 0.05]
    assert all(p.endswith("\n") for p in parts)


@pytest.mark.parametrize("name", ["shakespeare", "python-stdlib"])
def test_corpus_splits_deterministic_and_disjoint(name):
    c = data.load_corpus(name)
    data.CORPORA[name].cache_clear()
    again = data.load_corpus(name)
    assert c is not again and c.sha256 == again.sha256
    info = c.info()
    assert set(info["splits"]) == {"train", "valid", "test"}
    sizes = {s: v["bytes"] for s, v in info["splits"].items()}
    assert sizes["train"] > 3_000_000 and 100_000 < sizes["test"] < sizes["train"] / 5
    # held-out text is not in train: a 200-char probe from the middle of test is absent from train
    probe = c.splits["test"][len(c.splits["test"]) // 2 :][:200]
    assert probe not in c.splits["train"]


def test_unknown_corpus_error():
    with pytest.raises(KeyError, match="available: shakespeare, python-stdlib"):
        data.load_corpus("gutenberg")


@pytest.fixture(scope="module")
def small_tok():
    text = data.load_corpus("shakespeare").splits["train"][:200_000]
    return train_bpe(text.splitlines(keepends=True), 400)


def test_bpe_training_is_deterministic(small_tok):
    text = data.load_corpus("shakespeare").splits["train"][:200_000]
    again = train_bpe(text.splitlines(keepends=True), 400)
    assert small_tok.get_vocab() == again.get_vocab()
    assert len(small_tok) == 400 and small_tok.eos_token_id == 0 and small_tok.pad_token_id == 1


def test_token_bytes_count_utf8_bytes(small_tok):
    text = "Wherefore art thou Romeo? — café ☃\n    def f(x): return x\n"
    ids = small_tok(text, add_special_tokens=False)["input_ids"]
    assert small_tok.decode(ids) == text
    assert int(token_bytes(small_tok)[ids].sum()) == len(text.encode("utf-8"))
    assert token_bytes(small_tok)[small_tok.eos_token_id] == 0


def test_bpe_saves_in_hf_format(small_tok, tmp_path):
    from transformers import AutoTokenizer

    small_tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    s = "To be, or not to be"
    assert loaded(s)["input_ids"] == small_tok(s)["input_ids"]


def test_calibration_batches(small_tok):
    # the valid split keeps the test fast; the default is the train split
    a = data.calibration_batches(small_tok, n_tokens=1000, seq_len=64, seed=3, split="valid")
    b = data.calibration_batches(small_tok, n_tokens=1000, seq_len=64, seed=3, split="valid")
    c = data.calibration_batches(small_tok, n_tokens=1000, seq_len=64, seed=4, split="valid")
    assert a.shape == (16, 64) and a.dtype == torch.long  # ceil(1000 / 64)
    assert torch.equal(a, b) and not torch.equal(a, c)
    stream = data.token_stream(small_tok, "shakespeare", "valid")
    windows = stream.unfold(0, 64, 1)
    for row in a[:4]:  # each row is a contiguous window of the split
        assert (windows == row).all(-1).any()
    with pytest.raises(ValueError, match="seq_len"):
        data.calibration_batches(small_tok, 10, 1)


def test_cloze_items_true_context():
    stream = torch.arange(10_000)  # distinct tokens: the true context is checkable
    ctx, cont, ans = data.cloze_items(stream, n_items=50, context_len=12, choice_len=4, seed=0)
    assert ctx.shape == (50, 4, 12) and cont.shape == (50, 4) and ans.shape == (50,)
    for i in range(50):
        true = ctx[i, ans[i]]
        assert torch.equal(cont[i], true[-1] + 1 + torch.arange(4))  # the continuation follows the true context
        for k in range(4):
            if k != ans[i]:  # distractor passages do not overlap the true passage
                assert ctx[i, k, -1] < true[0] or ctx[i, k, 0] > cont[i, -1]
    assert len(set(ans.tolist())) == 4  # answers are spread over positions
    ctx2, cont2, ans2 = data.cloze_items(stream, 50, 12, 4, seed=0)
    assert torch.equal(ctx, ctx2) and torch.equal(cont, cont2) and torch.equal(ans, ans2)


def test_bigram_baseline_matches_hand_count():
    train = torch.tensor([0, 1, 0, 1, 0, 2])  # counts: 0->1 x2, 1->0 x2, 0->2 x1
    test = torch.tensor([0, 1, 2])
    nb = torch.tensor([1, 2, 3])
    r = data.bigram_bits_per_byte(train, test, vocab=3, token_bytes=nb)
    k = 0.1
    p01 = (2 + k) / (3 + 3 * k)
    p12 = (0 + k) / (2 + 3 * k)
    assert r["bits_per_byte"] == pytest.approx(-(math.log2(p01) + math.log2(p12)) / (2 + 3))


def test_byte_bigram_reference_value():
    c = data.load_corpus("shakespeare")
    r = data.byte_bigram_bits_per_byte(c.splits["train"], c.splits["test"], c.splits["valid"])
    # measured 3.58 here (data notes: 3.62 on a different 2 % split); far from uniform (8 bits)
    assert 3.3 < r["bits_per_byte"] < 3.9
