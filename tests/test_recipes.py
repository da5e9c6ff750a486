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


def _doc(**changes):
    with open(Recipe.load("mixtral-8x7b-paper").source) as f:
        doc = json.load(f)
    for dotted, value in changes.items():
        *path, last = dotted.split(".")
        node = doc
        for p in path:
            node = node[p]
        node[last] = value
    return doc


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
