"""In-graph unpack and the width-group layout used by the exporters: bit-exact against moe_export.quant."""

import pytest
import torch

from moe_export.export.experts import MixedWidthWeight
from moe_export.runtime.layout import WidthGroups, pack, pack_codes, unpack_codes, unpack_lut
from moe_export.quant.rtn import RTNQuantizer


@pytest.mark.parametrize("bits", range(1, 9))
def test_unpack_codes_matches_pack(bits):
    q = torch.randint(0, 2**bits, (3, 5, 48), dtype=torch.uint8)
    got = unpack_codes(pack(q, bits), unpack_lut(bits), bits, 48)
    assert torch.equal(got, q.long())


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("groups", [1, 3, 4, 9])
def test_zero_codes_roundtrip_any_group_count(bits, groups):
    z = torch.randint(0, 2**bits, (2, 7, groups), dtype=torch.uint8)
    packed = pack_codes(z, bits)
    assert packed.shape[-1] == (groups * bits + 7) // 8  # what GatherBlockQuantized expects
    assert torch.equal(unpack_codes(packed, unpack_lut(bits), bits, packed.shape[-1] * 8 // bits)[..., :groups], z.long())


@pytest.mark.parametrize("symmetric", [False, True])
def test_mixed_width_gather_equals_reference_dequantize(symmetric):
    bits = [2, 3, 4, 8, 3, 2]
    w = torch.randn(len(bits), 24, 64)
    qws = [RTNQuantizer().quantize(w[e], b, 32, symmetric) for e, b in enumerate(bits)]
    groups = WidthGroups.from_quantized(qws)
    assert groups.bit_widths == tuple(bits) and groups.slots == (0, 0, 0, 0, 1, 1)
    mod = MixedWidthWeight(groups)
    idx = torch.tensor([5, 0, 3, 3, 1, 4, 2])
    want = torch.stack([qws[i].dequantize() for i in idx])
    assert torch.equal(mod.gather(idx), want)  # bit-exact: same float32 ops on the same stored bytes
    coded = mod.use_zero_codes()
    assert coded == [2, 4, 8]  # 3-bit keeps the float16 form (no ORT kernel reads 3-bit)
    assert torch.equal(mod.gather(idx), want)
    # bytes at b bits per weight: 3-bit experts cost 3 bits, not 4
    assert groups.packed[3].shape[-1] == 64 * 3 // 8


def test_fractional_zeros_keep_float16_form():
    from moe_export.quant.base import QuantizedWeight

    q = QuantizedWeight(torch.randint(0, 4, (8, 32), dtype=torch.uint8), torch.rand(8, 1).half() + 0.1,
                        torch.full((8, 1), 1.5).half(), 2, 32)
    mod = MixedWidthWeight(WidthGroups.from_quantized([q, q]))
    assert mod.use_zero_codes() == []
    assert torch.equal(mod.gather(torch.tensor([1]))[0], q.dequantize())
