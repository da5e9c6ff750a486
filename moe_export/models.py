"""MoE adapters: one uniform view of the MoE layers of a transformers model.

    layers = find_moe_layers(model)            # [MoELayer], in module order
    layer.router_weight                        # [E, H], shares storage with the router parameter
    layer.expert(e).first                      # [I, H] first-layer weight MaxVar scores (gate rows / Switch wi)
    layer.expert_weight("down_proj", e)        # [H, I] (out, in) view of expert e's down projection

Two expert layouts exist in transformers 5.23:
  fused    (Mixtral, Qwen3-MoE, OLMoE, Qwen2-MoE, DeepSeek-V2/V3): `experts.gate_up_proj` [E, 2I, H] (gate rows
           first, then up rows) and `experts.down_proj` [E, H, I], one parameter for all experts;
  modular  (SwitchTransformers): `experts.expert_{e}.wi` / `.wo` nn.Linear per expert, no gate.
Every tensor handed out is a view (`.detach()` of the parameter or a slice of it): writing through it
changes the model, and re-running `find_moe_layers` after a parameter is replaced is the caller's job.

`checkpoint_moe_layout(folder)` gives the same layers from config.json and the safetensors key names
alone. `save_pretrained` in transformers 5.23 writes the *original* per-expert format by default
(`save_original_format=True` reverts the load-time fusion):
  Mixtral          model.layers.N.block_sparse_moe.gate.weight, ...block_sparse_moe.experts.{e}.w1|w3|w2.weight
                   (w1 = gate, w3 = up, w2 = down; the model-side name is model.layers.N.mlp)
  Qwen*/OLMoE/DSv* model.layers.N.mlp.gate.weight, ...mlp.experts.{e}.gate_proj|up_proj|down_proj.weight
  Switch           {encoder,decoder}.block.N.layer.L.mlp.router.classifier.weight, ...experts.expert_{e}.wi|wo.weight
Checkpoints saved with `save_original_format=False` keep the fused 3-D keys (`mlp.experts.gate_up_proj`);
both are read.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "MixtralForCausalLM",
    "Qwen3MoeForCausalLM",
    "OlmoeForCausalLM",
    "Qwen2MoeForCausalLM",
    "DeepseekV2ForCausalLM",
    "DeepseekV3ForCausalLM",
    "SwitchTransformersForConditionalGeneration",
)

# model_type (config.json) -> architecture, for checkpoints and base models (e.g. MixtralModel)
_MODEL_TYPES = {
    "mixtral": "MixtralForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "olmoe": "OlmoeForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "deepseek_v2": "DeepseekV2ForCausalLM",
    "deepseek_v3": "DeepseekV3ForCausalLM",
    "switch_transformers": "SwitchTransformersForConditionalGeneration",
}

# MoE block class -> (router child, shared-expert children)
_FUSED_BLOCKS = {
    "MixtralSparseMoeBlock": ("gate", ()),
    "Qwen3MoeSparseMoeBlock": ("gate", ()),
    "OlmoeSparseMoeBlock": ("gate", ()),
    "Qwen2MoeSparseMoeBlock": ("gate", ("shared_expert",)),
    "DeepseekV2Moe": ("gate", ("shared_experts",)),
    "DeepseekV3MoE": ("gate", ("shared_experts",)),
}
SWITCH_BLOCKS = {"SwitchTransformersSparseMLP"}  # one module per expert, top-1 router (export swaps them too)


class UnsupportedModelError(ValueError):
    """The model (or checkpoint) has no MoE layer this package knows how to read."""

    def __init__(self, architecture: str, detail: str = ""):
        self.architecture = architecture
        msg = (
            f"unsupported model architecture {architecture!r}{': ' + detail if detail else ''}. "
            f"moe_export supports {', '.join(SUPPORTED_ARCHITECTURES)}; "
            "convert the model to one of these or add an adapter in moe_export/models.py"
        )
        super().__init__(msg)


@dataclass(eq=False)
class ExpertView:
    """Weights of one routed expert, each an (out, in) view into the model's parameters."""

    first: torch.Tensor  # [I, H] first-layer weight used for MaxVar: gate rows of gate_up_proj, or Switch wi
    gate: torch.Tensor | None  # [I, H]; None for Switch (no gate)
    up: torch.Tensor | None  # [I, H]; Switch: wi (the only input projection)
    down: torch.Tensor  # [H, I]; Switch: wo


