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
BITPLAN_VERSION = 1
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

    @property
    def num_experts(self) -> int:
        return len(self.bits)

    def to_dict(self) -> dict:
        d = {"name": self.name, "num_experts": self.num_experts, "bits": list(self.bits)}
        if self.in_dims is not None:
            d["in_dims"] = list(self.in_dims)
        return d


@dataclass(frozen=True)
class NonExpertQuant:
    """How the 2-D weights of one non-expert role are quantized (round-to-nearest, packed)."""

    bits: int
    group_size: int | None = None  # None = one group per row
    symmetric: bool = False

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": self.symmetric}


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
        roles = {}
        for role in NON_EXPERT_ROLES:
            v = d.get(role, "float")
            if v == "float":
                roles[role] = None
                continue
            if not isinstance(v, dict) or set(v) - {"bits", "group_size", "symmetric"} or "bits" not in v:
                raise BitPlanError(
                    f"non_expert.{role} must be \"float\" or {{\"bits\", \"group_size\", \"symmetric\"}}, got {v!r}"
                )
            if not _is_int(v["bits"]):
                raise BitPlanError(f"non_expert.{role}.bits must be an integer, got {v['bits']!r}")
            _check_bits(v["bits"], f"non_expert.{role}")
            g = v.get("group_size")
            if g is not None and (not _is_int(g) or g <= 0):
                raise BitPlanError(f"non_expert.{role}.group_size must be a positive integer or null, got {g!r}")
            if not isinstance(v.get("symmetric", False), bool):
                raise BitPlanError(f"non_expert.{role}.symmetric must be true or false")
            roles[role] = NonExpertQuant(v["bits"], g, v.get("symmetric", False))
        return cls(roles)

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

    def __post_init__(self):
        self.validate()

    # ----------------------------------------------------------------- queries
    def bits_for(self, layer_name: str) -> list[int]:
        for layer in self.layers:
            if layer.name == layer_name:
                return list(layer.bits)
        raise BitPlanError(f"bit plan has no layer {layer_name!r}; it covers {[l.name for l in self.layers]}")

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
            if layer.in_dims is not None:
                for k in layer.in_dims:
                    _check_group_divides(q.group_size, k, layer.name)
        mean = self.mean_bits()
        if abs(mean - self.target_avg_bits) > MEAN_TOL:
            raise BitPlanError(
                f"mean expert bits {mean:.6g} differs from the declared target_avg_bits {self.target_avg_bits:g}; "
                "re-plan, or set target_avg_bits to the achieved mean"
            )
        self._validate_non_expert()

    def _validate_non_expert(self) -> None:
        self.non_expert = NonExpertPolicy.from_dict(self.non_expert).to_dict()  # canonical: every role, in order

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
            for k in _in_dims(have[lp.name]):
                _check_group_divides(self.quantizer.group_size, k, lp.name)
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
        return {
            "format": BITPLAN_FORMAT,
            "version": BITPLAN_VERSION,
            "model": dict(self.model),
            "target_avg_bits": float(self.target_avg_bits),
            "levels": [int(b) for b in self.levels],
            "quantizer": self.quantizer.to_dict(),
            "layers": [l.to_dict() for l in self.layers],
            "non_expert": {r: self.non_expert[r] for r in NON_EXPERT_ROLES},
            "provenance": _sorted(self.provenance),
        }

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
        if d.get("version") != BITPLAN_VERSION:
            raise BitPlanError(
                f"unsupported bit plan version {d.get('version')!r}; this moe_export reads version {BITPLAN_VERSION}"
            )
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
            layers.append(LayerPlan(l["name"], list(l["bits"]), dims))
        return cls(
            model=d["model"],
            target_avg_bits=d["target_avg_bits"],
            levels=list(d["levels"]) if isinstance(d["levels"], list) else d["levels"],
            quantizer=QuantizerSpec(q.get("name", "rtn"), q.get("group_size", 128), q.get("symmetric", False)),
            layers=layers,
            non_expert=d.get("non_expert", NonExpertPolicy().to_dict()),
            provenance=_object(d.get("provenance", {}), "provenance"),
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
        """A terminal table: one row per layer with the expert count at each level and the mean."""
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
