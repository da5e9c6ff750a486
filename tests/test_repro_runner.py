"""The reproduction runner end to end on a tiny sweep: records, report, plots, CLI."""

import json

import pytest
from click.testing import CliRunner

from moe_export.repro import experiments, report

TINY = experiments.SyntheticSweep(
    alphas=(0.2,), seeds=(0, 1), routings=("expert_choice", "token_choice"), n_random=2, n_test=100, n_calib=100,
    base={"expert_choice": {"lr": 0.2, "steps": 40}, "token_choice": {"lr": 1.0, "steps": 40}},
    overrides=dict(d=16, n_tokens=8, n_irrelevant=8, n_experts=4, n_neurons=4),
    scan={"expert_choice": [{"expert_init_std": 0.1, "previous": True}, {"expert_init_std": 2.0}],
          "token_choice": [{"expert_init_std": 0.1}]},
    scan_seeds=(0,), scan_n_test=100,
)


@pytest.fixture(scope="module")
def results():
    return experiments.run_synthetic(TINY, progress=False)


def test_records_cover_every_run_method_and_width(results):
    assert len(results["runs"]) == 4
    grid = TINY.avg_bits_grid(4)
    assert grid == [1.0, 1.5, 2.0, 2.5, 3.0]
    for r in results["runs"]:
        assert [row["avg_bits"] for row in r["allocation"]] == grid
        for row in r["allocation"]:
            assert set(row["methods"]) == set(experiments.METHODS)
            for m, res in row["methods"].items():
                assert 0 <= res["acc_infrequent"] <= 1
                if "bits" in res:  # equal average bits for every deterministic method
                    assert sum(res["bits"]) / 4 == pytest.approx(row["avg_bits"])
                    assert set(res["bits"]) <= set(TINY.levels)
        assert set(r["uniform"]) == {str(b) for b in range(1, 9)}
        assert len(r["scores"]["lambda"]) == 4


def test_rankings_follow_their_scores(results):
    r = results["runs"][0]
    lam = r["scores"]["lambda"]
    row = r["allocation"][2]  # 2.0 bits: two experts at 3, two at 1
    ours = row["methods"][experiments.OURS]["bits"]
    reverse = row["methods"][experiments.REVERSE]["bits"]
    high = [s for s in range(4) if ours[s] == 3]
    assert sorted(high) == sorted(sorted(range(4), key=lambda s: lam[s])[:2])
    assert all(reverse[s] == (1 if ours[s] == 3 else 3) for s in range(4))
    # end points: every method is the uniform model
    for end, b in ((0, "1"), (-1, "3")):
        accs = {m: res["acc"] for m, res in r["allocation"][end]["methods"].items()}
        assert all(a == pytest.approx(r["uniform"][b]["acc"]) for a in accs.values())