@dataclass(eq=False, repr=False)
class MoELayer:
    name: str  # module path of the MoE block, e.g. "model.layers.0.mlp", "encoder.block.1.layer.1.mlp"
    block: nn.Module
    experts: nn.Module
    router_weight: torch.Tensor  # [E, H], shares storage with the router parameter
    router_param_name: str  # FQN of that parameter
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    fused: bool  # True: gate_up_proj [E, 2I, H] / down_proj [E, H, I]; False: one module per expert
    projections: tuple[str, ...]  # ("gate_up_proj", "down_proj") when fused, ("wi", "wo") for Switch
    shared_experts: list[str] = field(default_factory=list)  # module paths of shared (non-routed) experts
    architecture: str = ""

    def __repr__(self) -> str:
        return (
            f"MoELayer({self.name!r}, E={self.num_experts}, top_k={self.top_k}, H={self.hidden_size}, "
            f"I={self.intermediate_size}, {'fused' if self.fused else 'per-expert'} {self.projections}"
            + (f", shared={self.shared_experts}" if self.shared_experts else "") + ")"
        )

    def _check_expert(self, e: int) -> int:
        if not isinstance(e, int) or not 0 <= e < self.num_experts:
            raise IndexError(f"{self.name}: expert index {e!r} out of range [0, {self.num_experts})")
        return e

    def _param(self, proj: str, e: int | None) -> torch.Tensor:
        if proj not in self.projections:
            raise KeyError(f"{self.name}: unknown projection {proj!r}; this layer has {self.projections}")
        if self.fused:
            return getattr(self.experts, proj)
        if e is None:
            raise ValueError(f"{self.name}: {proj!r} is stored per expert here; pass an expert index")
        return getattr(self.experts[f"expert_{self._check_expert(e)}"], proj).weight

    def expert_weight(self, proj: str, e: int) -> torch.Tensor:
        """2-D (out, in) view of projection ``proj`` of expert ``e``: [2I, H] / [H, I] fused, [I, H] / [H, I] Switch."""
        self._check_expert(e)
        w = self._param(proj, e).detach()
        return w[e] if self.fused else w

    def expert(self, e: int) -> ExpertView:
        I = self.intermediate_size
        if self.fused:
            gate_up = self.expert_weight("gate_up_proj", e)  # [2I, H]: gate rows, then up rows
            gate, up = gate_up[:I], gate_up[I:]
            return ExpertView(first=gate, gate=gate, up=up, down=self.expert_weight("down_proj", e))
        wi = self.expert_weight("wi", e)  # [I, H]
        return ExpertView(first=wi, gate=None, up=wi, down=self.expert_weight("wo", e))

    def param_name(self, proj: str, e: int | None = None) -> str:
        """FQN of the parameter holding ``proj`` (for Switch, expert ``e``'s; fused ignores ``e``)."""
        self._param(proj, e)  # validates proj / e
        if self.fused:
            return f"{self.name}.experts.{proj}"
        return f"{self.name}.experts.expert_{e}.{proj}.weight"


def model_architecture(model: nn.Module) -> str:
    """The architecture string of a model: its config's `architectures[0]`, else its class name."""
    archs = getattr(getattr(model, "config", None), "architectures", None)
    return archs[0] if archs else type(model).__name__


