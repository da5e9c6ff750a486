"""Peers on the same model: torchao's uniform int-N configs and onnxruntime's MatMulNBits 4-bit.

torchao's ``IntxWeightOnlyConfig`` rejects 3D expert stacks (export-notes.md section 4), so each expert
becomes two ``nn.Linear`` (``LinearExperts``) that torchao can quantize; routing is unchanged.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class LinearExperts(nn.Module):
    """The fused ``[E, 2I, H]`` / ``[E, H, I]`` expert stacks as per-expert ``nn.Linear``, same forward contract."""

    def __init__(self, experts: nn.Module):
        super().__init__()
        gu, down = experts.gate_up_proj.detach(), experts.down_proj.detach()  # [E, 2I, H], [E, H, I]
        self.num_experts = gu.shape[0]
        self.act_fn = experts.act_fn
        self.gate_up = nn.ModuleList(nn.Linear(gu.shape[2], gu.shape[1], bias=False) for _ in range(self.num_experts))
        self.down = nn.ModuleList(nn.Linear(down.shape[2], down.shape[1], bias=False) for _ in range(self.num_experts))
        with torch.no_grad():
            for e in range(self.num_experts):
                self.gate_up[e].weight.copy_(gu[e])
                self.down[e].weight.copy_(down[e])

    def forward(self, hidden_states, top_k_index, top_k_weights):  # [T, H], [T, k], [T, k]
        # Dense over experts (static shapes, compiles without graph breaks): every expert on every token,
        # weighted by a [T, E] routing matrix that is zero outside the top-k.
        routing = torch.zeros(hidden_states.shape[0], self.num_experts, dtype=hidden_states.dtype,
                              device=hidden_states.device).scatter(1, top_k_index, top_k_weights.to(hidden_states.dtype))
        out = torch.zeros_like(hidden_states)
        for e in range(self.num_experts):
            gate, up = self.gate_up[e](hidden_states).chunk(2, dim=-1)  # [T, I] each
            out = out + self.down[e](self.act_fn(gate) * up) * routing[:, e:e + 1]
        return out


def linear_experts_model(model: nn.Module) -> nn.Module:
    from moe_export.export.experts import moe_blocks

    model = copy.deepcopy(model).eval()
    for _, block in moe_blocks(model):
        block.experts = LinearExperts(block.experts)
    return model


def torchao_peer(model: nn.Module, config: str, bits: int = 4, group_size: int = 32) -> nn.Module:
    """``model`` with its experts as ``LinearExperts`` quantized by torchao ``config``:
    ``"intx-wo"`` (IntxWeightOnlyConfig, asymmetric) or ``"int8da-intx"`` (Int8DynamicActivationIntxWeightConfig, symmetric)."""
    from torchao.quantization import (Int8DynamicActivationIntxWeightConfig, IntxWeightOnlyConfig, MappingType, PerGroup,
                                      quantize_)

    peer = linear_experts_model(model)
    dtype = getattr(torch, f"int{bits}")
    if config == "intx-wo":
        cfg = IntxWeightOnlyConfig(weight_dtype=dtype, granularity=PerGroup(group_size), mapping_type=MappingType.ASYMMETRIC)
    elif config == "int8da-intx":
        cfg = Int8DynamicActivationIntxWeightConfig(weight_dtype=dtype, weight_granularity=PerGroup(group_size),
                                                    weight_mapping_type=MappingType.SYMMETRIC)
    else:
        raise ValueError(f"unknown torchao peer config {config!r}; choose intx-wo or int8da-intx")
    quantize_(peer, cfg, filter_fn=lambda m, fqn: isinstance(m, nn.Linear) and ".experts." in f".{fqn}")
    return peer


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a (possibly subclass) tensor holds: the sum over its inner plain tensors."""
    if type(t) not in (torch.Tensor, nn.Parameter) and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def expert_bytes_of(model: nn.Module) -> int:
    """Bytes of every expert weight (``LinearExperts`` or fused stacks, quantized or not)."""
    total = 0
    for name, p in model.named_parameters():
        if ".experts." in f".{name}":
            total += tensor_bytes(p)
    return total


def matmulnbits_onnx(float_onnx: str | Path, out: str | Path, bits: int = 4, block_size: int = 32) -> dict:
    """onnxruntime's ``MatMulNBitsQuantizer`` (asymmetric, ``block_size``) on a float .onnx. It quantizes
    MatMuls whose weight is a 2D initializer; expert weights gathered by index are not, so the report counts
    what it converted."""
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # one line per node

    from moe_export.io import atomic_path

    model = onnx.load(str(float_onnx))
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=False)
    q.process()
    out = Path(out)
    with atomic_path(out) as tmp:
        onnx.save_model(q.model.model, str(tmp))
    ops: dict[str, int] = {}
    for n in onnx.load(str(out), load_external_data=False).graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    return {"path": str(out), "bytes": out.stat().st_size, "matmulnbits_nodes": ops.get("MatMulNBits", 0),
            "matmul_nodes_left": ops.get("MatMul", 0) + ops.get("Gemm", 0)}
