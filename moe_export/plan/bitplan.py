"""BitPlan: the versioned JSON artifact that says how many bits each routed expert gets.

A plan is data, not code: every consumer (quantize, checkpoint, export, bench) reads the same file.
Loading validates everything and raises one ``BitPlanError`` naming the field and the fix; the JSON
writer is canonical (fixed key order, number lists on one line), so ``to_json(from_json(t)) == t``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

BITPLAN_FORMAT = "moe_export.bitplan"
BITPLAN_VERSION = 1  # a plan with one width per routed expert and one group size for all
# A plan that chooses per tensor (each expert projection's width and each stack's group size, non-expert tensors
# one by one, a whole-model byte budget). A plan is written at the lowest version that holds it, so plans of the
# per-layer methods stay version 1, byte for byte; both versions are read.
BITPLAN_TENSORS_VERSION = 2
BITPLAN_VERSIONS = (BITPLAN_VERSION, BITPLAN_TENSORS_VERSION)
NON_EXPERT_ROLES = ("attention", "router", "shared_experts", "embeddings", "lm_head", "dense_mlp")
MIN_BITS, MAX_BITS = 1, 8
# Means are ratios of small integers; anything looser would let a wrong plan through.
MEAN_TOL = 1e-6


class BitPlanError(ValueError):
    """A bit plan is malformed or does not match the model it is applied to."""


class RouterMismatchError(BitPlanError):
    """The model's router weights are not the ones the plan was made from (``.plan``: that plan, ``.got``: the
    model's router hash)."""

    def __init__(self, message: str, plan: "BitPlan", got: str):
        super().__init__(message)
        self.plan, self.got = plan, got


@dataclass
class QuantizerSpec:
    name: str = "rtn"
    group_size: int | None = 128  # None = one group per row
    symmetric: bool = False

    def to_dict(self) -> dict:
        return {"name": self.name, "group_size": self.group_size, "symmetric": self.symmetric}


@dataclass
class LayerPlan:
    name: str  # MoE block module path, as models.find_moe_layers reports it
    bits: list[int]  # per expert, index = expert id
    # Input dims K of the expert projections ([hidden, intermediate]); lets a plan check its group
    # size on load without the model. Optional: None when unknown.
    in_dims: list[int] | None = None
    # Version 2: per projection of the expert stack ("gate_up_proj", "down_proj"; Switch "wi", "wo"):
    # {"bits": [per expert], "group_size": int or None}. One group size per projection stack, because a fused
    # expert parameter stores one group size (runtime.layout.WidthGroups). ``bits`` is then each expert's widest
    # projection. None: every projection at ``bits`` and the plan's quantizer group size.
    tensors: dict | None = None

    @property
    def num_experts(self) -> int:
        return len(self.bits)

    def to_dict(self) -> dict:
        d = {"name": self.name, "num_experts": self.num_experts, "bits": list(self.bits)}
        if self.in_dims is not None:
            d["in_dims"] = list(self.in_dims)
        if self.tensors is not None:
            d["tensors"] = {p: {"bits": list(t["bits"]), "group_size": t["group_size"]} for p, t in self.tensors.items()}
        return d


@dataclass(frozen=True)
class NonExpertQuant:
    """How the 2-D weights of one non-expert role are quantized (round-to-nearest, packed)."""

    bits: int
    group_size: int | None = None  # None = one group per row
    symmetric: bool = False

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


def read_quant(v, where: str) -> NonExpertQuant | None:
    """The JSON form of one weight's quantization: ``"float"`` (None) or ``{"bits", "group_size", "symmetric"}``.
    Raises ``BitPlanError`` naming ``where``."""
    if v == "float":
        return None
    if not isinstance(v, dict) or set(v) - {"bits", "group_size", "symmetric"} or "bits" not in v:
        raise BitPlanError(f"{where} must be \"float\" or {{\"bits\", \"group_size\", \"symmetric\"}}, got {v!r}")
    if not _is_int(v["bits"]):
        raise BitPlanError(f"{where}.bits must be an integer, got {v['bits']!r}")
    _check_bits(v["bits"], where)
    g = v.get("group_size")
    if g is not None and (not _is_int(g) or g <= 0):
        raise BitPlanError(f"{where}.group_size must be a positive integer or null, got {g!r}")
    if not isinstance(v.get("symmetric", False), bool):
        raise BitPlanError(f"{where}.symmetric must be true or false")
    return NonExpertQuant(v["bits"], g, v.get("symmetric", False))


