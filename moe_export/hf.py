"""transformers integration: ``from_pretrained`` of a quantized folder, and one strict loader for every folder.

After ``import moe_export``, ``AutoModelForCausalLM.from_pretrained(qdir)`` on a folder written by
``save_quantized`` / ``moe-export quantize`` builds the model with packed experts and packed non-expert weights:
the ``quantization_config`` in ``config.json`` (``quant_method: "moe_export"``) selects
:class:`MoEExportHfQuantizer`, which swaps every quantized parameter for a holder of its stored parts
before the weights are read (``checkpoint.layout_of``), lets transformers fill the parts from the file, and
turns each holder back into its tensor subclass (``checkpoint.PackedParts``). No float expert is ever allocated.

:func:`load_pretrained` is what the library itself calls on any folder (float, zoo checkpoint or quantized):
a weight that is missing, unexpected or of the wrong shape is an error, never a warning.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from moe_export.io import CheckpointError

QUANT_METHOD = "moe_export"

_registered = False


def register() -> None:
    """Teach transformers ``quant_method: "moe_export"`` (idempotent). ``import moe_export`` arranges for this to
    run as soon as transformers loads its quantizer table, so users never call it themselves."""
    global _registered
    if _registered:
        return
    from transformers.quantizers import auto

    config_cls, quantizer_cls = _classes()
    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        auto.register_quantization_config(QUANT_METHOD)(config_cls)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        auto.register_quantizer(QUANT_METHOD)(quantizer_cls)
    _registered = True


_CLASSES = None


def _classes():
    """The config and quantizer classes, defined on first use: they subclass transformers' (a heavy import)."""
    global _CLASSES
    if _CLASSES is not None:
        return _CLASSES
    from transformers.quantizers.base import HfQuantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin

    from moe_export import checkpoint as ckpt

    class MoEExportConfig(QuantizationConfigMixin):
        """``quantization_config`` of a moe_export folder: the on-disk format and version, and where the plan is.
        The per-tensor layout and the plan itself live in the safetensors header, next to the bytes they describe."""

        def __init__(self, format: str = ckpt.FORMAT, version: str = ckpt.VERSION, bitplan: str = ckpt.PLAN_NAME,
                     **kwargs):
            self.quant_method = QUANT_METHOD
            self.format = format
            self.version = str(version)
            self.bitplan = bitplan
            if self.format != ckpt.FORMAT:
                raise CheckpointError(f"quantization_config: format {format!r}, expected {ckpt.FORMAT!r}")
            if self.version != ckpt.VERSION:
                raise CheckpointError(f"quantization_config: version {self.version!r}, this moe_export reads "
                                      f"{ckpt.VERSION}")

        def to_dict(self) -> dict:
            return {"quant_method": QUANT_METHOD, "format": self.format, "version": self.version,
                    "bitplan": self.bitplan}

    class MoEExportHfQuantizer(HfQuantizer):
        """Loads (never creates) moe_export checkpoints; quantizing happens in ``moe_export.quantize_``."""

        requires_calibration = True  # transformers: only pre-quantized weights can be loaded with this method

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.layout: ckpt.Layout | None = None

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("moe_export quantizes with moe_export.quantize_(model, MoEQuantConfig(...)) or "
                                 "`moe-export quantize`; from_pretrained only loads folders written that way")

        def update_dtype(self, dtype):
            return dtype

        def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
            return False

        def get_new_dtype(self, converter, param, dtype):
            # packed codes, scales and zeros keep the dtype they were stored in; float weights follow the model
            keys = getattr(converter, "source_patterns", None) or [getattr(converter, "source_key", None)]
            if self.layout is not None and any(k in self.layout.part_keys for k in keys if k):
                return None
            return super().get_new_dtype(converter, param, dtype)

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            if not checkpoint_files:
                raise CheckpointError("moe_export checkpoints load from safetensors files only")
            self.layout = ckpt.layout_of([Path(f) for f in checkpoint_files])
            ckpt.install_holders(model, self.layout)

        def _process_model_after_weight_loading(self, model, **kwargs):
            ckpt.finish_holders(model, self.layout)
            return model

        def get_state_dict_and_metadata(self, model):
            tensors, metadata = ckpt.encode_model(model, ckpt.plan_of(model))
            metadata[ckpt.FORMAT_KEY] = ckpt.FORMAT  # save_pretrained overwrites "format" with "pt"
            return tensors, metadata

        def is_serializable(self):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

        @property
        def is_compileable(self) -> bool:
            return True

    MoEExportConfig.__name__ = MoEExportConfig.__qualname__ = "MoEExportConfig"
    MoEExportHfQuantizer.__name__ = MoEExportHfQuantizer.__qualname__ = "MoEExportHfQuantizer"
    _CLASSES = (MoEExportConfig, MoEExportHfQuantizer)
    return _CLASSES


