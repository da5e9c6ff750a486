"""CUDA-only checks of the mixed-width kernels: the custom ops on a GPU (autotuned Triton), the experts
path under torch.compile, and a speed sanity check. Skipped without a CUDA device.

No GPU was available when these were written: the tolerances come from the input precision, not from
measurements. bf16 inputs: the decode GEMV accumulates in float32 and rounds once to bf16 (2^-8
relative); the prefill dot also rounds each dequantized weight to bf16, so the bound is 2^-6 of the
output's largest magnitude.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed: pip install -e '.[test]' installs it")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the Triton kernels' GPU path)"),
]

from test_kernels_ops import _experts_module, quantized_experts, width_groups  # noqa: E402

from moe_export.runtime import dispatch  # noqa: E402
from moe_export.kernels import reference  # noqa: E402

ops = torch.ops.moe_export


def _cuda(args):
    packed, scales, zeros, bits, ebits, slot = args
    to = lambda ts: [None if t is None else t.cuda() for t in ts]  # noqa: E731
    return to(packed), to(scales), to(zeros), bits, ebits.cuda(), slot.cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bits", [[1] * 4, [2] * 4, [3] * 4, [4] * 4, [8] * 4, [3, 2, 4, 8]])
@pytest.mark.parametrize("group_size", [32, 128, None])
def test_ops_on_cuda_match_reference(bits, group_size, dtype):
    args = _cuda(width_groups(quantized_experts(bits, 256, 512, group_size)))
    x = torch.randn(40, 512, device="cuda").to(dtype)
    ids = torch.randint(0, 4, (40,), device="cuda")
    out = ops.mixed_width_gather_mm(x, ids, *args)
    ref = reference.gather_mm(x, ids, *args)
    tol = (2**-8 if dtype == torch.bfloat16 else 1e-5) * (1 + ref.float().abs().max().item())
    assert (out.float() - ref.float()).abs().max().item() <= tol
    ids, _ = torch.sort(ids)
    offs = torch.cumsum(torch.bincount(ids, minlength=4), 0).to(torch.int32)
    out = ops.mixed_width_grouped_mm(x, offs, *args)
    ref = reference.grouped_mm(x, offs, *args)
    tol = (2**-6 if dtype == torch.bfloat16 else 1e-5) * (1 + ref.float().abs().max().item())
    assert (out.float() - ref.float()).abs().max().item() <= tol


@pytest.mark.parametrize("tokens", [3, 40], ids=["decode", "prefill"])
def test_experts_forward_compiles_on_cuda(tokens):
    self, _ = _experts_module([3, 2, 4, 2, 8, 1, 3, 2])
    self.gate_up_proj, self.down_proj = self.gate_up_proj.cuda(), self.down_proj.cuda()
    x = torch.randn(tokens, 32, device="cuda")
    top_w, top_i = torch.randn(tokens, 8, device="cuda").softmax(-1).topk(2, dim=-1)
    eager = dispatch.cuda_forward(self, x, top_i, top_w)
    compiled = torch.compile(lambda *a: dispatch.cuda_forward(self, *a), fullgraph=True)
    torch.testing.assert_close(compiled(x, top_i, top_w), eager, rtol=1e-5, atol=1e-5)


def test_gather_kernel_beats_dequantize_then_matmul():
    import triton.testing

    args = _cuda(width_groups(quantized_experts([3, 2, 3, 2, 2, 3, 3, 2], 4096, 2048, 128)))
    x = torch.randn(2, 2048, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([1, 6], device="cuda")
    t_kernel = triton.testing.do_bench(lambda: ops.mixed_width_gather_mm(x, ids, *args))
    t_ref = triton.testing.do_bench(lambda: reference.gather_mm(x, ids, *args))
    assert t_kernel < t_ref, f"kernel {t_kernel * 1e3:.1f} us vs dequantize+matmul {t_ref * 1e3:.1f} us"