@dataclass(frozen=True)
class NonExpertPolicy:
    """Which weights outside the routed experts are quantized: role -> ``NonExpertQuant``, or None (float).

    Every role of ``NON_EXPERT_ROLES`` is present. A plan stores it as JSON (``BitPlan.non_expert``: ``"float"``
    or ``{"bits", "group_size", "symmetric"}`` per role); ``from_dict`` is the one reader of that form and
    ``parse`` the one reader of the command-line form.
    """

    roles: dict = field(default_factory=lambda: {role: None for role in NON_EXPERT_ROLES})

    def quant_for(self, role: str) -> NonExpertQuant | None:
        """The width of ``role``'s weights, or None to keep them float (roles outside the policy, e.g.
        norms and biases, are float)."""
        return self.roles.get(role)

    @property
    def all_float(self) -> bool:
        return all(q is None for q in self.roles.values())

    def to_dict(self) -> dict:
        return {role: "float" if self.roles[role] is None else self.roles[role].to_dict() for role in NON_EXPERT_ROLES}

    def quantized(self) -> dict:
        """``{role: NonExpertQuant}`` of the roles that are not float."""
        return {role: q for role, q in self.roles.items() if q is not None}

    @classmethod
    def from_dict(cls, d) -> "NonExpertPolicy":
        """Read and validate the JSON form; a missing role is float. Raises ``BitPlanError``."""
        if not isinstance(d, dict):
            raise BitPlanError("bit plan 'non_expert' must be an object mapping role -> 'float' or {bits, group_size, symmetric}")
        unknown = set(d) - set(NON_EXPERT_ROLES)
        if unknown:
            raise BitPlanError(f"non_expert: unknown role(s) {sorted(unknown)}; roles are {list(NON_EXPERT_ROLES)}")
        return cls({role: read_quant(d.get(role, "float"), f"non_expert.{role}") for role in NON_EXPERT_ROLES})

    @classmethod
    def parse(cls, spec, group_size: int | None, symmetric: bool = False) -> "NonExpertPolicy":
        """The command-line form: items ``ROLE=float`` or ``ROLE=BITS[:GROUP|row][:sym|asym]``, comma-separated
        in one string and/or given as a list of strings (a repeated option). GROUP defaults to ``group_size``
        (the experts' group), the grid to ``symmetric``; ``row`` is one group per row. ``"float"``, ``""`` or
        None: every role float. Unnamed roles are float. Raises ``ValueError`` naming the item."""
        items = [spec] if spec is None or isinstance(spec, str) else list(spec)
        items = [i.strip() for s in items if s is not None for i in s.split(",") if i.strip()]
        if items in ([], ["float"], ["none"]):
            return cls()
        syntax = f"expected ROLE=float or ROLE=BITS[:GROUP|row][:sym|asym] with ROLE in {', '.join(NON_EXPERT_ROLES)}"
        roles = {role: None for role in NON_EXPERT_ROLES}
        for item in items:
            role, sep, rest = item.partition("=")
            if not sep or role not in NON_EXPERT_ROLES or not rest:
                raise ValueError(f"non-expert item {item!r}: {syntax}")
            if rest == "float":
                roles[role] = None
                continue
            bits, *opts = rest.split(":")
            if not bits.isdigit() or not MIN_BITS <= int(bits) <= MAX_BITS:
                raise ValueError(f"non-expert item {item!r}: {role}: expected 'float' or a width in "
                                 f"{MIN_BITS}..{MAX_BITS}, got {bits!r}")
            gs, sym = group_size, symmetric
            for p in opts:
                if p in ("sym", "asym"):
                    sym = p == "sym"
                elif p == "row":
                    gs = None
                elif p.isdigit() and int(p) > 0:
                    gs = int(p)
                else:
                    raise ValueError(f"non-expert item {item!r}: {p!r} is not a group size, 'row', 'sym' or 'asym'")
            roles[role] = NonExpertQuant(int(bits), gs, sym)
        return cls(roles)


