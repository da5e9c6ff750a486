import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_export.runtime.layout import pack, unpack


def packed_size(k: int, bits: int) -> int:
    return k * bits // 8  # bytes of a row of k b-bit values


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 8), rows=st.integers(1, 5), octets=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_roundtrip_is_bit_exact(bits, rows, octets, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(0, 2**bits, (rows, octets * 8), generator=g, dtype=torch.uint8)
    p = pack(q, bits)
    assert p.dtype == torch.uint8
    assert p.shape == (rows, packed_size(octets * 8, bits))
    assert torch.equal(unpack(p, bits, octets * 8), q)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_packed_bytes_cost_exactly_b_bits(bits):
    q = torch.zeros(7, 3, 128, dtype=torch.uint8)
    assert pack(q, bits).numel() * 8 == q.numel() * bits


def test_lsb_first_layout_matches_onnx_int4_and_int2():
    q = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=torch.uint8)
    assert pack(q, 4).tolist() == [[0x21, 0x03, 0, 0]]
    assert pack(q, 2).tolist() == [[0b111001, 0]]
    # 3-bit: 8 values in 3 bytes, value j at bits [3j, 3j+3)
    q3 = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.uint8)
    assert pack(q3, 3).tolist() == [[7, 0, 5 << 5]]


@pytest.mark.parametrize("bad_bits", [0, 9])
def test_rejects_widths_outside_1_to_8(bad_bits):
    with pytest.raises(ValueError, match="1..8"):
        pack(torch.zeros(1, 8, dtype=torch.uint8), bad_bits)


def test_rejects_dims_not_multiple_of_8():
    with pytest.raises(ValueError, match="multiple of 8"):
        pack(torch.zeros(1, 12, dtype=torch.uint8), 4)
