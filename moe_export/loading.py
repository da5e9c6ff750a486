"""Opening a float (unquantized) transformers checkpoint folder for planning, quantizing and parity.

Errors are ``moe_export.io.CheckpointError`` with one line that says what to pass instead; the commands turn
them into CLI errors.
"""

from __future__ import annotations

from pathlib import Path

from moe_export.io import CheckpointError, SafetensorsCheckpoint


def model_folder(path: str | Path) -> Path:
    """The checkpoint folder to quantize: ``path`` itself, or ``finetuned/`` of a zoo build folder."""
    from moe_export.zoo.folders import resolve

    try:
        return resolve(path, build=False).checkpoint
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no config.json; pass a transformers checkpoint folder or a zoo build "
                              "folder") from None


def checkpoint_dtype(cfg: dict):
    """The dtype a float checkpoint computes in, from its ``config.json`` (``dtype``, or the older ``torch_dtype``);
    float32 when it names none. A bfloat16 checkpoint stays bfloat16 through quantization (in memory and streamed
    alike): its kept-float weights keep their bytes, its experts compute in bfloat16 (scales stay float16)."""
    import torch

    name = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def load_float_model(path: str | Path):
    """The model in checkpoint folder ``path`` in its own dtype (:func:`checkpoint_dtype`), in eval mode, built by the
    class its config names; strict (``moe_export.hf.load_pretrained``): a weight the folder lacks is an error, not a
    random initialisation."""
    from moe_export.hf import load_pretrained

    path = Path(path)
    ckpt = SafetensorsCheckpoint(path)
    ckpt.verify()  # a truncated or corrupt file: one line naming it, not a from_pretrained traceback
    model = load_pretrained(path, dtype=checkpoint_dtype(ckpt.config()))
    check_finite(model, path)
    return model


def check_finite(model, source) -> None:
    """Raise ``CheckpointError`` naming the first weight of ``model`` (read from ``source``) that holds NaN or Inf:
    quantized, it would give a checkpoint of garbage with no error anywhere later."""
    import torch

    for name, t in model.state_dict().items():
        if not t.is_floating_point():
            continue
        bad = ~torch.isfinite(t)
        if bool(bad.any()):
            where = ""
            if t.dim() == 3:  # fused experts [E, N, K]: which experts
                where = f" (experts {bad.flatten(1).any(1).nonzero().flatten().tolist()})"
            raise CheckpointError(f"{source}: {name}{where} has {int(bad.sum())} NaN/Inf value(s); the checkpoint is "
                                  "damaged or was saved after a diverged step: fix or re-export the weights before "
                                  "quantizing")