@dataclass
class BitPlan:
    model: dict  # {"name", "architecture", "router_sha256"}
    target_avg_bits: float
    levels: list[int]
    quantizer: QuantizerSpec
    layers: list[LayerPlan]
    non_expert: dict = field(default_factory=lambda: NonExpertPolicy().to_dict())  # JSON form, see NonExpertPolicy
    provenance: dict = field(default_factory=dict)
    # Version 2: non-expert weights chosen one by one, FQN -> "float" or {"bits", "group_size", "symmetric"};
    # a tensor listed here overrides its role's ``non_expert`` policy.
    tensors: dict = field(default_factory=dict)
    # Version 2: the whole-model byte budget the plan was solved for ({"bytes", "bits_per_weight", "parameters",
    # "planned_bytes"}), None for the per-layer methods.
    budget: dict | None = None

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- queries
    @property
    def version(self) -> int:
        """The lowest format version that holds this plan."""
        per_tensor = self.tensors or self.budget is not None or any(l.tensors is not None for l in self.layers)
        return BITPLAN_TENSORS_VERSION if per_tensor else BITPLAN_VERSION

    def _layer(self, layer_name: str) -> LayerPlan:
        for layer in self.layers:
            if layer.name == layer_name:
                return layer
        raise BitPlanError(f"bit plan has no layer {layer_name!r}; it covers {[l.name for l in self.layers]}")

    def bits_for(self, layer_name: str, proj: str | None = None) -> list[int]:
        """Per-expert widths of a layer; with ``proj``, of that projection (a version 2 layer may differ per
        projection; otherwise every projection has the layer's widths)."""
        layer = self._layer(layer_name)
        if proj is not None and layer.tensors is not None:
            if proj not in layer.tensors:
                raise BitPlanError(f"layer {layer_name!r}: the plan has no projection {proj!r}; it lists "
                                   f"{sorted(layer.tensors)}")
            return list(layer.tensors[proj]["bits"])
        return list(layer.bits)

    def group_size_for(self, layer_name: str, proj: str | None = None) -> int | None:
        """Group size of one projection stack of a layer (the quantizer's unless the layer chooses per tensor)."""
        layer = self._layer(layer_name)
        if proj is not None and layer.tensors is not None:
            self.bits_for(layer_name, proj)  # names a missing projection
            return layer.tensors[proj]["group_size"]
        return self.quantizer.group_size

    def expert_quant(self, layer_name: str, projections) -> tuple[dict, dict]:
        """``({proj: per-expert widths}, {proj: group size})`` of a layer's expert stacks."""
        return ({p: self.bits_for(layer_name, p) for p in projections},
                {p: self.group_size_for(layer_name, p) for p in projections})

    def non_expert_quant_for(self, names, role: str):
        """``NonExpertQuant`` or None (float) of a non-expert weight known by ``names`` (every FQN of a tied
        parameter): its own entry in ``tensors`` when it has one, else its role's policy."""
        listed = [n for n in names if n in self.tensors]
        if not listed:
            return self.non_expert_policy().quant_for(role)
        got = {json.dumps(self.tensors[n], sort_keys=True) for n in listed}
        if len(got) > 1:
            raise BitPlanError(f"tied parameter {listed} has different entries in the plan's tensors: {sorted(got)}")
        return read_quant(self.tensors[listed[0]], f"tensors[{listed[0]!r}]")

    @property
    def layer_names(self) -> list[str]:
        return [layer.name for layer in self.layers]

    def mean_bits(self) -> float:
        n = sum(len(l.bits) for l in self.layers)
        return sum(sum(l.bits) for l in self.layers) / n if n else float("nan")

    def counts(self) -> list[dict[int, int]]:
        """Per layer: bits -> number of experts at that width."""
        return [{b: l.bits.count(b) for b in sorted(set(l.bits), reverse=True)} for l in self.layers]

    # ------------------------------------------------------------- validation
    def validate(self) -> None:
        """Self-consistency checks that need no model. Raises BitPlanError with one message."""
        if not isinstance(self.model, dict):
            raise BitPlanError(f"bit plan 'model' must be an object, got {type(self.model).__name__}")
        for key in ("name", "architecture", "router_sha256"):
            if not isinstance(self.model.get(key, ""), str):
                raise BitPlanError(f"bit plan model.{key} must be a string, got {self.model.get(key)!r}")
        self.model = {k: self.model.get(k, "") for k in ("name", "architecture", "router_sha256")}
        q = self.quantizer
        if not isinstance(q, QuantizerSpec):
            raise BitPlanError("bit plan 'quantizer' must be a QuantizerSpec")
        if not isinstance(q.name, str) or not q.name:
            raise BitPlanError(f"quantizer.name must be a non-empty string such as 'rtn', got {q.name!r}")
        if q.group_size is not None and (not _is_int(q.group_size) or q.group_size <= 0):
            raise BitPlanError(f"quantizer.group_size must be a positive integer or null (whole row), got {q.group_size!r}")
        if not isinstance(q.symmetric, bool):
            raise BitPlanError(f"quantizer.symmetric must be true or false, got {q.symmetric!r}")
        if not isinstance(self.levels, (list, tuple)) or not self.levels or not all(_is_int(b) for b in self.levels):
            raise BitPlanError(f"bit plan 'levels' must be a non-empty list of integers, got {self.levels!r}")
        for b in self.levels:
            _check_bits(b, "levels")
        if not _is_number(self.target_avg_bits) or not math.isfinite(self.target_avg_bits):
            raise BitPlanError(f"target_avg_bits must be a finite number, got {self.target_avg_bits!r}")
        self.target_avg_bits = float(self.target_avg_bits)
        if not self.layers:
            raise BitPlanError("bit plan has no layers; plan a model with at least one MoE layer")
        seen = set()
        for layer in self.layers:
            if layer.name in seen:
                raise BitPlanError(f"bit plan lists layer {layer.name!r} twice")
            seen.add(layer.name)
            if not layer.bits:
                raise BitPlanError(f"layer {layer.name!r}: empty bits list; give one width per expert")
            for e, b in enumerate(layer.bits):
                if not _is_int(b):
                    raise BitPlanError(f"layer {layer.name!r} expert {e}: bits must be an integer, got {b!r}")
                _check_bits(b, f"layer {layer.name!r} expert {e}")
                if b not in self.levels:
                    raise BitPlanError(
                        f"layer {layer.name!r} expert {e}: {b} bits is not one of the plan's levels {self.levels}; "
                        "add it to 'levels' or change the width"
                    )
            if layer.in_dims is not None and layer.tensors is None:
                for k in layer.in_dims:
                    _check_group_divides(q.group_size, k, layer.name)
            if layer.tensors is not None:
                _check_layer_tensors(layer, self.levels)
        mean = self.mean_bits()
        if abs(mean - self.target_avg_bits) > MEAN_TOL:
            raise BitPlanError(
                f"mean expert bits {mean:.6g} differs from the declared target_avg_bits {self.target_avg_bits:g}; "
                "re-plan, or set target_avg_bits to the achieved mean"
            )
        self._validate_non_expert()

    def _validate_non_expert(self) -> None:
        self.non_expert = NonExpertPolicy.from_dict(self.non_expert).to_dict()  # canonical: every role, in order
        if not isinstance(self.tensors, dict):
            raise BitPlanError(f"bit plan 'tensors' must be an object mapping FQN -> 'float' or {{bits, group_size, "
                               f"symmetric}}, got {self.tensors!r}")
        self.tensors = {str(n): "float" if (q := read_quant(v, f"tensors[{n!r}]")) is None else q.to_dict()
                        for n, v in sorted(self.tensors.items())}
        if self.budget is not None:
            b = self.budget
            if not isinstance(b, dict) or not all(_is_number(b.get(k)) and math.isfinite(b[k]) and b[k] > 0
                                                  for k in ("bytes", "bits_per_weight", "parameters", "planned_bytes")):
                raise BitPlanError("bit plan 'budget' must be {\"bytes\", \"bits_per_weight\", \"parameters\", "
                                   f"\"planned_bytes\"}} of positive numbers, got {b!r}")
            self.budget = {k: b[k] for k in ("bytes", "bits_per_weight", "parameters", "planned_bytes")}

    def non_expert_policy(self) -> "NonExpertPolicy":
        """The typed form of ``non_expert`` (read at each call, so edits to the JSON form are seen)."""
        return NonExpertPolicy.from_dict(self.non_expert)

    def validate_against(self, model_or_layers, check_router: bool = True) -> None:
        """Check the plan fits a model: an ``nn.Module``, a list of ``MoELayer``, or a checkpoint folder.

        Layer names, expert counts, group size against every expert input dim, and (when the plan
        records one and the weights are at hand) the router hash.
        """
        layers, routers = _resolve_layers(model_or_layers)
        have = {l.name: l for l in layers}
        _check_layers_match([(lp.name, lp.num_experts) for lp in self.layers], have)
        for lp in self.layers:
            if lp.tensors is None:
                for k in _in_dims(have[lp.name]):
                    _check_group_divides(self.quantizer.group_size, k, lp.name)
                continue
            projections = getattr(have[lp.name], "projections", None)
            if projections is not None and set(lp.tensors) != set(projections):
                raise BitPlanError(f"layer {lp.name!r}: the plan's projections {sorted(lp.tensors)} are not the "
                                   f"model's {sorted(projections)}; re-run `moe-export plan` on this model")
            if hasattr(have[lp.name], "expert_weight"):
                for p in lp.tensors:
                    _check_group_divides(lp.tensors[p]["group_size"], have[lp.name].expert_weight(p, 0).shape[1],
                                         f"{lp.name}.{p}")
        want = self.model.get("router_sha256", "")
        if check_router and want and routers is not None:
            got = router_sha256(routers)
            if got != want:
                made_for = " ".join(x for x in (self.model.get("architecture"), repr(self.model.get("name", ""))) if x)
                raise RouterMismatchError(
                    f"router weights hash {got[:12]}... differs from the plan's {want[:12]}...: the plan was made "
                    f"for another checkpoint ({made_for}); re-plan, or pass check_router=False if this is intended",
                    self, got,
                )

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict:
        d = {
            "format": BITPLAN_FORMAT,
            "version": self.version,
            "model": dict(self.model),
            "target_avg_bits": float(self.target_avg_bits),
            "levels": [int(b) for b in self.levels],
            "quantizer": self.quantizer.to_dict(),
            "layers": [l.to_dict() for l in self.layers],
            "non_expert": {r: self.non_expert[r] for r in NON_EXPERT_ROLES},
        }
        if self.version >= BITPLAN_TENSORS_VERSION:
            d["tensors"] = dict(self.tensors)
            d["budget"] = None if self.budget is None else dict(self.budget)
        d["provenance"] = _sorted(self.provenance)
        return d

    def to_json(self) -> str:
        return _dump(self.to_dict(), 0) + "\n"

    @classmethod
    def from_dict(cls, d, source: str = "<dict>") -> "BitPlan":
        try:
            return cls._from_dict(d)
        except BitPlanError as err:
            raise BitPlanError(f"{source}: {err}") from None

    @classmethod
    def _from_dict(cls, d) -> "BitPlan":
        if not isinstance(d, dict):
            raise BitPlanError("not a bit plan: the top level must be a JSON object")
        if d.get("format") != BITPLAN_FORMAT:
            raise BitPlanError(f"not a bit plan: format is {d.get('format')!r}, expected {BITPLAN_FORMAT!r}")
        if d.get("version") not in BITPLAN_VERSIONS:
            raise BitPlanError(
                f"unsupported bit plan version {d.get('version')!r}; this moe_export reads versions "
                f"{', '.join(map(str, BITPLAN_VERSIONS))}"
            )
        if d["version"] == BITPLAN_VERSION and ("tensors" in d or "budget" in d):
            raise BitPlanError("a version 1 bit plan has no 'tensors' or 'budget'; set version 2")
        required = ("model", "target_avg_bits", "levels", "quantizer", "layers")
        missing = [k for k in required if k not in d]
        if missing:
            raise BitPlanError(f"bit plan is missing field(s) {missing}")
        q = d["quantizer"]
        if not isinstance(q, dict) or set(q) - {"name", "group_size", "symmetric"}:
            raise BitPlanError(f"quantizer must be {{\"name\", \"group_size\", \"symmetric\"}}, got {q!r}")
        layers = []
        if not isinstance(d["layers"], list):
            raise BitPlanError("'layers' must be a list")
        for i, l in enumerate(d["layers"]):
            if not isinstance(l, dict) or not isinstance(l.get("name"), str) or not isinstance(l.get("bits"), list):
                raise BitPlanError(f"layers[{i}] must be {{\"name\", \"num_experts\", \"bits\": [...]}}, got {l!r}")
            if "num_experts" in l and l["num_experts"] != len(l["bits"]):
                raise BitPlanError(
                    f"layer {l['name']!r}: num_experts is {l['num_experts']} but bits lists {len(l['bits'])} experts"
                )
            dims = l.get("in_dims")
            if dims is not None and (not isinstance(dims, list) or not all(_is_int(k) and k > 0 for k in dims)):
                raise BitPlanError(f"layer {l['name']!r}: in_dims must be a list of positive integers, got {dims!r}")
            tensors = l.get("tensors")
            if tensors is not None and (d["version"] == BITPLAN_VERSION or not isinstance(tensors, dict) or not all(
                    isinstance(t, dict) and set(t) == {"bits", "group_size"} and isinstance(t["bits"], list)
                    for t in tensors.values())):
                raise BitPlanError(f"layer {l['name']!r}: tensors must be {{projection: {{\"bits\": [...], "
                                   f"\"group_size\"}}}} in a version 2 plan, got {tensors!r}")
            layers.append(LayerPlan(l["name"], list(l["bits"]), dims, tensors))
        return cls(
            model=d["model"],
            target_avg_bits=d["target_avg_bits"],
            levels=list(d["levels"]) if isinstance(d["levels"], list) else d["levels"],
            quantizer=QuantizerSpec(q.get("name", "rtn"), q.get("group_size", 128), q.get("symmetric", False)),
            layers=layers,
            non_expert=d.get("non_expert", NonExpertPolicy().to_dict()),
            provenance=_object(d.get("provenance", {}), "provenance"),
            tensors=d.get("tensors", {}),
            budget=d.get("budget"),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<string>") -> "BitPlan":
        try:
            d = json.loads(text, parse_constant=_non_finite)  # NaN/Infinity are not JSON and cannot be saved back
        except json.JSONDecodeError as err:
            raise BitPlanError(f"{source}: not valid JSON ({err})") from None
        except ValueError as err:
            raise BitPlanError(f"{source}: {err}") from None
        return cls.from_dict(d, source)

    def save(self, path: str | os.PathLike) -> Path:
        from moe_export.io import atomic_write_text

        atomic_write_text(path, self.to_json())
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike, against=None) -> "BitPlan":
        """Read and validate a plan file. ``against``: the model (``nn.Module``, ``MoELayer`` list or checkpoint
        folder) it will be applied to, checked with :meth:`validate_against`; its layers and expert counts are
        checked first, so a plan listing the wrong experts says so rather than the mean error that follows from it."""
        path = Path(path)
        if not path.is_file():
            raise BitPlanError(f"{path}: no such bit plan file; create one with `moe-export plan`")
        text = path.read_text()
        try:
            plan = cls.from_json(text, source=str(path))
        except BitPlanError:
            if against is not None:
                listed = _listed_layers(text)
                if listed is not None:
                    try:
                        _check_layers_match(listed, {l.name: l for l in _resolve_layers(against)[0]})
                    except BitPlanError as err:
                        raise BitPlanError(f"{path}: {err}") from None
            raise
        if against is not None:
            try:
                plan.validate_against(against)
            except RouterMismatchError as err:
                raise RouterMismatchError(f"{path}: {err}", plan, err.got) from None
            except BitPlanError as err:
                raise BitPlanError(f"{path}: {err}") from None
        return plan

    # ----------------------------------------------------------- constructors
    @classmethod
    def uniform(
        cls,
        layers,
        bits: int,
        group_size: int | None = 128,
        symmetric: bool = False,
        quantizer: str = "rtn",
        model_name: str = "",
        architecture: str = "",
    ) -> "BitPlan":
        """Every routed expert at ``bits``. ``layers``: ``MoELayer`` list (router weights are hashed)."""
        layer_plans = [LayerPlan(l.name, [int(bits)] * l.num_experts, _in_dims(l) or None) for l in layers]
        routers = [l.router_weight for l in layers if getattr(l, "router_weight", None) is not None]
        return cls(
            model={
                "name": model_name,
                "architecture": architecture,
                "router_sha256": router_sha256(routers) if len(routers) == len(layers) else "",
            },
            target_avg_bits=float(bits),
            levels=[int(bits)],
            quantizer=QuantizerSpec(quantizer, group_size, symmetric),
            layers=layer_plans,
            provenance={"method": "uniform", "created_by": _created_by()},
        )

    # ---------------------------------------------------------------- display
    def summary(self) -> str:
        """A terminal table: one row per layer with the expert count at each level and the mean (a version 2
        plan: one row per tensor, see ``_tensor_summary``)."""
        if self.version >= BITPLAN_TENSORS_VERSION:
            return self._tensor_summary()
        levels = sorted(set(self.levels), reverse=True)
        name_w = max(len("layer"), *(len(l.name) for l in self.layers))
        head = f"{'layer':<{name_w}}  " + "  ".join(f"{b}-bit".rjust(5) for b in levels) + "   mean  bits per expert"
        rows = [head, "-" * len(head)]
        for l in self.layers:
            cells = "  ".join(str(l.bits.count(b)).rjust(5) for b in levels)
            bits = "".join(str(b) for b in l.bits) if l.num_experts <= 64 else "..."
            rows.append(f"{l.name:<{name_w}}  {cells}  {sum(l.bits) / l.num_experts:5.3f}  {bits}")
        q = self.quantizer
        g = "row" if q.group_size is None else q.group_size
        rows.append(
            f"{len(self.layers)} MoE layers, mean {self.mean_bits():.4g} bits/expert (target {self.target_avg_bits:g}), "
            f"{q.name} g={g} {'sym' if q.symmetric else 'asym'}, method {self.provenance.get('method', '?')}"
        )
        return "\n".join(rows)


    def _tensor_summary(self) -> str:
        """One row per expert projection stack (widths per expert, group size) and per listed non-expert tensor,
        then the budget."""
        rows = []
        for l in self.layers:
            for p, t in (l.tensors or {"experts": {"bits": l.bits, "group_size": self.quantizer.group_size}}).items():
                g = "row" if t["group_size"] is None else t["group_size"]
                bits = "".join(str(b) for b in t["bits"]) if len(t["bits"]) <= 64 else "..."
                rows.append([f"{l.name}.{p}", f"g={g}", f"{sum(t['bits']) / len(t['bits']):.3f}", bits])
        for n, t in self.tensors.items():
            rows.append([n, "" if t == "float" else f"g={'row' if t['group_size'] is None else t['group_size']}",
                         "float" if t == "float" else str(t["bits"]), ""])
        from moe_export.table import format_table

        out = format_table(["tensor", "group", "bits", "bits per expert"], rows, "llrl")
        if self.budget is not None:
            b = self.budget
            out.append(f"budget {b['bytes'] / 1e6:.4f} MB ({b['bits_per_weight']:g} bits/weight over {b['parameters']:,} "
                       f"parameters); planned {b['planned_bytes'] / 1e6:.4f} MB = "
                       f"{8 * b['planned_bytes'] / b['parameters']:.4f} bits/weight, method {self.provenance.get('method', '?')}")
        return "\n".join(out)