def _fused_layer(name: str, block: nn.Module, router_attr: str, shared: tuple[str, ...], arch: str) -> MoELayer:
    router = getattr(block, router_attr)
    experts = block.experts
    E, H = router.weight.shape
    two_i = experts.gate_up_proj.shape[-2]
    if tuple(experts.gate_up_proj.shape) != (E, two_i, H) or tuple(experts.down_proj.shape) != (E, H, two_i // 2):
        raise UnsupportedModelError(
            arch,
            f"{name}: unexpected expert shapes gate_up_proj {tuple(experts.gate_up_proj.shape)}, "
            f"down_proj {tuple(experts.down_proj.shape)} for router [E={E}, H={H}] "
            "(transposed or unconcatenated expert layouts are not supported)",
        )
    return MoELayer(
        name=name, block=block, experts=experts,
        router_weight=router.weight.detach(), router_param_name=f"{name}.{router_attr}.weight",
        num_experts=E, top_k=int(getattr(router, "top_k", None) or block.top_k),
        hidden_size=H, intermediate_size=two_i // 2,
        fused=True, projections=("gate_up_proj", "down_proj"),
        shared_experts=[f"{name}.{s}" for s in shared if getattr(block, s, None) is not None],
        architecture=arch,
    )


def _switch_layer(name: str, block: nn.Module, arch: str) -> MoELayer:
    clf = block.router.classifier
    E, H = clf.weight.shape
    if sorted(block.experts.keys()) != sorted(f"expert_{e}" for e in range(E)):
        raise UnsupportedModelError(arch, f"{name}: router has {E} outputs but experts are {list(block.experts.keys())}")
    I = block.experts["expert_0"].wi.weight.shape[0]
    return MoELayer(
        name=name, block=block, experts=block.experts,
        router_weight=clf.weight.detach(), router_param_name=f"{name}.router.classifier.weight",
        num_experts=E, top_k=1, hidden_size=H, intermediate_size=I,
        fused=False, projections=("wi", "wo"), shared_experts=[], architecture=arch,
    )


def _unwrap(model: nn.Module) -> nn.Module:
    # torch.compile wraps the model in an OptimizedModule whose names carry an `_orig_mod.` prefix
    return getattr(model, "_orig_mod", model)


def find_moe_layers(model: nn.Module) -> list[MoELayer]:
    """Every MoE block of ``model`` in module order; raises UnsupportedModelError if there is none.

    Names are module paths of the model itself (a `torch.compile`d model is unwrapped first).
    """
    model = _unwrap(model)
    arch = model_architecture(model)
    layers = []
    for name, mod in model.named_modules():
        cls = type(mod).__name__
        if cls in _FUSED_BLOCKS:
            router_attr, shared = _FUSED_BLOCKS[cls]
            layers.append(_fused_layer(name, mod, router_attr, shared, arch))
        elif cls in SWITCH_BLOCKS:
            layers.append(_switch_layer(name, mod, arch))
    if not layers:
        raise UnsupportedModelError(arch, f"no MoE layer found in {type(model).__name__}")
    return layers


# ---------------------------------------------------------------------------------------------------
# parameter roles


def _module_roles(model: nn.Module) -> dict[str, str]:
    """Role of every module path that decides the role of the parameters under it."""
    roles: dict[str, str] = {}
    layers = find_moe_layers(model)
    blocks = tuple(l.name for l in layers)
    for layer in layers:
        roles[layer.name] = "other"  # anything else inside an MoE block (none in the supported models)
        roles[f"{layer.name}.experts"] = "experts"
        roles[layer.router_param_name.rsplit(".", 1)[0]] = "router"
        for s in layer.shared_experts:
            roles[s] = "shared_experts"
        if hasattr(layer.block, "shared_expert_gate"):  # Qwen2-MoE: sigmoid gate [1, H] scaling the shared expert
            roles[f"{layer.name}.shared_expert_gate"] = "router"
    for name, mod in model.named_modules():
        if not name or any(name == b or name.startswith(b + ".") for b in blocks):
            continue
        cls = type(mod).__name__
        if isinstance(mod, nn.Embedding):
            # T5/Switch relative_attention_bias is an nn.Embedding inside an attention module: attention
            parts = name.split(".")
            inside_attn = any(roles.get(".".join(parts[:i])) == "attention" for i in range(1, len(parts)))
            if not inside_attn:
                roles[name] = "embeddings"
        elif "Norm" in cls:
            roles[name] = "norm"
        elif "Attention" in cls:
            roles[name] = "attention"
        elif cls.endswith("MLP") or cls.endswith("DenseActDense"):
            roles[name] = "dense_mlp"
    return roles


def parameter_role(model: nn.Module, fqn: str) -> str:
    """What a parameter is for: "experts" (routed), "router", "shared_experts", "attention",
    "embeddings", "lm_head", "dense_mlp" (a non-MoE MLP), "norm" or "other".

    Decided by the innermost module on the path of ``fqn`` whose role is known, so quantization
    policies can say e.g. "experts at their plan's widths, shared experts at 8 bits, the rest float".
    """
    return parameter_role_lookup(model)(fqn)


def parameter_role_lookup(model: nn.Module) -> Callable[[str], str]:
    """``role(fqn)`` for the parameters of ``model`` as its module tree is now (see `parameter_role`).

    Finding the roles walks the whole model, so a pass over many parameters builds one lookup and asks it;
    nothing is cached between calls, so a model whose modules change is never answered from a stale table.
    """
    table = _module_roles(_unwrap(model))

    def role(fqn: str) -> str:
        parts = fqn.split(".")
        for i in range(len(parts) - 1, 0, -1):
            r = table.get(".".join(parts[:i]))
            if r is not None:
                return r
        if parts[0] == "lm_head":
            return "lm_head"
        if parts[-1] in ("embed_tokens", "shared") or parts[0] in ("shared", "embed_tokens"):
            return "embeddings"
        return "other"

    return role


# ---------------------------------------------------------------------------------------------------
# checkpoint layout (config.json + safetensors key names only)


@dataclass(frozen=True)
class TensorSlice:
    """Where one expert's 2-D (out, in) weight lives in a checkpoint."""

    key: str  # safetensors key
    expert: int | None = None  # index along dim 0 of a fused 3-D key; None for a per-expert 2-D key
    rows: tuple[int, int] | None = None  # [start, stop) rows of the 2-D matrix; None = all rows

    def read(self, ckpt) -> torch.Tensor:
        """Read only these bytes from ``ckpt`` (a `moe_export.io.SafetensorsCheckpoint` or a folder)."""
        from moe_export.io import SafetensorsCheckpoint

        if not isinstance(ckpt, SafetensorsCheckpoint):
            ckpt = SafetensorsCheckpoint(ckpt)
        sl = ckpt._handle(self.key).get_slice(self.key)
        r = slice(None) if self.rows is None else slice(*self.rows)
        return sl[self.expert, r] if self.expert is not None else sl[r]


@dataclass(repr=False)
class MoELayerKeys:
    """One MoE layer as stored on disk; `name` is the model-side module path `find_moe_layers` reports."""

    name: str
    router_key: str  # [E, H]
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    fused: bool  # True: experts stored as 3-D keys on disk
    first: list[TensorSlice]  # per expert, [I, H] first-layer weight (gate / Switch wi)
    gate: list[TensorSlice] | None
    up: list[TensorSlice] | None
    down: list[TensorSlice]  # per expert, [H, I]
    shared_expert_keys: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        return (
            f"MoELayerKeys({self.name!r}, router={self.router_key!r}, E={self.num_experts}, top_k={self.top_k}, "
            f"H={self.hidden_size}, I={self.intermediate_size}, {'fused 3-D' if self.fused else 'per-expert'} keys"
            f", first[0]={self.first[0]})"
        )

    def expert_keys(self) -> list[str]:
        """Every safetensors key holding routed-expert weights of this layer."""
        keys = []
        for part in (self.first, self.gate, self.up, self.down):
            for s in part or ():
                if s.key not in keys:
                    keys.append(s.key)
        return keys


_DECODER_ROUTER = re.compile(r"^(?P<prefix>(?:.*\.)?layers\.\d+)\.(?P<blk>mlp|block_sparse_moe)\.gate\.weight$")
_SWITCH_ROUTER = re.compile(r"^(?P<blk>(?:.*\.)?(?:encoder|decoder)\.block\.\d+\.layer\.\d+\.mlp)\.router\.classifier\.weight$")

# per-expert key names on disk: (gate, up, down)
_PER_EXPERT_NAMES = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_PER_EXPERT = ("gate_proj", "up_proj", "down_proj")


def _checkpoint_arch(cfg: dict) -> tuple[str, str]:
    model_type = cfg.get("model_type", "")
    archs = cfg.get("architectures") or []
    arch = archs[0] if archs else (model_type or "<no architectures/model_type in config.json>")
    if model_type not in _MODEL_TYPES:
        raise UnsupportedModelError(arch, f"config.json model_type {model_type!r}")
    return arch, model_type


def checkpoint_moe_layout(folder: str | os.PathLike) -> list[MoELayerKeys]:
    """The MoE layers of a `save_pretrained` folder, from config.json and safetensors key names only.

    Lets the planner stream one expert at a time: `layout[i].first[e].read(ckpt)` reads expert e's
    [I, H] first-layer weight without building the model. Same layer names and order as
    `find_moe_layers` on the loaded model.
    """
    from moe_export.io import SafetensorsCheckpoint

    ckpt = SafetensorsCheckpoint(folder)
    cfg = ckpt.config()
    arch, model_type = _checkpoint_arch(cfg)
    keys = set(ckpt.keys())
    if model_type == "switch_transformers":
        layers = _switch_keys(ckpt, keys, cfg)
    else:
        layers = _fused_family_keys(ckpt, keys, cfg, model_type, arch)
    if not layers:
        raise UnsupportedModelError(arch, f"{folder}: no MoE router key found among {len(keys)} tensors")
    return layers


def _layer_sort_key(name: str):
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in name.split(".")]


