"""Save and load quantized checkpoints: packed bytes in safetensors, the BitPlan beside and inside them.

Layout of a quantized folder::

    model.safetensors     packed tensors + float tensors; header metadata holds the format tag, the
                          BitPlan JSON and, per quantized parameter, how to rebuild its subclass
    bitplan.json          the same plan, for people and tools
    config.json           the transformers config (``quantization_config`` names moe_export)
    tokenizer files       copied from the source model when present

A quantized parameter ``P`` is stored as plain tensors ``P.<name>`` (its ``__tensor_flatten__`` data:
``packed_b``/``scale_b``/``zero_b`` per width plus ``expert_bits``/``slot`` for an expert stack;
``packed``/``scale``/``zero`` for a 2-D weight). Loading builds the model with its parameters on the meta
device (no float weights are ever allocated) and installs the stored tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from moe_export.io import CheckpointError, atomic_path, atomic_write_text, save_safetensors

FORMAT = "moe_export.quantized"
VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "bitplan.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")

__all__ = ["save_quantized", "load_quantized", "checkpoint_bytes", "theoretical_model_bytes"]


def _subclasses():
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    return {"MixedWidthExpertsTensor": MixedWidthExpertsTensor, "PackedLinearWeight": PackedLinearWeight}


def _describe(t) -> tuple[dict, dict[str, torch.Tensor]]:
    names, attrs = t.__tensor_flatten__()
    attrs = dict(attrs)
    attrs["dtype"] = str(attrs["dtype"]).removeprefix("torch.")
    return {"class": type(t).__name__, "attributes": attrs}, {n: getattr(t, n) for n in names}


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, plan=None, tokenizer=None,
                   source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (quantized by ``quantize_``) to ``out_dir``; returns the folder.

    ``plan`` defaults to ``model.moe_export_plan``. Tokenizer: ``tokenizer.save_pretrained`` if given,
    else the tokenizer files found in ``source_dir``.
    """

    classes = tuple(_subclasses().values())
    plan = plan if plan is not None else getattr(model, "moe_export_plan", None)
    if plan is None:
        raise ValueError("save_quantized needs the BitPlan: quantize the model with quantize_ or pass plan=")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tensors: dict[str, torch.Tensor] = {}
    quantized: dict[str, dict] = {}
    for name, p in model.named_parameters():  # tied parameters once, under their first name
        if isinstance(p, classes):
            desc, parts = _describe(p)
            quantized[name] = desc
            for part, t in parts.items():
                tensors[f"{name}.{part}"] = t.contiguous()
        else:
            tensors[name] = p.detach().contiguous()
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    for name, b in model.named_buffers():
        if name not in non_persistent:
            tensors[name] = b.detach().contiguous()
    if any(t.device.type == "meta" for t in tensors.values()):
        raise ValueError("the model still has meta tensors; load or quantize it fully before saving")
    # safetensors refuses views of one storage: give every tensor its own
    seen = set()
    for k, t in tensors.items():
        key = (t.untyped_storage().data_ptr(), t.device.type)
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            tensors[k] = t.clone()
        seen.add(key)
    metadata = {"format": FORMAT, "version": VERSION, "bitplan": plan.to_json(), "quantized": json.dumps(quantized)}
    # sorted header (safetensors' save_file orders metadata by hash): a rerun writes the same bytes
    save_safetensors({k: v.cpu() for k, v in tensors.items()}, out / WEIGHTS_NAME, metadata)
    plan.save(out / PLAN_NAME)

    cfg = model.config.to_dict()
    cfg["quantization_config"] = {"quant_method": "moe_export", "format": FORMAT, "version": VERSION,
                                  "bitplan": PLAN_NAME}
    cfg.pop("_experts_implementation", None)
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif source_dir is not None:
        for f in TOKENIZER_FILES:
            src = Path(source_dir) / f
            if src.is_file():
                with atomic_path(out / f) as tmp:
                    shutil.copyfile(src, tmp)
    return out