# ------------------------------------------------------------------ helpers
def router_sha256(router_weights) -> str:
    """Hash of the router weights (in layer order): the plan's model identity.

    Values are hashed as float32 so a checkpoint and the same model loaded in another float dtype
    that upcasts exactly (bf16/fp16 -> fp32) hash the same.
    """
    h = hashlib.sha256()
    for w in router_weights:
        t = w.detach().to("cpu", torch.float32).contiguous()
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _created_by() -> str:
    try:
        from importlib.metadata import version

        return f"moe_export {version('moe-export')}"
    except Exception:
        return "moe_export"


def _non_finite(token: str):
    raise ValueError(f"{token} is not a valid number in a bit plan (JSON has no NaN/Infinity)")


def _object(x, field: str) -> dict:
    if not isinstance(x, dict):
        raise BitPlanError(f"bit plan {field!r} must be an object, got {x!r}")
    return x


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_bits(b, where: str) -> None:
    if not MIN_BITS <= b <= MAX_BITS:
        raise BitPlanError(f"{where}: {b} bits is outside {MIN_BITS}-{MAX_BITS}")


# What `moe-export plan` picks from when no --group-size is given: the paper's 128 and the powers of two below it
# down to 16 (onnxruntime's MatMulNBits takes powers of two from 16 as its block size).
DEFAULT_GROUP_SIZES = (128, 64, 32, 16)