def _num_experts(cfg: dict, ckpt, router_key: str) -> int:
    E = ckpt.shape(router_key)[0]
    for k in ("num_local_experts", "num_experts", "n_routed_experts"):
        if k in cfg and cfg[k] != E:
            raise ValueError(f"{ckpt.folder}: config {k}={cfg[k]} but router {router_key} has {E} rows")
    return E


def _fused_family_keys(ckpt, keys: set[str], cfg: dict, model_type: str, arch: str) -> list[MoELayerKeys]:
    g_name, u_name, d_name = _PER_EXPERT_NAMES.get(model_type, _DEFAULT_PER_EXPERT)
    top_k = int(cfg["num_experts_per_tok"])
    out = []
    for router_key in keys:
        m = _DECODER_ROUTER.match(router_key)
        if not m:
            continue
        # DeepSeek-V3 files carry multi-token-prediction layers past num_hidden_layers that the model never builds
        if int(m["prefix"].rsplit(".", 1)[1]) >= cfg.get("num_hidden_layers", float("inf")):
            continue
        disk = f"{m['prefix']}.{m['blk']}"  # Mixtral's original files call the block `block_sparse_moe`
        name = f"{m['prefix']}.mlp"
        E, H = ckpt.shape(router_key)[0], ckpt.shape(router_key)[1]
        _num_experts(cfg, ckpt, router_key)
        fused_gu, fused_d = f"{disk}.experts.gate_up_proj", f"{disk}.experts.down_proj"
        if fused_gu in keys:
            two_i = ckpt.shape(fused_gu)[1]
            I = two_i // 2
            if ckpt.shape(fused_gu) != [E, two_i, H] or ckpt.shape(fused_d) != [E, H, I]:
                raise UnsupportedModelError(arch, f"{disk}: unexpected fused expert shapes")
            gate = [TensorSlice(fused_gu, e, (0, I)) for e in range(E)]
            up = [TensorSlice(fused_gu, e, (I, two_i)) for e in range(E)]
            down = [TensorSlice(fused_d, e) for e in range(E)]
            fused = True
        else:
            missing = [f"{disk}.experts.{e}.{p}.weight" for e in range(E) for p in (g_name, u_name, d_name)]
            missing = [k for k in missing if k not in keys]
            if missing:
                raise ValueError(
                    f"{ckpt.folder}: MoE layer {disk} has router {router_key} but its expert weights are "
                    f"missing (neither {fused_gu} nor per-expert keys such as {missing[0]}); "
                    "the checkpoint is incomplete"
                )
            I = ckpt.shape(f"{disk}.experts.0.{g_name}.weight")[0]
            gate = [TensorSlice(f"{disk}.experts.{e}.{g_name}.weight") for e in range(E)]
            up = [TensorSlice(f"{disk}.experts.{e}.{u_name}.weight") for e in range(E)]
            down = [TensorSlice(f"{disk}.experts.{e}.{d_name}.weight") for e in range(E)]
            fused = False
        shared = sorted(k for k in keys if k.startswith((f"{disk}.shared_expert.", f"{disk}.shared_experts.")))
        out.append(MoELayerKeys(
            name=name, router_key=router_key, num_experts=E, top_k=top_k, hidden_size=H, intermediate_size=I,
            fused=fused, first=gate, gate=gate, up=up, down=down, shared_expert_keys=shared,
        ))
    return sorted(out, key=lambda l: _layer_sort_key(l.name))


def _switch_keys(ckpt, keys: set[str], cfg: dict) -> list[MoELayerKeys]:
    out = []
    for router_key in keys:
        m = _SWITCH_ROUTER.match(router_key)
        if not m:
            continue
        name = m["blk"]
        E, H = ckpt.shape(router_key)
        _num_experts(cfg, ckpt, router_key)
        wi = [f"{name}.experts.expert_{e}.wi.weight" for e in range(E)]
        wo = [f"{name}.experts.expert_{e}.wo.weight" for e in range(E)]
        missing = [k for k in wi + wo if k not in keys]
        if missing:
            raise ValueError(f"{ckpt.folder}: MoE layer {name} is missing expert weight {missing[0]}; the checkpoint is incomplete")
        first = [TensorSlice(k) for k in wi]
        out.append(MoELayerKeys(
            name=name, router_key=router_key, num_experts=E, top_k=1, hidden_size=H,
            intermediate_size=ckpt.shape(wi[0])[0], fused=False,
            first=first, gate=None, up=first, down=[TensorSlice(k) for k in wo],
        ))
    # encoder layers before decoder layers, as in module order
    return sorted(out, key=lambda l: ("decoder" in l.name.split("."), _layer_sort_key(l.name)))
