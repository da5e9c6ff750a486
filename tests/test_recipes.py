import json

import pytest

from moe_export.recipes import Recipe, RecipeError, reachable_counts, shipped_recipes, validate_recipe

REAL_RECIPES = [n for n in shipped_recipes() if "id" in Recipe.load(n).model]


def test_ships_recipes_for_the_real_moe_models_users_deploy():
    archs = {Recipe.load(n).model["architecture"] for n in REAL_RECIPES}
    assert {"MixtralForCausalLM", "Qwen3MoeForCausalLM", "OlmoeForCausalLM",
            "SwitchTransformersForConditionalGeneration", "Qwen2MoeForCausalLM"} <= archs


@pytest.mark.parametrize("name", REAL_RECIPES)
def test_real_recipe_is_valid_for_its_architecture_and_states_its_footprint(name):
    recipe = Recipe.load(name)
    summary = validate_recipe(recipe)  # builds the architecture on the meta device: no download
    assert summary["moe_layers"] > 0
    assert recipe.expected_memory["float16_gib"] == summary["float16_gib"]
    assert recipe.expected_memory["quantized_gib"] == summary["quantized_gib"]
    assert summary["quantized_gib"] < summary["float16_gib"] / 3


def test_mixtral_recipe_matches_the_paper_settings():
    r = Recipe.load("mixtral-8x7b-paper")
    assert r.plan["method"] == "router+maxvar" and r.plan["zeta"] == 3.0
    assert r.levels == [3, 2, 1] and r.group_size == 128
    assert r.quantizer["name"] == "gptq" and r.quantizer["symmetric"] is False


def _changed(doc: dict, changes: dict) -> dict:
    """``doc`` with each ``"section.field": value`` of ``changes`` set."""
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = doc
        for p in path:
            node = node[p]
        node[last] = value
    return doc


def _doc(**changes):
    with open(Recipe.load("mixtral-8x7b-paper").source) as f:
        return _changed(json.load(f), changes)


def test_group_size_that_does_not_divide_a_dim_is_rejected():
    recipe = Recipe.from_dict(_doc(**{"quantizer.group_size": 96}), source="bad.json")
    with pytest.raises(RecipeError, match="group size 96 does not divide"):
        validate_recipe(recipe)


def test_run_checks_a_real_recipe_before_reading_weights(tmp_path):
    from click.testing import CliRunner

    from moe_export.cli import main

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(_doc(**{"quantizer.group_size": 96})))
    r = CliRunner().invoke(main, ["run", str(bad), "-o", str(tmp_path / "work")])
    assert r.exit_code == 1 and "group size 96 does not divide" in r.output and "Traceback" not in r.output