@contextlib.contextmanager
def _parameters_on_meta():
    # Parameters land on the meta device as they are registered; buffers (e.g. rotary inv_freq, which
    # are not saved) are computed for real. torch.empty reserves but never touches float weight pages.
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _read_header(path: Path):
    from safetensors import safe_open

    if not path.is_file() and (path.parent / "model.safetensors.index.json").is_file():
        from moe_export.streaming import ShardedReader  # sharded output of `moe-export quantize --streaming`

        f = ShardedReader(path.parent)
    elif not path.is_file():
        raise CheckpointError(f"{path.parent}: no {WEIGHTS_NAME}; is this a folder written by `moe-export quantize`?")
    else:
        try:
            f = safe_open(str(path), framework="pt")
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}); re-run `moe-export quantize`") from err
    meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not a moe_export quantized checkpoint (format {meta.get('format')!r}); "
                              "quantize the model with `moe-export quantize` first")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this moe_export reads {VERSION}")
    return f, meta


def load_quantized(qdir: str | os.PathLike, device: str | torch.device = "cpu", experts_implementation: str | None =
                   "moe_export_mixed") -> nn.Module:
    """Rebuild a quantized model from ``qdir`` without materialising float expert weights."""
    import transformers

    import moe_export.experts  # noqa: F401  (registers the experts implementation)
    from moe_export.plan.bitplan import BitPlan

    qdir = Path(qdir)
    f, meta = _read_header(qdir / WEIGHTS_NAME)
    plan = BitPlan.from_json(meta["bitplan"], source=f"{qdir / WEIGHTS_NAME} metadata")
    quantized = json.loads(meta["quantized"])
    cfg_dict = json.loads((qdir / "config.json").read_text())
    cfg_dict.pop("quantization_config", None)
    arch = (cfg_dict.get("architectures") or [None])[0]
    if arch is None or not hasattr(transformers, arch):
        raise CheckpointError(f"{qdir}/config.json: unknown architecture {arch!r}")
    config = transformers.AutoConfig.for_model(**cfg_dict)
    with _parameters_on_meta():
        model = getattr(transformers, arch)(config)
    model.eval()

    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    name_to_alias = {n: names for names in aliases.values() for n in names}

    def install(fqn: str, value: torch.Tensor, is_param: bool):
        if is_param:
            value = nn.Parameter(value, requires_grad=False)  # one object for all tied names
        for n in name_to_alias.get(fqn, [fqn]):
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name) if mod_name else model
            if is_param:
                mod._parameters[attr] = value
            else:
                mod._buffers[attr] = value

    classes = _subclasses()
    keys = set(f.keys())
    used = set()
    for fqn, desc in quantized.items():
        cls = classes.get(desc["class"])
        if cls is None:
            raise CheckpointError(f"{qdir}: unknown tensor class {desc['class']!r} for {fqn}")
        parts = {k[len(fqn) + 1:]: f.get_tensor(k).to(device) for k in keys if k.startswith(fqn + ".")
                 and k[len(fqn) + 1:] in cls.tensor_data_names + getattr(cls, "optional_tensor_data_names", [])}
        used |= {f"{fqn}.{k}" for k in parts}
        attrs = dict(desc["attributes"])
        attrs["dtype"] = getattr(torch, attrs["dtype"])
        if "bit_widths" in attrs:
            attrs["bit_widths"] = tuple(attrs["bit_widths"])
        install(fqn, cls.__tensor_unflatten__(parts, attrs, None, None), True)
    buffers = {n for n, _ in model.named_buffers()}
    for k in sorted(keys - used):
        t = f.get_tensor(k).to(device)
        install(k, t, k not in buffers)

    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{qdir}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}; "
                              "it was written by another model or is truncated")
    if experts_implementation and model._can_set_experts_implementation():
        model.set_experts_implementation(experts_implementation)
    model.moe_export_plan = plan
    return model


def checkpoint_bytes(qdir: str | os.PathLike) -> int:
    return sum(p.stat().st_size for p in Path(qdir).glob("model*.safetensors"))  # one file, or streamed shards


def theoretical_model_bytes(model: nn.Module) -> float:
    """README formula for every quantized weight plus the stored bytes of everything kept float."""
    from moe_export.size import theoretical_bytes
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    total = 0.0
    for _, p in model.named_parameters():
        if isinstance(p, MixedWidthExpertsTensor):
            n, k = p.out_features, p.in_features
            total += sum(theoretical_bytes(n, k, b, p.group_size, p.symmetric) for b in p.bit_widths)
        elif isinstance(p, PackedLinearWeight):
            total += theoretical_bytes(p.packed.shape[0], p.in_features, p.bits, p.group_size, p.symmetric)
        else:
            total += p.numel() * p.element_size()
    non_persistent = {f"{m}.{b}" if m else b for m, mod in model.named_modules() for b in mod._non_persistent_buffers_set}
    total += sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n not in non_persistent)
    return total