def default_group_size(in_dims) -> int:
    """The largest of ``DEFAULT_GROUP_SIZES`` that divides every expert input dim in ``in_dims``."""
    dims = sorted({int(k) for k in in_dims})
    for g in DEFAULT_GROUP_SIZES:
        if dims and all(k % g == 0 for k in dims):
            return g
    raise BitPlanError(f"none of the group sizes {', '.join(map(str, DEFAULT_GROUP_SIZES))} divides every expert input "
                       f"dim ({', '.join(map(str, dims))}); pass --group-size with a divisor, or none for whole rows")


def expert_in_dims(layers) -> list[int]:
    """The distinct input dims K of the expert weights of ``layers`` (``MoELayer`` / ``MoELayerKeys``)."""
    return sorted({k for layer in layers for k in _in_dims(layer)})


def _check_layer_tensors(layer: LayerPlan, levels) -> None:
    """A version 2 layer: every projection lists one width per expert and one group size, and ``bits`` is each
    expert's widest projection."""
    for p, t in layer.tensors.items():
        if len(t["bits"]) != layer.num_experts:
            raise BitPlanError(f"layer {layer.name!r} {p}: {len(t['bits'])} widths for {layer.num_experts} experts")
        for e, b in enumerate(t["bits"]):
            if not _is_int(b):
                raise BitPlanError(f"layer {layer.name!r} {p} expert {e}: bits must be an integer, got {b!r}")
            _check_bits(b, f"layer {layer.name!r} {p} expert {e}")
            if b not in levels:
                raise BitPlanError(f"layer {layer.name!r} {p} expert {e}: {b} bits is not one of the plan's levels {levels}")
        g = t["group_size"]
        if g is not None and (not _is_int(g) or g <= 0):
            raise BitPlanError(f"layer {layer.name!r} {p}: group_size must be a positive integer or null, got {g!r}")
        if layer.in_dims is not None and g is not None and not any(k % g == 0 for k in layer.in_dims):
            _check_group_divides(g, layer.in_dims[0], f"{layer.name}.{p}")
    widest = [max(t["bits"][e] for t in layer.tensors.values()) for e in range(layer.num_experts)]
    if widest != list(layer.bits):
        raise BitPlanError(f"layer {layer.name!r}: bits {list(layer.bits)} must be each expert's widest projection "
                           f"{widest} in a plan that lists tensors")