def test_unreachable_average_is_rejected():
    recipe = Recipe.from_dict(_doc(**{"plan.avg_bits": 2.3, "plan.levels": [3, 2]}), source="bad.json")
    with pytest.raises(RecipeError, match="not reachable"):
        validate_recipe(recipe)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"version": 99}, "unknown recipe version"),
        ({"plan.method": "magic"}, "plan.method"),
        ({"plan.levels": [3, 9]}, "1..8"),
        ({"plan.avg_bits": 3.5}, "outside the levels"),
        ({"quantizer.name": "awq"}, "quantizer.name"),
        ({"quantizer.group_size": 0}, "positive integer"),
        ({"export.targets": ["tflite"]}, "export.targets"),
    ],
)
def test_bad_recipes_fail_with_one_clear_message(change, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(_doc(**change), source="bad.json")


def test_reachable_counts_enumerates_exact_means():
    assert reachable_counts(8, [3, 2], 2.5) == [(4, 4)]
    assert (2, 4, 2) in reachable_counts(8, [3, 2, 1], 2.0)
    assert reachable_counts(8, [3, 2], 2.3) == []


def test_unknown_recipe_name_lists_the_shipped_ones():
    with pytest.raises(RecipeError, match="mixtral-8x7b-paper"):
        Recipe.load("no-such-recipe")


def _tiny_recipe(**changes) -> dict:
    doc = {"format": "moe_export.recipe", "version": 1, "name": "tiny-bf16",
           "model": {"path": "unused", "architecture": "MixtralForCausalLM"},
           "plan": {"method": "router+maxvar", "levels": [3, 2], "avg_bits": 2.5},
           "quantizer": {"name": "rtn", "group_size": 32, "symmetric": False},
           "export": {"targets": ["onnx"], "onnx_modes": ["packed"]}}
    return _changed(doc, changes)


def test_run_streams_a_bf16_checkpoint_that_does_not_fit_the_memory_budget(tmp_path):
    """`moe-export run RECIPE --model DIR --memory-budget GIB`: a bfloat16 checkpoint over half the budget is planned and
    quantized one layer at a time into shards, and compile, export and parity run on the packed model."""
    import torch
    from click.testing import CliRunner

    from moe_export.cli import main
    from moe_export.model_configs import tiny_random_model
    from moe_export.streaming import INDEX

    src = tmp_path / "src"
    tiny_random_model("MixtralForCausalLM", seed=2, num_layers=1).to(torch.bfloat16).save_pretrained(src)
    (tmp_path / "r.json").write_text(json.dumps(_tiny_recipe()))
    work = tmp_path / "work"
    res = CliRunner().invoke(main, ["run", str(tmp_path / "r.json"), "--model", str(src), "--memory-budget", "1e-6",
                                    "-o", str(work), "-q"])
    assert res.exit_code == 0, res.output
    assert "streaming" in res.output
    summary = json.loads((work / "summary.json").read_text())
    assert summary["streamed"] is True and (work / "quantized" / INDEX).is_file()
    assert not (work / "quantized" / "model.safetensors").exists()  # shards, as streaming writes them
    cfg = json.loads((work / "quantized" / "config.json").read_text())
    assert cfg["dtype"] == "bfloat16"
    # inductor fuses the bfloat16 casts differently from eager: one bf16 ulp (2**-8 at |logit| < 1) measured
    assert summary["compile"]["max_abs_err_vs_eager"] < 1e-2 and summary["compile"]["sqnr_vs_float_db"] is None
    (art,) = summary["export"]["artifacts"]
    assert art["parity_ok"] and summary["export"]["dtype"] == {"checkpoint": "bfloat16", "artifacts": "float32"}


@pytest.mark.parametrize("name", shipped_recipes())
@pytest.mark.parametrize("method", ["shipped", "frequency", "routing-weight", "pmq"])
def test_every_shipped_recipe_validates_with_its_method_and_with_each_calibrated_one(name, method, tmp_path):
    """Every shipped recipe, as shipped and with each calibrated plan method: it loads and validates; a calibrated
    method on a checkpoint that must stream, or on a folder without a tokenizer, fails before any weight is read."""
    from moe_export.recipes import check_runnable

    doc = json.loads(open(Recipe.load(name).source).read())
    if method != "shipped":
        doc["plan"]["method"] = method
        doc["plan"].pop("zeta", None)
        doc["plan"]["calib_tokens"] = 4096
    recipe = Recipe.from_dict(doc, source=f"{name}.json")
    if "architecture" in recipe.model:
        validate_recipe(recipe)
    folder = tmp_path / "model"
    folder.mkdir()
    arch = recipe.model.get("architecture", "MixtralForCausalLM")
    (folder / "config.json").write_text(json.dumps({"architectures": [arch]}))
    (folder / "model.safetensors").write_bytes(b"\0" * 4096)
    calibrates = method != "shipped" or recipe.quantizer["name"] == "gptq"
    if not calibrates:
        check_runnable(recipe, folder, streamed=False, budget=None)  # in memory, no calibration text needed
    else:
        with pytest.raises(RecipeError, match="no tokenizer"):
            check_runnable(recipe, folder, streamed=False, budget=None)
    (folder / "tokenizer.json").write_text("{}")
    check_runnable(recipe, folder, streamed=False, budget=None)
    if calibrates:
        with pytest.raises(RecipeError, match="whole model in memory"):
            check_runnable(recipe, folder, streamed=True, budget=1024)
    else:
        check_runnable(recipe, folder, streamed=True, budget=1024)


def test_calibrated_method_runs_its_plan_in_a_recipe(tiny_zoo_dir, tmp_path):
    """A calibrated plan method is planned from the loaded model with calibration text (it used to pass validation
    and then fail in planning)."""
    from moe_export.pipeline import run_recipe

    recipe = Recipe.from_dict(_tiny_recipe(**{"model": {"path": str(tiny_zoo_dir)}, "plan.method": "frequency",
                                              "plan.calib_tokens": 512, "export.targets": []}), source="freq.json")
    summary = run_recipe(recipe, tmp_path / "work", progress=False, echo=lambda *a: None)
    plan = json.loads((tmp_path / "work" / "plan.json").read_text())
    assert plan["provenance"]["method"] == "frequency" and plan["provenance"]["calibration_tokens"] >= 512
    assert summary["export"] is None


@pytest.mark.parametrize(
    "change, message",
    [
        ({"plan.referense": "x"}, "unknown field.*plan.referense"),
        ({"export.pte_mode": ["packed"]}, "unknown field.*export.pte_mode"),
        ({"export.onnx_modes": ["speedy"]}, "export.onnx_modes"),
        ({"quantizer.calib_tokens": 64}, "calib_tokens is for gptq"),
        ({"plan.calib_tokens": 64}, "calib_tokens is for the calibrated methods"),
        ({"plan.reference": 3}, "plan.reference must be"),
        ({"streaming": True}, "unknown field.*streaming"),
    ],
)
def test_fields_a_run_cannot_honour_fail_when_the_recipe_loads(change, message):
    with pytest.raises(RecipeError, match=message):
        Recipe.from_dict(_tiny_recipe(**change), source="bad.json")


def test_run_refuses_what_it_cannot_honour_before_reading_weights(tmp_path):
    from moe_export.pipeline import run_recipe

    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["OlmoeForCausalLM"]}))
    (model / "model.safetensors").write_bytes(b"\0" * 64)
    for change, message in (({"plan.reference": str(tmp_path / "nowhere")}, "not a local checkpoint folder"),
                            ({}, "the recipe is for MixtralForCausalLM but .* holds OlmoeForCausalLM")):
        recipe = Recipe.from_dict(_tiny_recipe(**{"model.path": str(model), **change}), source="r.json")
        with pytest.raises(RecipeError, match=message):
            run_recipe(recipe, tmp_path / "work", progress=False, echo=lambda *a: None)
        assert not (tmp_path / "work").exists()


@pytest.mark.parametrize("name", ["deepseek-v2-lite", "qwen3-30b-a3b"])
def test_large_recipes_state_size_peak_rss_and_decode_speed(name):
    mem = Recipe.load(name).expected_memory
    assert mem["quantized_gib"] > 0 and mem["peak_rss_quantize_gib"] > 0 and mem["decode_tok_s"] > 0
    assert "estimates scaled from the slice benchmarks" in mem["note"]