def test_report_writes_markdown_plots_and_data(results, tmp_path):
    md = report.write_report(results, tmp_path, "moe-export reproduce --quick")
    text = md.read_text()
    for needle in ("## 1. Synthetic theory task", "### Claim 1", "### Claim 2", "### Claim 3", "**Verdict",
                   "moe-export reproduce --quick", "## 2. Zoo models", "**Not run.**", results["machine"]["torch"]):
        assert needle in text, needle
    for m in experiments.METHODS:
        assert m in text
    pngs = sorted(p.name for p in (tmp_path / "img").glob("*.png"))
    assert pngs == ["synthetic_accuracy_vs_bits_expert_choice.png", "synthetic_accuracy_vs_bits_token_choice.png",
                    "synthetic_lambda_vs_frequency.png"]
    for p in (tmp_path / "img").glob("*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    saved = json.loads((tmp_path / "results-synthetic.json").read_text())
    # the report is a function of the saved records alone
    assert report.build_markdown(saved, "moe-export reproduce --quick") == text


def test_cli_rebuilds_from_json(results, tmp_path):
    from moe_export.cli import main

    src = tmp_path / "in.json"
    src.write_text(json.dumps(results))
    out = tmp_path / "docs"
    res = CliRunner().invoke(main, ["reproduce", "--from-json", str(src), "--out", str(out), "--no-zoo"])
    assert res.exit_code == 0, res.output
    assert (out / "results.md").exists() and (out / "img" / "synthetic_lambda_vs_frequency.png").exists()
    bad = CliRunner().invoke(main, ["reproduce", "--seeds", "a,b", "--out", str(out)])
    assert bad.exit_code != 0 and "--seeds" in bad.output
    bad = CliRunner().invoke(main, ["reproduce", "--zoo-models", "nope", "--out", str(out)])
    assert bad.exit_code != 0 and "unknown zoo entry" in bad.output


def test_scan_records_flags_and_section(results):
    scan = results["scan"]
    assert [(e["routing"], e["config"]["expert_init_std"]) for e in scan] == [
        ("expert_choice", 0.1), ("expert_choice", 2.0), ("token_choice", 0.1)]
    assert [e["previous"] for e in scan] == [True, False, False]
    # TINY's base leaves the init at the config default (0.1): that scan row is the sweep's own setting
    assert [e["default"] for e in scan] == [True, False, True]
    for e in scan:
        assert [x["seed"] for x in e["seeds"]] == list(TINY.scan_seeds)
        assert set(e["seeds"][0]["uniform"]) == {"1", "2", "3", "4"}
        assert e["config"]["n_neurons"] == 4 and e["config"]["steps"] == 40
    md = report.build_markdown(results, "cmd")
    sec = md[md.index("### Choosing the setting"):md.index("### Claim 1")]
    rows = [line for line in sec.splitlines() if line.startswith("| expert-choice") or line.startswith("| token-choice")]
    assert len(rows) == 3 and "(previous default)" in rows[0] and "used by the sweep" in rows[2]
    for row, e in zip(rows, scan):
        assert row.endswith("| yes |") == report.scan_stats(e)["meets_bar"], row


def test_scan_entry_overrides_base_and_sweep_overrides():
    cfg = TINY.config("expert_choice", 0.1, 3, {"expert_init_std": 2.0, "n_neurons": 8, "previous": True})
    assert (cfg.expert_init_std, cfg.n_neurons, cfg.d, cfg.lr, cfg.seed) == (2.0, 8, 16, 0.2, 3)
    assert TINY.config("expert_choice", 0.1, 3).n_neurons == 4


def _scan_entry(float_acc, one_bit, three_bit):
    unif = {"1": one_bit, "2": one_bit, "3": three_bit, "4": float_acc}
    acc = lambda fr, inf: {"acc_frequent": fr, "acc_infrequent": inf}
    return {"seeds": [{"float": acc(*float_acc), "uniform": {b: acc(*v) for b, v in unif.items()},
                       "n_infrequent_experts": 1}]}


def test_scan_bar():
    assert report.scan_stats(_scan_entry((1.0, 1.0), (1.0, 0.90), (1.0, 0.995)))["meets_bar"]
    # 1 bit hurts only frequent samples: not the damage the bar asks for
    assert not report.scan_stats(_scan_entry((1.0, 1.0), (0.90, 1.0), (1.0, 1.0)))["meets_bar"]
    # 3 bits not near float
    assert not report.scan_stats(_scan_entry((1.0, 1.0), (1.0, 0.90), (0.98, 1.0)))["meets_bar"]
    # float itself too weak
    v = report.scan_stats(_scan_entry((1.0, 0.97), (1.0, 0.80), (1.0, 0.97)))
    assert not v["meets_bar"] and v["damage_1"] == pytest.approx(0.17)


def test_safe_width_per_kind_sees_infrequent_damage_that_overall_accuracy_hides():
    acc = lambda fr, inf: {"acc_frequent": fr, "acc_infrequent": inf, "acc": 0.9 * fr + 0.1 * inf}
    curve = {str(b): acc(1.0, 0.95 if b <= 2 else 1.0) for b in range(1, 9)}
    curve["5"] = acc(0.985, 1.0)  # a dip above the first safe width pushes the safe width past it
    run = {"routing": "expert_choice", "alpha": 0.1, "float": acc(1.0, 1.0),
           "safe_width": {"infrequent": {"curve": curve, "min_safe_bits": 1}, "frequent": None}}
    assert report.min_safe_each_kind(run, "infrequent", 0.01) == 6
    assert report.min_safe_each_kind(run, "infrequent", 0.06) == 1
    assert report.safe_width_stats([run], "each kind")[("expert_choice", 0.1)]["infrequent"] == [6]
    assert report.safe_width_stats([run], "overall")[("expert_choice", 0.1)]["infrequent"] == [1]


def test_high_bit_shares():
    row = lambda bits: {"methods": {experiments.OURS: {"bits": bits}}}
    run = {"scores": {"feature": [0, 2, -1, -1]},
           "allocation": [row([1, 1, 1, 1]), row([1, 3, 3, 1]), row([3, 3, 3, 1]), row([3, 3, 3, 3])]}
    sh = report.high_bit_shares([run], experiments.OURS, 3)
    assert sh == pytest.approx({"frequent": 1 / 5, "infrequent": 2 / 5, "irrelevant": 2 / 5})


def _fake_zoo():
    """Zoo records in the runner's format, with made-up bpb values: tests the report only."""
    points = []
    for setting in ("finetune", "pretrain-only"):
        for ls, grid in (("3,2", [2.0, 2.5, 3.0]), ("3,2,1", [1.5, 2.0, 2.5])):
            for avg in grid:
                for m in ("router", "router+maxvar", "random", "uniform"):
                    if m == "uniform" and avg not in (1.0, 2.0, 3.0):
                        continue
                    # ours better than random at interior points by construction
                    bpb = 3.0 - 0.1 * avg + (0.05 if m == "random" else 0.0)
                    pt = {"setting": setting, "levels": ls, "avg_bits": avg, "method": m, "bpb": bpb,
                          "plan_s": 0.01, "bits": [[2] * 4]}
                    if avg == 2.5:  # cloze on a thinner grid, as in the full sweep: random one item behind
                        pt["cloze"] = 0.70 - (0.01 if m == "random" else 0.0)
                    points.append(pt)
    run = lambda seed: {"model": "tiny", "seed": seed, "arch": "mixtral", "group_size": 64,
                        "float": {"finetune": {"bpb": 2.5, "cloze": 0.75, "corpus": "c"},
                                  "pretrain-only": {"bpb": 2.4, "cloze": 0.8, "corpus": "s"}},
                        "scores": {"model.layers.0.mlp": {"change": [0.1 * seed, 0.2, -0.1, 0.0],
                                                          "abs_change": [0.1, 0.2, 0.1, 0.0],
                                                          "final_norm": [1.0, 2.0, 3.0, 4.0 + seed],
                                                          "pretrained_norm": [1.0, 2.0, 3.0, 4.0],
                                                          "init_change": [0.5, 1.5, 2.5, 3.5]}},
                        "points": points}
    ctrl = {"finetune": {"model.layers.0.mlp": [0.1, 0.2, 0.3, 0.4]},
            "repeat": {"model.layers.0.mlp": [0.1, 0.2, 0.3, 0.5]},
            "control": {"model.layers.0.mlp": [0.4, 0.3, 0.2, 0.1]},
            "spearman": {"repeat": {"model.layers.0.mlp": 1.0}, "control": {"model.layers.0.mlp": -1.0}}}
    runs = [run(0), run(1)]
    runs[0]["controls"] = ctrl
    return {"sweep": {"seeds": [0, 1], "methods": ["router", "router+maxvar", "random", "uniform"], "eval_tokens": 64,
                      "random_seeds": [0], "calib_tokens": 64, "n_cloze": 100, "cloze_avg_bits": {"3,2": [2.5], "3,2,1": [2.5]}},
            "runs": runs, "rank_stability": {"tiny/change": [0.4]}, "wall_s": 1.0}


def test_zoo_section_and_plot(results, tmp_path):
    md = report.write_report(results, tmp_path, "cmd", zoo=_fake_zoo()).read_text()
    z = md[md.index("## 2. Zoo models"):]
    assert "**Not run.**" not in z
    assert "![quality vs bits](img/zoo_bpb_vs_bits.png)" in z
    assert (tmp_path / "img" / "zoo_bpb_vs_bits.png").stat().st_size > 5000
    # random is worse by 0.05 bpb at the interior points of both level sets and settings, both seeds
    assert "router-norm: **reproduced** (better in 8/8 comparisons; per setting: finetune 4/4, pretrain-only 4/4)" in z
    # cloze: only the 2.5-bit points scored it (interior in {3,2} only); random one item behind ours each time
    assert (tmp_path / "img" / "zoo_cloze_vs_bits.png").stat().st_size > 5000
    assert "router-norm: mean +1.00, better in 4, worse in 0, tied in 0 of 4" in z
    assert "<details><summary>tiny, fine-tuned model" in z and "cloze accuracy, mean ± sd over 2 build seeds (float: 0.7500 ± 0.0000)" in z
    # the two pre-train scorings: here the init change ranks exactly like the pre-trained norm
    assert "pre-training change vs pre-trained norm +1.00 (+1.00..+1.00)" in z and "rank experts almost alike" in z
    assert "| +0.500 +1.500 +2.500 +3.500 | 1.00 2.00 3.00 4.00 |" in z
    assert "initialisation" not in z[z.index("Not run yet"):] and "cloze" not in z[z.index("Not run yet"):]
    assert "| tiny | finetune | {3,2} | +0.3125 | router-norm | +0.0500 [2/2] |" in z  # damage: mean(2.8, 2.8, 2.85, 2.8) - 2.5
    assert "tiny/change: mean +0.40 over 1 pairs" in z
    assert "| tiny | 0 | model.layers.0.mlp | +1.00 | -1.00 | 0.250 / 0.275 / 0.250 |" in z
    assert "Mean ρ: repeat +1.00 (1 layers), control -1.00" in z and "**Verdict: reproduced** (rule: the change" in z


def test_zoo_report_single_seed_model(results, tmp_path):
    zoo = _fake_zoo()
    one = json.loads(json.dumps(zoo["runs"][1]))
    one.update(model="small-mixtral", seed=0)
    for p in one["points"]:
        p["bpb"] += 0.5 if p["method"] == "router" else 0.0  # ours worse than random on this model
    zoo["runs"].append(one)
    z = report.zoo_markdown(zoo)
    text = "\n".join(z)
    assert "**Seeds.** small-mixtral has a single build seed" in text and "tiny (2 seeds) only" in text
    head = next(l for l in z if l.startswith("**small-mixtral, fine-tuned model") and "{3,2}" in l)
    assert "one build seed (float: 2.5000)" in head
    rows = z[z.index(head) + 4:z.index(head) + 7]
    assert rows[1].startswith("| 2.500 | 3.2500 | **2.7500** | 2.8000 |") and "±" not in "".join(rows)
    assert ("small-mixtral: router-norm better in 0/4 (-0.4500), router-norm + MaxVar better in 4/4 (+0.0500); "
            "tiny: router-norm better in 8/8 (+0.0500)") in text
    assert "more than one build seed of small-mixtral" in text and "the control fine-tunes of small-mixtral" in text


def test_spearman_and_group_size():
    from types import SimpleNamespace

    from moe_export.repro.zoo_sweep import group_size_for, spearman

    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert group_size_for([SimpleNamespace(hidden_size=64, intermediate_size=128)]) == 64
    assert group_size_for([SimpleNamespace(hidden_size=256, intermediate_size=512)]) == 128
    assert group_size_for([SimpleNamespace(hidden_size=192, intermediate_size=384)]) == 64


def test_zoo_runner_on_tiny(tiny_zoo_dir, tmp_path, monkeypatch):
    from moe_export.repro import zoo_sweep

    sw = zoo_sweep.ZooSweep(settings=("finetune", "pretrain-init"), level_sets=("3,2",), avg_bits={"3,2": [2.5]},
                            methods=("router", "random", "uniform"), eval_tokens=256, calib_tokens=128,
                            random_seeds=(0,), controls=False)
    out = zoo_sweep.run_zoo(sw, progress=False, cache_dir=tmp_path)
    (run,) = out["runs"]
    # pre-train setting: the router plan follows the change from the initialisation, not the final norm
    init_pts = {p["method"]: p for p in run["points"] if p["setting"] == "pretrain-init"}
    for layer_bits, (layer, sc) in zip(init_pts["router"]["bits"], run["scores"].items()):
        top = sorted(range(8), key=lambda e: sc["init_change"][e])[:4]
        assert sorted(e for e in range(8) if layer_bits[e] == 3) == sorted(top), layer
    pts = {p["method"]: p for p in run["points"] if p["setting"] == "finetune"}
    assert set(pts) == {"router", "random"}  # uniform only at integer widths
    # the record says how good the float model is, beside the bigram baseline of its manifest
    b = run["build"]
    assert b["parameters"] > 0 and b["pretrained"]["corpus"] == "shakespeare" and b["finetuned"]["corpus"] == "python-stdlib"
    assert 0 < b["finetuned"]["bpb"] < 10 and 0 < b["finetuned"]["token_bigram_bpb"] < 10
    assert "The models before quantization" in "\n".join(report.zoo_markdown(out))
    for p in pts.values():
        assert p["bpb"] > run["float"]["finetune"]["bpb"] - 0.05 and p["plan_s"] >= 0
        for layer_bits in p["bits"]:
            assert sorted(layer_bits) == [2] * 4 + [3] * 4  # 2.5 bits over 8 experts
    # router-norm: the 4 smallest signed changes of each layer get 3 bits
    for layer_bits, (layer, sc) in zip(pts["router"]["bits"], run["scores"].items()):
        top = sorted(range(8), key=lambda e: sc["change"][e])[:4]
        assert sorted(e for e in range(8) if layer_bits[e] == 3) == sorted(top), layer
    # a rerun of the same sweep reads the saved record instead of recomputing
    monkeypatch.setattr(zoo_sweep, "run_model", lambda *a, **k: pytest.fail("recomputed a cached record"))
    again = zoo_sweep.run_zoo(sw, progress=False, cache_dir=tmp_path)
    assert again["runs"][0]["points"] == run["points"]
    assert again["reused"] == ["tiny@0"] and out["reused"] == [] and run["wall_s"] > 0
    assert "controls" not in again["runs"][0]
    # controls=False runs no control fine-tune, but reports one already in the cache
    (tmp_path / "tiny-s0-controls.json").write_text('{"spearman": {}}')
    assert zoo_sweep.run_zoo(sw, progress=False, cache_dir=tmp_path)["runs"][0]["controls"] == {"spearman": {}}


def test_pretrain_init_shares_reference_free_points(tiny_zoo_dir, tmp_path):
    from moe_export.repro import zoo_sweep

    sw = zoo_sweep.ZooSweep(settings=("pretrain-init", "pretrain-only"), level_sets=("3,2",), avg_bits={"3,2": [2.5]},
                            methods=("router", "maxvar"), eval_tokens=256, calib_tokens=128, random_seeds=(0,),
                            controls=False)
    (run,) = zoo_sweep.run_zoo(sw, progress=False)["runs"]
    pts = {(p["setting"], p["method"]): p for p in run["points"]}
    assert set(pts) == {(s, m) for s in ("pretrain-init", "pretrain-only") for m in ("router", "maxvar")}
    # maxvar ignores the reference: pretrain-init reuses the pretrain-only point instead of recomputing it
    shared = pts[("pretrain-init", "maxvar")]
    assert shared["shared_with"] == "pretrain-only" and shared["bpb"] == pts[("pretrain-only", "maxvar")]["bpb"]
    assert "shared_with" not in pts[("pretrain-init", "router")]
    # the router plan of each setting follows its own score
    for setting, key in (("pretrain-init", "init_change"), ("pretrain-only", "pretrained_norm")):
        for layer_bits, sc in zip(pts[(setting, "router")]["bits"], run["scores"].values()):
            top = sorted(range(8), key=lambda e: sc[key][e])[:4]
            assert sorted(e for e in range(8) if layer_bits[e] == 3) == sorted(top), setting
