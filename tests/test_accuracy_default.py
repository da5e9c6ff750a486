"""Inference runs the int8-activation arithmetic by default; quality numbers (eval, export parity) score exact.

The rest of the suite pins ``exact`` (conftest.py); these tests look at the default itself and at the places that
must not follow it."""
import os
import subprocess
import sys

import torch

from moe_export import eval as ev
from moe_export.kernels import cpu_ops


def test_inference_default_is_int8_and_the_environment_overrides_it():
    env = {k: v for k, v in os.environ.items() if k != "MOE_EXPORT_ACCURACY"}
    code = "from moe_export.kernels import cpu_ops; print(cpu_ops.accuracy())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "int8"
    env["MOE_EXPORT_ACCURACY"] = "exact"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "exact"
    env["MOE_EXPORT_ACCURACY"] = "fp8"
    bad = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert bad.returncode != 0 and "MOE_EXPORT_ACCURACY must be one of" in bad.stderr


class _Recording:
    """A uniform predictor that records the kernels' arithmetic at each call."""

    def __init__(self, vocab):
        self.vocab, self.seen = vocab, set()

    def __call__(self, ids):
        self.seen.add(cpu_ops.accuracy())
        return torch.zeros(*ids.shape, self.vocab)


def test_eval_scores_in_the_exact_arithmetic_unless_asked():
    from moe_export.zoo.data import load_corpus
    from moe_export.zoo.tokenizer import train_bpe

    text = load_corpus("shakespeare").splits["train"][:50_000]
    tok = train_bpe(text.splitlines(keepends=True), 300)
    with cpu_ops.use_accuracy("int8"):  # the inference default
        f = _Recording(len(tok))
        ev.evaluate(f, tok, ["shakespeare"], 32, max_tokens=256, n_cloze=0, progress=False)
        assert f.seen == {"exact"}
        g = _Recording(len(tok))
        ev.evaluate(g, tok, ["shakespeare"], 32, max_tokens=256, n_cloze=0, progress=False, accuracy="int8")
        assert g.seen == {"int8"}
        h = _Recording(len(tok))  # the primitive the sweeps call directly pins the same way
        ev.bits_per_byte(h, tok, text[:4000], 32, progress=False)
        assert h.seen == {"exact"}
        assert cpu_ops.accuracy() == "int8"  # restored afterwards


def test_export_parity_reference_is_exact():
    from moe_export.export.parity import compare

    class Runner:
        name = "stub"
        max_seq_len = 8
        seq2seq = False

        def reset(self):
            pass

        def step(self, ids, pos):
            return torch.zeros(1, ids.shape[1], 4)

    seen = []

    def eager(ids):
        seen.append(cpu_ops.accuracy())
        return torch.ones(1, ids.shape[1], 4)

    with cpu_ops.use_accuracy("int8"):
        report = compare(Runner(), eager, torch.zeros(1, 3, dtype=torch.long))
    assert seen == ["exact"]
    assert report.max_abs_err_vs_eager == 1.0


def test_native_pte_follows_the_inference_default(tmp_path):
    """``--pte-mode native`` bakes the inference default arithmetic into the program's kernels (int8 activations
    unless pinned exact, as the compiled path); ``native-exact`` / ``native-int8`` pin one whatever the default.
    The exact program matches eager to float rounding, the int8 one to an SQNR floor but not to rounding."""
    from moe_export.eval import logits_fn_for
    from moe_export.export.executorch import export_pte, native_accuracy
    from moe_export.export.parity import APPROX_MIN_SQNR_DB, check_parity, compare
    from moe_export.export.prepare import prepare_for_export
    from moe_export.export.runners import PteRunner
    from moe_export.export.wrapper import DecoderStep
    from moe_export.model_configs import tiny_random_model
    from test_export_targets import _quantize

    fmodel = tiny_random_model("MixtralForCausalLM", seed=0, num_hidden_layers=1).eval()
    qmodel, _ = _quantize(fmodel, [[2, 3, 3, 2, 2, 3, 2, 3]])
    ids = torch.randint(0, fmodel.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(1))
    step = DecoderStep(prepare_for_export(qmodel), max_seq_len=16)
    reports = {}
    for default in ("int8", "exact"):
        with cpu_ops.use_accuracy(default):
            assert native_accuracy("native") == default
            assert (native_accuracy("native-exact"), native_accuracy("native-int8")) == ("exact", "int8")
            pte = export_pte(step, tmp_path / f"{default}.pte", mode="native")
        reports[default] = compare(PteRunner(pte), logits_fn_for(qmodel), ids)
    assert native_accuracy("packed") is None
    check_parity(reports["exact"])
    check_parity(reports["int8"], min_sqnr_db=APPROX_MIN_SQNR_DB)
    assert reports["int8"].sqnr_vs_eager_db < 100 < reports["exact"].sqnr_vs_eager_db
