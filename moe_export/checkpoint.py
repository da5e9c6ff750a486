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

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from moe_export.io import CheckpointError, atomic_path, atomic_write_text, save_safetensors

FORMAT = "moe_export.quantized"
VERSION = "1"
WEIGHTS_NAME = "model.safetensors"
PLAN_NAME = "bitplan.json"
INDEX_NAME = "model.safetensors.index.json"
FORMAT_KEY = "moe_export.format"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "generation_config.json")

__all__ = ["save_quantized"]


def quantization_config() -> dict:
    """The ``quantization_config`` block of a quantized folder's ``config.json``: it selects moe_export's
    transformers quantizer (``moe_export.hf``) and says which on-disk format and version the folder holds."""
    return {"quant_method": "moe_export", "format": FORMAT, "version": VERSION, "bitplan": PLAN_NAME}


def _subclasses():
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    return {"MixedWidthExpertsTensor": MixedWidthExpertsTensor, "PackedLinearWeight": PackedLinearWeight}


def _describe(t) -> tuple[dict, dict[str, torch.Tensor]]:
    names, attrs = t.__tensor_flatten__()
    attrs = dict(attrs)
    attrs["dtype"] = str(attrs["dtype"]).removeprefix("torch.")
    return {"class": type(t).__name__, "attributes": attrs}, {n: getattr(t, n) for n in names}


def encode_model(model: nn.Module, plan) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The plain tensors and header metadata of a quantized model: what ``save_quantized`` writes and what
    ``save_pretrained`` writes through the transformers quantizer."""
    classes = tuple(_subclasses().values())
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
    return {k: v.cpu() for k, v in tensors.items()}, metadata


def save_quantized(model: nn.Module, out_dir: str | os.PathLike, plan=None, tokenizer=None,
                   source_dir: str | os.PathLike | None = None) -> Path:
    """Write ``model`` (quantized by ``quantize_``) to ``out_dir``; returns the folder.

    ``plan`` defaults to ``model.moe_export_plan``. Tokenizer: ``tokenizer.save_pretrained`` if given,
    else the tokenizer files found in ``source_dir``.
    """

    plan = plan if plan is not None else getattr(model, "moe_export_plan", None)
    if plan is None:
        raise ValueError("save_quantized needs the BitPlan: quantize the model with quantize_ or pass plan=")
    tensors, metadata = encode_model(model, plan)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # sorted header (safetensors' save_file orders metadata by hash): a rerun writes the same bytes
    save_safetensors(tensors, out / WEIGHTS_NAME, metadata)
    plan.save(out / PLAN_NAME)

    cfg = model.config.to_dict()
    cfg["quantization_config"] = quantization_config()
    if cfg.get("dtype") is None:
        # from_pretrained's dtype="auto" reads it here; without it, transformers would take the dtype of the
        # first float tensor in the file, which can be a float16 scale
        cfg["dtype"] = str(model.dtype).removeprefix("torch.")
    cfg.pop("_experts_implementation", None)
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    elif source_dir is not None:
        copy_tokenizer(source_dir, out)
    return out


def copy_tokenizer(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copy the tokenizer (and generation config) files found in ``src`` to ``dst``; returns their names."""
    copied = []
    for f in TOKENIZER_FILES:
        path = Path(src) / f
        if path.is_file():
            with atomic_path(Path(dst) / f) as tmp:
                shutil.copyfile(path, tmp)
            copied.append(f)
    return copied


# ------------------------------------------------------------------------------------------------ load
#
# One loading path for `load_quantized` and `from_pretrained` (both in moe_export.hf): the model skeleton is built on
# the meta device by transformers, every quantized parameter is swapped for a `PackedParts` holder whose
# buffers have the stored parts' exact shapes and dtypes, transformers fills those buffers (and the float
# weights) from the file like any other weight, and each holder is then turned into its tensor subclass.


@dataclass
class Layout:
    """What a quantized checkpoint's headers say: the plan, and per quantized parameter its class, attributes and
    stored parts (``name -> (shape, dtype)``)."""

    plan_json: str
    quantized: dict[str, dict]
    parts: dict[str, dict[str, tuple[tuple[int, ...], torch.dtype]]]
    source: str

    @property
    def part_keys(self) -> set[str]:
        return {f"{fqn}.{n}" for fqn, ps in self.parts.items() for n in ps}


_ST_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
              "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
              "BOOL": torch.bool}


def _is_ours(meta: dict) -> bool:
    # save_quantized tags the file with "format"; transformers' save_pretrained overwrites "format" with "pt",
    # so the same tag also travels as "moe_export.format"
    return FORMAT in (meta.get("format"), meta.get(FORMAT_KEY))


