"""eval: bits per byte and multiple choice through the one logits_fn interface, checked by hand."""

import json
import math

import pytest
import torch

from moe_export import eval as ev
from moe_export.zoo.tokenizer import token_bytes, train_bpe


@pytest.fixture(scope="module")
def tok():
    from moe_export.zoo.data import load_corpus

    text = load_corpus("shakespeare").splits["train"][:100_000]
    return train_bpe(text.splitlines(keepends=True), 300)


@pytest.fixture(scope="module")
def mixtral(tok):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=32, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=32)
    return MixtralForCausalLM(cfg).eval()


TEXT = "HAMLET:\nTo be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 3


def test_bits_per_byte_matches_hand_computation(tok, mixtral):
    ids = torch.tensor(tok(TEXT)["input_ids"])
    T = 16
    res = ev.bits_per_byte(ev.logits_fn_for(mixtral), tok, TEXT, seq_len=T, batch_size=3, progress=False)
    n = len(ids) // T
    bits, nbytes = 0.0, 0
    nb = token_bytes(tok)
    with torch.no_grad():
        for w in ids[: n * T].view(n, T):  # one window at a time, float64 log-softmax
            logits = mixtral(w[None]).logits[0].double()
            for t in range(T - 1):
                bits -= torch.log_softmax(logits[t], -1)[w[t + 1]].item() / math.log(2)
                nbytes += int(nb[w[t + 1]])
    assert res["tokens_scored"] == n * (T - 1) and res["bytes_scored"] == nbytes
    assert res["bits_per_byte"] == pytest.approx(bits / nbytes, rel=1e-6)
    # an untrained model is near uniform: log2(V) bits per token
    assert res["nats_per_token"] == pytest.approx(math.log(len(tok)), rel=0.05)


def test_bits_per_byte_of_a_perfect_and_a_uniform_predictor(tok):
    ids = torch.tensor(tok(TEXT)["input_ids"])
    V, T = len(tok), 8
    n = len(ids) // T
    tgt_bytes = int(token_bytes(tok)[ids[: n * T].view(n, T)[:, 1:]].sum())

    def uniform(x):
        return torch.zeros(*x.shape, V)

    res = ev.bits_per_byte(uniform, tok, ids, seq_len=T, progress=False)
    assert res["bits_per_byte"] == pytest.approx(n * (T - 1) * math.log2(V) / tgt_bytes)

    def oracle(x):  # knows the stream: puts all mass on the true next token
        out = torch.full((*x.shape, V), -1e4)
        out[:, :-1].scatter_(-1, x[:, 1:, None], 0.0)
        return out

    assert ev.bits_per_byte(oracle, tok, ids, seq_len=T, progress=False)["bits_per_byte"] < 1e-6


def test_choice_logprobs_by_hand(tok, mixtral):
    fn = ev.logits_fn_for(mixtral)
    ctx = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    ch = torch.tensor([[[20, 21], [30, 31], [40, 41]], [[50, 51], [60, 61], [70, 71]]])
    got = ev.choice_logprobs(fn, ctx, ch, batch_size=1, progress=False)
    assert got.shape == (2, 3)
    with torch.no_grad():
        for i in range(2):
            for k in range(3):
                x = torch.cat([ctx[i], ch[i, k]])[None]
                lp = torch.log_softmax(mixtral(x).logits[0].double(), -1)
                want = lp[3, ch[i, k, 0]] + lp[4, ch[i, k, 1]]
                assert got[i, k].item() == pytest.approx(want.item(), rel=1e-6)
    acc = ev.multiple_choice_accuracy(fn, ctx, ch, got.argmax(-1), progress=False)
    assert acc["accuracy"] == 1.0 and acc["chance"] == pytest.approx(1 / 3)


def test_context_logprobs_by_hand(mixtral):
    fn = ev.logits_fn_for(mixtral)
    ctx = torch.tensor([[[5, 6, 7], [8, 9, 10]], [[11, 12, 13], [14, 15, 16]]])  # [N=2, K=2, C=3]
    cont = torch.tensor([[20, 21], [22, 23]])  # [N, L]
    got = ev.context_logprobs(fn, ctx, cont, batch_size=1, progress=False)
    with torch.no_grad():
        for i in range(2):
            for k in range(2):
                lp = torch.log_softmax(mixtral(torch.cat([ctx[i, k], cont[i]])[None]).logits[0].double(), -1)
                assert got[i, k].item() == pytest.approx((lp[2, cont[i, 0]] + lp[3, cont[i, 1]]).item(), rel=1e-6)


def test_switch_prefix_adapter_scores_decoder_positions_only(tok):
    from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

    cfg = SwitchTransformersConfig(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=32, num_heads=2, num_layers=2,
                                   num_decoder_layers=2, num_sparse_encoder_layers=1, num_sparse_decoder_layers=1,
                                   num_experts=4, expert_capacity=64, dropout_rate=0.0, decoder_start_token_id=1)
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(cfg).eval()
    fn = ev.logits_fn_for(model)
    x = torch.randint(2, len(tok), (2, 16))
    logits = fn(x)
    assert logits.shape == (2, 16, len(tok)) and fn.score_from(16) == 7
    with torch.no_grad():
        direct = model(input_ids=x[:, :8], decoder_input_ids=x[:, 7:15]).logits
    torch.testing.assert_close(logits[:, 7:15], direct)
    res = ev.bits_per_byte(fn, tok, x.flatten(), seq_len=16, progress=False)
    assert res["tokens_scored"] == 2 * 8  # targets x[:, 8:16]
    with pytest.raises(ValueError, match="too short"):
        ev.choice_logprobs(fn, x[:, :4], x[:, None, 4:16], progress=False)


def test_bad_logits_shape_is_reported(tok):
    with pytest.raises(ValueError, match=r"expected \[B, T, V\]"):
        ev.bits_per_byte(lambda x: torch.zeros(x.shape[0], len(tok)), tok, TEXT, seq_len=8, progress=False)


def test_trained_tiny_beats_chance_and_json_cli(tiny_zoo_dir, tmp_path):
    from click.testing import CliRunner

    from moe_export.cli import main

    man = json.loads((tiny_zoo_dir / "manifest.json").read_text())
    pre = man["eval"]["pretrained"]["results"]["shakespeare"]
    # measured at build: bpb 2.47 (uniform over 1024 tokens would be ~4.5), cloze 0.83 (chance 0.25)
    assert pre["bpb"]["bits_per_byte"] < 2.9 and pre["cloze"]["accuracy"] > 0.6
    ft = man["eval"]["finetuned"]["results"]["python-stdlib"]["bpb"]["bits_per_byte"]
    assert ft < man["eval"]["pretrained"]["results"]["python-stdlib"]["bpb"]["bits_per_byte"] - 1.0
    out = tmp_path / "e.json"
    r = CliRunner().invoke(main, ["eval", str(tiny_zoo_dir), "--which", "pretrained", "--json", str(out),
                                  "--corpus", "shakespeare", "--max-tokens", "4096", "--n-cloze", "40"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())["results"]["shakespeare"]
    assert res["bpb"]["tokens_scored"] == 64 * 63
    assert res["bpb"]["bits_per_byte"] < 2.9 and res["cloze"]["n"] == 40 and res["cloze"]["accuracy"] > 0.5
