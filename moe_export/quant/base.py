"""What every weight quantizer returns, and the interface quantizers implement.

Grid (one per group of ``group_size`` consecutive input columns of a row):

    w_hat = (q - zero) * scale,   q in [0, 2**bits - 1] (uint8 before packing)

``scale`` and ``zero`` are stored as float16 and are the ground truth: quantizers compute ``q``
against the float16-rounded values, so every runtime that dequantizes from the stored bytes
reproduces ``dequantize()`` exactly. Asymmetric grids store ``zero`` (a float, not necessarily an
integer: HQQ optimises it). Symmetric grids use the constant ``symmetric_zero(bits)`` and store
no zeros. ``group_size=None`` means one group per row.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from moe_export.runtime.layout import dequantize, symmetric_zero, zero_or_constant, zero_table

SCALE_DTYPE = torch.float16

__all__ = ["SCALE_DTYPE", "QuantizedWeight", "Quantizer", "available_quantizers", "dequantize", "get_quantizer",
           "register_quantizer", "resolve_group_size", "symmetric_zero", "zero_table"]


def resolve_group_size(group_size: int | None, k: int) -> int:
    g = k if group_size is None else int(group_size)
    if g <= 0 or k % g:
        raise ValueError(f"group size {group_size} does not divide the input dim {k}")
    return g


@dataclass
class QuantizedWeight:
    """A 2-D weight ``[N, K]`` quantized group-wise along K."""

    qdata: torch.Tensor  # uint8 [N, K], values in [0, 2**bits)
    scale: torch.Tensor  # float16 [N, K // g]
    zero: torch.Tensor | None  # float16 [N, K // g]; None for symmetric grids
    bits: int
    group_size: int | None  # None = whole row

    @property
    def shape(self) -> torch.Size:
        return self.qdata.shape

    @property
    def symmetric(self) -> bool:
        return self.zero is None

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qdata, self.scale, zero_or_constant(self.zero, self.bits), dtype)


class Quantizer(ABC):
    """Quantizes one 2-D weight at a given width. One file per algorithm (rtn.py, hqq.py, gptq.py)."""

    name: str = ""
    needs_calibration: bool = False

    @abstractmethod
    def quantize(
        self,
        weight: torch.Tensor,
        bits: int,
        group_size: int | None,
        symmetric: bool,
        hessian: torch.Tensor | None = None,
    ) -> QuantizedWeight:
        """``weight``: float ``[N, K]`` (out, in). ``hessian``: ``[K, K]`` for data-aware quantizers."""


_QUANTIZERS: dict[str, type[Quantizer]] = {}


def register_quantizer(cls: type[Quantizer]) -> type[Quantizer]:
    _QUANTIZERS[cls.name] = cls
    return cls


def get_quantizer(name: str, **options) -> Quantizer:
    if name not in _QUANTIZERS:
        # Import lazily: each algorithm lives in its own module and registers itself on import.
        import importlib

        try:
            importlib.import_module(f"moe_export.quant.{name}")
        except ModuleNotFoundError:
            pass
    if name not in _QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r}; available: {sorted(available_quantizers())}")
    return _QUANTIZERS[name](**options)


def available_quantizers() -> list[str]:
    return ["rtn", "hqq", "gptq"]