def _check_group_divides(group_size, k: int, layer_name: str) -> None:
    if group_size is not None and k % group_size:
        raise BitPlanError(
            f"layer {layer_name!r}: group size {group_size} does not divide the expert input dim {k}; "
            "pick a divisor (e.g. --group-size 32) or null for whole rows"
        )


def _in_dims(layer) -> list[int]:
    dims = getattr(layer, "in_dims", None)
    if dims:
        return list(dims)
    h, i = getattr(layer, "hidden_size", None), getattr(layer, "intermediate_size", None)
    return [int(x) for x in (h, i) if x]


def _check_layers_match(listed, have: dict) -> None:
    """``listed``: the plan's (layer name, expert count) pairs; ``have``: the model's layers by name."""
    names = [n for n, _ in listed]
    missing = [n for n in names if n not in have]
    extra = [n for n in have if n not in set(names)]
    if missing or extra:
        raise BitPlanError(
            f"bit plan layers do not match the model: plan-only {missing}, model-only {extra}; "
            "re-run `moe-export plan` on this model"
        )
    for name, n in listed:
        if have[name].num_experts != n:
            raise BitPlanError(
                f"layer {name!r}: plan has {n} experts, model has {have[name].num_experts}; "
                "re-run `moe-export plan` on this model"
            )