def layout_of(files: list[Path]) -> Layout:
    """Read the headers (never the tensor data) of a quantized checkpoint's safetensors files."""
    from safetensors import safe_open

    from moe_export.plan.bitplan import BitPlan

    folder = files[0].parent
    plan_json, quantized, shapes = None, {}, {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                for k in f.keys():
                    sl = f.get_slice(k)
                    shapes[k] = (tuple(sl.get_shape()), _ST_DTYPES.get(sl.get_dtype()))
        except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err}); re-run `moe-export quantize`") from None
        if not _is_ours(meta):
            raise CheckpointError(f"{path}: not a moe_export quantized checkpoint (format {meta.get('format')!r}); "
                                  "quantize the model with `moe-export quantize` first")
        if meta.get("version") != VERSION:
            raise CheckpointError(f"{path}: checkpoint version {meta.get('version')!r}, this moe_export reads {VERSION}")
        plan_json = plan_json or meta.get("bitplan")
        quantized.update(json.loads(meta.get("quantized", "{}")))
    if plan_json is None and (folder / INDEX_NAME).is_file():  # streamed shards keep the plan in the index
        plan_json = (json.loads((folder / INDEX_NAME).read_text()).get("metadata") or {}).get("bitplan")
    if plan_json is None:
        raise CheckpointError(f"{folder}: the checkpoint header holds no bit plan; re-run `moe-export quantize`")
    source = f"{files[0]} metadata"
    plan = BitPlan.from_json(plan_json, source=source)
    if (folder / PLAN_NAME).is_file():
        on_disk = BitPlan.load(folder / PLAN_NAME)
        if on_disk.to_json() != plan.to_json():
            raise CheckpointError(f"{folder / PLAN_NAME} differs from the plan the weights were quantized with "
                                  f"(stored in {files[0].name}); the weights follow the stored plan, so restore "
                                  f"{PLAN_NAME} or re-run `moe-export quantize` with the edited plan")
    classes = _subclasses()
    parts: dict[str, dict] = {}
    for fqn, desc in quantized.items():
        cls = classes.get(desc.get("class"))
        if cls is None:
            raise CheckpointError(f"{folder}: unknown tensor class {desc.get('class')!r} for {fqn}")
        names = list(cls.tensor_data_names) + list(getattr(cls, "optional_tensor_data_names", []))
        parts[fqn] = {n: shapes[f"{fqn}.{n}"] for n in names if f"{fqn}.{n}" in shapes}
        lacking = [n for n in cls.tensor_data_names if n not in parts[fqn]]
        if lacking:
            raise CheckpointError(f"{folder}: {fqn} lacks its stored part(s) {lacking}; the checkpoint is truncated")
    return Layout(plan_json, quantized, parts, source)


class PackedParts(nn.Module):
    """Stands where a quantized parameter will be while transformers reads the file: one buffer per stored part,
    so the loader fills ``<param>.packed_3`` etc. like any other weight."""

    def __init__(self, parts: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        super().__init__()
        for name, (shape, dtype) in parts.items():
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device="meta"))


def install_holders(model: nn.Module, layout: Layout) -> None:
    for fqn in layout.quantized:
        mod_name, _, attr = fqn.rpartition(".")
        try:
            mod = model.get_submodule(mod_name) if mod_name else model
        except AttributeError:
            mod = None
        if mod is None or attr not in mod._parameters:
            raise CheckpointError(f"{layout.source}: quantized parameter {fqn} has no place in "
                                  f"{type(model).__name__}; the checkpoint was written for another model")
        del mod._parameters[attr]
        mod.add_module(attr, PackedParts(layout.parts[fqn]))


def finish_holders(model: nn.Module, layout: Layout) -> None:
    """Turn every filled holder into its tensor subclass; any part still unread is an error."""
    from moe_export.plan.bitplan import BitPlan

    classes = _subclasses()
    for fqn, desc in layout.quantized.items():
        mod_name, _, attr = fqn.rpartition(".")
        mod = model.get_submodule(mod_name) if mod_name else model
        holder = mod._modules.get(attr)
        if not isinstance(holder, PackedParts):
            raise CheckpointError(f"{layout.source}: {fqn} was replaced while loading; it cannot be rebuilt")
        parts = dict(holder._buffers)
        unread = [n for n, t in parts.items() if t.device.type == "meta"]
        if unread:
            raise CheckpointError(f"{layout.source}: {fqn}.{unread[0]} was not read from the checkpoint")
        attrs = dict(desc["attributes"])
        attrs["dtype"] = getattr(torch, attrs["dtype"])
        if "bit_widths" in attrs:
            attrs["bit_widths"] = tuple(attrs["bit_widths"])
        cls = classes[desc["class"]]
        t = cls.__tensor_unflatten__(parts, attrs, None, None)
        del mod._modules[attr]
        mod._parameters[attr] = nn.Parameter(t, requires_grad=False)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise CheckpointError(f"{layout.source}: checkpoint lacks {len(missing)} parameter(s), e.g. {missing[:3]}; "
                              "it was written by another model or is truncated")
    _use_mixed_experts(model)
    model.moe_export_plan = BitPlan.from_json(layout.plan_json, source=layout.source)


def _use_mixed_experts(model: nn.Module) -> None:
    from moe_export.runtime import register as register_runtime

    register_runtime()  # the experts implementation, with transformers
    if model._can_set_experts_implementation():
        model.set_experts_implementation("moe_export_mixed")


def plan_of(model: nn.Module):
    plan = getattr(model, "moe_export_plan", None)
    if plan is None:
        raise ValueError("this model carries no BitPlan: quantize it with moe_export.quantize_ or load a quantized "
                         "folder")
    return plan