def is_quantized_folder(path: str | os.PathLike) -> bool:
    cfg = Path(path) / "config.json"
    try:
        qc = json.loads(cfg.read_text()).get("quantization_config") or {}
    except (OSError, ValueError):
        return False
    return qc.get("quant_method") == QUANT_METHOD


def architecture_class(path: str | os.PathLike):
    """The transformers class named by ``config.json``'s ``architectures`` (SwitchTransformers included)."""
    import transformers

    cfg = Path(path) / "config.json"
    try:
        arch = (json.loads(cfg.read_text()).get("architectures") or [None])[0]
    except OSError:
        raise CheckpointError(f"{path}: no config.json; pass a transformers checkpoint folder") from None
    except ValueError as err:
        raise CheckpointError(f"{cfg}: not valid JSON ({err})") from None
    if arch is None or not hasattr(transformers, arch):
        raise CheckpointError(f"{cfg}: unknown architecture {arch!r}")
    return getattr(transformers, arch)


def _weight_files(path: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, or model.safetensors."""
    from moe_export.checkpoint import INDEX_NAME, WEIGHTS_NAME

    if (path / INDEX_NAME).is_file():
        try:
            names = sorted(set(json.loads((path / INDEX_NAME).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            raise CheckpointError(f"{path / INDEX_NAME}: unreadable index ({err}); re-run `moe-export quantize`") from None
        return [path / n for n in names]
    if not (path / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME}; is this a folder written by `moe-export quantize`?")
    return [path / WEIGHTS_NAME]


def _logical_dtype(path: Path) -> torch.dtype:
    """The dtype the quantized tensors compute in, as their headers record it."""
    from moe_export.checkpoint import layout_of

    dtypes = {d["attributes"]["dtype"] for d in layout_of(_weight_files(path)).quantized.values()}
    return getattr(torch, dtypes.pop()) if len(dtypes) == 1 else torch.float32


def load_pretrained(path: str | os.PathLike, dtype: torch.dtype | str | None = None, device: str | torch.device = "cpu",
                    experts_implementation: str | None = None):
    """The one way the library loads a folder: float, zoo checkpoint or moe_export-quantized.

    Strict: any parameter the file lacks, any tensor the model has no place for, any shape mismatch raises
    ``CheckpointError`` (transformers would only warn and initialise the weight at random). A quantized folder
    runs its experts through ``moe_export_mixed`` unless ``experts_implementation`` names another.
    """
    import transformers

    path = Path(path)
    quantized = is_quantized_folder(path)
    if quantized:
        register()
    cls = architecture_class(path)
    kwargs = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    elif quantized and json.loads((path / "config.json").read_text()).get("dtype") is None:
        kwargs["dtype"] = _logical_dtype(path)  # folders written before config.json carried it
    verbosity = transformers.logging.get_verbosity()
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # what it would warn about is checked below and raised
    transformers.utils.logging.disable_progress_bar()  # a per-load bar over tensors that take milliseconds
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True, device_map=None, **kwargs)
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot be loaded ({str(err).splitlines()[0]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.utils.logging.enable_progress_bar()
    problems = []
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        items = sorted(str(x) for x in (info.get(kind) or []))
        if items:
            problems.append(f"{len(items)} {kind.replace('_', ' ')} (e.g. {', '.join(items[:3])})")
    if problems:
        raise CheckpointError(f"{path}: the weights do not match the model: {'; '.join(problems)}. The folder was "
                              "written for another model or is incomplete; nothing is initialised at random")
    model = model.to(device).eval()
    # set after loading: not every architecture takes it (SwitchTransformers has one module per expert)
    if experts_implementation is not None and model._can_set_experts_implementation():
        model.set_experts_implementation(experts_implementation)
    return model


def load_quantized(qdir: str | os.PathLike, device: str | torch.device = "cpu", experts_implementation: str | None =
                   "moe_export_mixed") -> torch.nn.Module:
    """Rebuild a quantized model from ``qdir`` without materialising float expert weights (the same path as
    ``from_pretrained(qdir)`` after ``import moe_export``, but strict: nothing missing, nothing left over)."""
    from moe_export.checkpoint import layout_of

    qdir = Path(qdir)
    layout_of(_weight_files(qdir))  # the header says first whether this is a readable moe_export checkpoint
    if not is_quantized_folder(qdir):
        raise CheckpointError(f"{qdir}/config.json names no moe_export quantization_config; write the folder "
                              "with `moe-export quantize` (or save_quantized)")
    model = load_pretrained(qdir, device=device)
    if experts_implementation and experts_implementation != "moe_export_mixed" and \
            model._can_set_experts_implementation():
        model.set_experts_implementation(experts_implementation)
    return model