def _listed_layers(text: str):
    """(name, expert count) of each layer of a plan that does not load, or None when it has no readable layer list."""
    try:
        layers = json.loads(text).get("layers")
    except (ValueError, AttributeError):
        return None
    if not isinstance(layers, list) or not layers or not all(
            isinstance(l, dict) and isinstance(l.get("name"), str) and isinstance(l.get("bits"), list) for l in layers):
        return None
    return [(l["name"], len(l["bits"])) for l in layers]


def _resolve_layers(obj):
    """-> (layers with .name/.num_experts, router weight list or None)."""
    if isinstance(obj, (str, os.PathLike)):
        from moe_export.io import SafetensorsCheckpoint
        from moe_export.models import checkpoint_moe_layout

        layout = checkpoint_moe_layout(obj)
        ckpt = SafetensorsCheckpoint(obj)
        return layout, [ckpt.get(l.router_key) for l in layout]
    if isinstance(obj, torch.nn.Module):
        from moe_export.models import find_moe_layers

        obj = find_moe_layers(obj)
    layers = list(obj)
    routers = [getattr(l, "router_weight", None) for l in layers]
    return layers, (routers if all(r is not None for r in routers) else None)


def _sorted(x):
    if isinstance(x, dict):
        return {str(k): _sorted(x[k]) for k in sorted(x, key=str)}
    if isinstance(x, (list, tuple)):
        return [_sorted(v) for v in x]
    return x


