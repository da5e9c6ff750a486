"""Recipes: one versioned JSON file that says what to quantize and how, run with ``moe-export run``.

A recipe names a model (a zoo entry, a local folder, or a hub id with its architecture config), the plan
method, bit levels and average, the quantizer and group size, the non-expert policy and the export
targets. Recipes for real checkpoints are validated against their architecture config, built from
transformers' config classes on the meta device, so no weights are downloaded.

The shipped recipes are the ``*.json`` files beside this module, package data found through
``importlib.resources``, so they are there in an installed wheel as in a source checkout.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from fractions import Fraction
from importlib import resources
from itertools import product
from pathlib import Path

from moe_export.plan.bitplan import BitPlanError, NonExpertPolicy

RECIPE_FORMAT = "moe_export.recipe"
RECIPE_VERSION = 1
KNOWN_METHODS = (
    "router", "router+maxvar", "maxvar", "weight-error", "frequency", "routing-weight", "pmq", "random", "uniform",
)
KNOWN_QUANTIZERS = ("rtn", "hqq", "gptq")
KNOWN_TARGETS = ("pte", "onnx")


# Every field a run honours, per section; anything else is an error when the recipe is loaded (a misspelt or
# unsupported field would otherwise be ignored silently). ``expected_memory`` is what the recipe states about the
# run (footprint, peak RSS, speed): read by people and checked by the tests, not by the run.
FIELDS = {
    "": ("format", "version", "name", "description", "model", "plan", "quantizer", "non_expert", "export",
         "expected_memory"),
    "model": ("zoo", "path", "id", "architecture", "config"),
    "plan": ("method", "levels", "avg_bits", "zeta", "reference", "calib_tokens"),
    "quantizer": ("name", "group_size", "symmetric", "calib_tokens"),
    "export": ("targets", "pte_modes", "onnx_modes"),
}


class RecipeError(ValueError):
    pass


@dataclass
class Recipe:
    name: str
    description: str
    model: dict
    plan: dict
    quantizer: dict
    non_expert: NonExpertPolicy
    export: dict
    expected_memory: dict = field(default_factory=dict)
    source: str = "<dict>"

    @property
    def avg_bits(self) -> float:
        return float(self.plan["avg_bits"])

    @property
    def levels(self) -> list[int]:
        return [int(b) for b in self.plan["levels"]]

    @property
    def group_size(self) -> int | None:
        return self.quantizer.get("group_size")

    @property
    def targets(self) -> list[str]:
        return list(self.export.get("targets", []))

    # --- loading -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, doc: dict, source: str = "<dict>") -> "Recipe":
        def fail(msg):
            raise RecipeError(f"{source}: {msg}")

        if doc.get("format") != RECIPE_FORMAT:
            fail(f"not a moe_export recipe (format {doc.get('format')!r}, expected {RECIPE_FORMAT!r})")
        if doc.get("version") != RECIPE_VERSION:
            fail(f"unknown recipe version {doc.get('version')!r}; this moe_export reads version {RECIPE_VERSION}")
        for key in ("name", "model", "plan", "quantizer"):
            if key not in doc:
                fail(f"missing required field {key!r}")
        for section, known in FIELDS.items():
            node = doc if not section else doc.get(section, {})
            if not isinstance(node, dict):
                fail(f"{section} must be an object, got {type(node).__name__}")
            unknown = sorted(set(node) - set(known))
            if unknown:
                where = f"{section}." if section else ""
                fail(f"unknown field(s) {', '.join(where + k for k in unknown)}: a run cannot honour them; "
                     f"{section or 'a recipe'} takes {', '.join(known)}")
        model = doc["model"]
        if not any(k in model for k in ("zoo", "path", "id")):
            fail("model needs one of 'zoo' (a zoo entry), 'path' (a local folder) or 'id' (a hub id with 'architecture')")
        if "id" in model and "architecture" not in model:
            fail("model.id needs model.architecture (and model.config) so the recipe can be checked without a download")
        plan = doc["plan"]
        if plan.get("method", "router+maxvar") not in KNOWN_METHODS:
            fail(f"plan.method {plan.get('method')!r} is not one of {', '.join(KNOWN_METHODS)}")
        levels = plan.get("levels")
        if not levels or any(not isinstance(b, int) or not 1 <= b <= 8 for b in levels):
            fail(f"plan.levels must be bit widths in 1..8, got {levels!r}")
        if "avg_bits" not in plan:
            fail("plan.avg_bits is required")
        if not min(levels) <= float(plan["avg_bits"]) <= max(levels):
            fail(f"plan.avg_bits {plan['avg_bits']} lies outside the levels {levels}")
        from moe_export.export.executorch import PTE_MODES
        from moe_export.export.onnx import ONNX_MODES
        from moe_export.plan.methods import CALIBRATED

        if "calib_tokens" in plan and plan.get("method", "router+maxvar") not in CALIBRATED:
            fail(f"plan.calib_tokens is for the calibrated methods ({', '.join(CALIBRATED)}); "
                 f"{plan.get('method', 'router+maxvar')} reads no calibration text")
        ref = plan.get("reference")
        if ref is not None and not isinstance(ref, str):
            fail(f"plan.reference must be a local folder path or null, got {ref!r}")
        q = doc["quantizer"]
        if q.get("name") not in KNOWN_QUANTIZERS:
            fail(f"quantizer.name {q.get('name')!r} is not one of {', '.join(KNOWN_QUANTIZERS)}")
        if "calib_tokens" in q and q["name"] != "gptq":
            fail(f"quantizer.calib_tokens is for gptq; {q['name']} reads no calibration text")
        g = q.get("group_size")
        if g is not None and (not isinstance(g, int) or g <= 0):
            fail(f"quantizer.group_size must be a positive integer or null (whole row), got {g!r}")
        targets = doc.get("export", {}).get("targets", [])
        bad = [t for t in targets if t not in KNOWN_TARGETS]
        if bad:
            fail(f"export.targets {bad} not among {', '.join(KNOWN_TARGETS)}")
        for key, known in (("pte_modes", PTE_MODES), ("onnx_modes", ONNX_MODES)):
            bad = [m for m in doc.get("export", {}).get(key, []) if m not in known]
            if bad:
                fail(f"export.{key} {bad} not among {', '.join(known)}")
        try:
            non_expert = NonExpertPolicy.from_dict(doc.get("non_expert", {}))
        except BitPlanError as err:
            fail(str(err))
        return cls(
            name=doc["name"], description=doc.get("description", ""), model=model, plan=plan, quantizer=q,
            non_expert=non_expert, export=doc.get("export", {}), expected_memory=doc.get("expected_memory", {}),
            source=source,
        )

    @classmethod
    def load(cls, path_or_name: str | Path) -> "Recipe":
        path = Path(path_or_name)
        if not path.exists():
            shipped = _shipped().joinpath(f"{path_or_name}.json")
            if not shipped.is_file():
                raise RecipeError(f"no recipe at {path_or_name!r}; shipped recipes: {', '.join(shipped_recipes())}")
            path = shipped
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise RecipeError(f"{path}: not valid JSON ({err})") from err
        return cls.from_dict(doc, source=str(path))

    # --- architecture checks (no download) -----------------------------------------------------
    def build_config(self):
        import transformers

        arch = self.model["architecture"]
        model_type = {
            "MixtralForCausalLM": "mixtral", "Qwen3MoeForCausalLM": "qwen3_moe", "OlmoeForCausalLM": "olmoe",
            "SwitchTransformersForConditionalGeneration": "switch_transformers", "Qwen2MoeForCausalLM": "qwen2_moe",
            "DeepseekV2ForCausalLM": "deepseek_v2", "DeepseekV3ForCausalLM": "deepseek_v3",
        }.get(arch)
        if model_type is None:
            raise RecipeError(f"{self.source}: architecture {arch!r} has no config class mapping here")
        return transformers.AutoConfig.for_model(model_type, **self.model.get("config", {}))

    def meta_model(self):
        """The architecture on the meta device: every shape, no memory, no download."""
        import torch
        import transformers

        config = self.build_config()
        cls = getattr(transformers, self.model["architecture"])
        with torch.device("meta"):
            return cls(config)


def run_reference(recipe: Recipe, default):
    """The router-norm reference a run plans against: ``plan.reference`` (a local folder) if the recipe names one,
    else ``default`` (a zoo build's pre-trained checkpoint, or None: the final-norm proxy)."""
    ref = recipe.plan.get("reference")
    if ref is None:
        return default
    path = Path(ref).expanduser()
    if not (path / "config.json").is_file():
        raise RecipeError(f"{recipe.source}: plan.reference {ref!r} is not a local checkpoint folder (no config.json); "
                          "download the reference checkpoint and give its folder, or set plan.reference to null")
    return path


def check_runnable(recipe: Recipe, folder: Path, streamed: bool, budget: int | None) -> None:
    """Fail before any weight is read when this run cannot do what ``recipe`` asks of the checkpoint ``folder``:
    calibrated planning or GPTQ on a model that must stream (``streamed``: over half the memory ``budget``), either
    without a tokenizer to make calibration text with, or an architecture other than the recipe's."""
    import json

    from moe_export.plan.methods import CALIBRATED
    from moe_export.streaming import DATA_FREE

    method, quantizer = recipe.plan.get("method", "router+maxvar"), recipe.quantizer["name"]
    arch = (json.loads((folder / "config.json").read_text()).get("architectures") or [None])[0]
    if recipe.model.get("architecture") not in (None, arch):
        raise RecipeError(f"{recipe.source}: the recipe is for {recipe.model['architecture']} but {folder} holds {arch}")
    if streamed:
        from moe_export.size import safetensors_bytes
        from moe_export.streaming import mem_available

        why = (f"{folder} ({safetensors_bytes(folder) / 2**30:.2f} GiB) is over half the memory budget "
               f"({(budget if budget is not None else mem_available()) / 2**30:.2f} GiB), so it is quantized one layer "
               "at a time")
        if method in CALIBRATED:
            raise RecipeError(f"{recipe.source}: plan.method {method} needs the whole model in memory for its routing "
                              f"statistics, but {why}; use a data-free method or a larger --memory-budget")
        if quantizer not in DATA_FREE:
            raise RecipeError(f"{recipe.source}: quantizer {quantizer} needs the whole model in memory for calibration, "
                              f"but {why}; use {' or '.join(DATA_FREE)} or a larger --memory-budget")
    needs_text = [f"plan.method {method}"] * (method in CALIBRATED) + [f"quantizer {quantizer}"] * (quantizer == "gptq")
    if needs_text and not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        raise RecipeError(f"{recipe.source}: {' and '.join(needs_text)} need calibration text, and {folder} has no "
                          "tokenizer to make it with; copy the model's tokenizer files into it")


def _shipped():
    """The folder of shipped recipes (an ``importlib.resources`` Traversable: this package's data files)."""
    return resources.files(__name__)


def shipped_recipes() -> list[str]:
    return sorted(p.name.removesuffix(".json") for p in _shipped().iterdir() if p.name.endswith(".json"))


def reachable_counts(num_experts: int, levels: list[int], avg_bits: float) -> list[tuple[int, ...]]:
    """Every way to give ``num_experts`` experts widths from ``levels`` with mean exactly ``avg_bits``."""
    target = Fraction(str(avg_bits)) * num_experts
    out = []
    for counts in product(range(num_experts + 1), repeat=len(levels) - 1):
        rest = num_experts - sum(counts)
        if rest < 0:
            continue
        full = (*counts, rest)
        if sum(n * b for n, b in zip(full, levels)) == target:
            out.append(full)
    return out


def validate_recipe(recipe: Recipe) -> dict:
    """Check a recipe against its architecture: layer names exist, group sizes divide every quantized
    dim, the average is reachable in every MoE layer. Returns a summary (with the memory footprint)."""
    from moe_export.models import find_moe_layers

    model = recipe.meta_model()
    layers = find_moe_layers(model)
    if not layers:
        raise RecipeError(f"{recipe.source}: {recipe.model['architecture']} has no MoE layer")
    names = {name for name, _ in model.named_modules()}
    g = recipe.group_size
    for layer in layers:
        if layer.name not in names:
            raise RecipeError(f"{recipe.source}: MoE layer {layer.name!r} is not a module of the model")
        for proj in layer.projections:
            k = layer.expert_weight(proj, 0).shape[-1]
            if g is not None and k % g:
                raise RecipeError(f"{recipe.source}: group size {g} does not divide {layer.name}.{proj} input dim {k}")
        if not reachable_counts(layer.num_experts, recipe.levels, recipe.avg_bits):
            raise RecipeError(
                f"{recipe.source}: average {recipe.avg_bits} bits is not reachable with levels {recipe.levels} "
                f"and {layer.num_experts} experts in {layer.name}"
            )
    return {"moe_layers": len(layers), "experts_per_layer": layers[0].num_experts, **memory_footprint(recipe, model, layers)}


def memory_footprint(recipe: Recipe, model=None, layers=None) -> dict:
    """Weight bytes of the model in float16 and quantized by the recipe (``moe_export.size``), in GiB.

    Quantized: the experts at the recipe's mean width, each non-expert weight by the non-expert policy, a weight
    the policy leaves float (or that does not pack) at the checkpoint's dtype: the recipe config's ``dtype``
    (or ``torch_dtype``), else 16-bit, as MoE checkpoints are published."""
    import torch

    from moe_export.models import find_moe_layers, parameter_role_lookup
    from moe_export.size import non_expert_bytes, theoretical_bytes

    model = recipe.meta_model() if model is None else model
    layers = find_moe_layers(model) if layers is None else layers
    sym = bool(recipe.quantizer.get("symmetric", False))
    config = recipe.model.get("config", {})
    dtype = config.get("dtype", config.get("torch_dtype", "float16"))
    itemsize = getattr(torch, dtype).itemsize if isinstance(dtype, str) else 2
    expert_params = 0
    expert_bytes = 0.0
    for layer in layers:
        for proj in layer.projections:
            n, k = layer.expert_weight(proj, 0).shape
            expert_params += n * k * layer.num_experts
            expert_bytes += layer.num_experts * theoretical_bytes(n, k, recipe.avg_bits, recipe.group_size, sym)
    float_bytes = 0.0
    other_bytes = 0.0
    seen = set()
    role_of = parameter_role_lookup(model)
    for fqn, p in model.named_parameters(remove_duplicate=True):
        if id(p) in seen:
            continue
        seen.add(id(p))
        float_bytes += 2 * p.numel()
        role = role_of(fqn)
        if role == "experts":
            continue
        other_bytes += non_expert_bytes(tuple(p.shape), itemsize, recipe.non_expert.quant_for(role))
    gib = 1024**3
    return {
        "float16_gib": round(float_bytes / gib, 2),
        "quantized_gib": round((expert_bytes + other_bytes) / gib, 2),
        "expert_params_billion": round(expert_params / 1e9, 3),
    }