def _scalar(x) -> str:
    if isinstance(x, float):
        if not math.isfinite(x):
            raise BitPlanError(f"bit plan cannot store the non-finite number {x!r}")
        return repr(x)  # shortest round-tripping form: stable across save/load
    return json.dumps(x)


_LINE = 110


def _flat(v) -> bool:
    if isinstance(v, (list, tuple)):
        return all(not isinstance(u, (dict, list, tuple)) for u in v)
    return not isinstance(v, dict)


def _dump(x, indent: int) -> str:
    """Canonical JSON: 2-space indent, lists of scalars on one line (one layer = one line of bits)."""
    pad, inner = "  " * indent, "  " * (indent + 1)
    if isinstance(x, dict):
        if not x:
            return "{}"
        if all(_flat(v) for v in x.values()):
            line = "{" + ", ".join(f"{json.dumps(str(k))}: {_dump(v, 0)}" for k, v in x.items()) + "}"
            if len(line) + len(inner) <= _LINE:
                return line
        items = [f"{inner}{json.dumps(str(k))}: {_dump(v, indent + 1)}" for k, v in x.items()]
        return "{\n" + ",\n".join(items) + "\n" + pad + "}"
    if isinstance(x, (list, tuple)):
        if all(not isinstance(v, (dict, list, tuple)) for v in x):
            return "[" + ", ".join(_scalar(v) for v in x) + "]"
        return "[\n" + ",\n".join(inner + _dump(v, indent + 1) for v in x) + "\n" + pad + "]"
    return _scalar(x)
