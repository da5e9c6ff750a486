"""HQQ: data-free, must reconstruct weights with lower L2 error than RTN at every width and group size."""

import pytest
import torch

from moe_export.quant.base import SCALE_DTYPE, get_quantizer, symmetric_zero
from moe_export.quant.rtn import quantize_with_params

GROUPS = [32, 64, 128, None]


def _weights(kind: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    W = torch.randn(96, 256, generator=g) * 0.02
    if kind == "heavy_tailed":  # 1% outliers at 8x, like real LLM weights
        W[torch.rand(W.shape, generator=g) < 0.01] *= 8
    return W


@pytest.mark.parametrize("kind", ["gaussian", "heavy_tailed"])
@pytest.mark.parametrize("symmetric", [False, True])
def test_hqq_beats_rtn_at_every_width_and_group(kind, symmetric):
    W = _weights(kind)
    rtn, hqq = get_quantizer("rtn"), get_quantizer("hqq")
    rows = []
    for g in GROUPS:
        for bits in range(1, 9):
            e_rtn = (rtn.quantize(W, bits, g, symmetric).dequantize() - W).norm().item()
            e_hqq = (hqq.quantize(W, bits, g, symmetric).dequantize() - W).norm().item()
            rows.append((g, bits, e_hqq / e_rtn))
            if symmetric and bits == 1:
                # sign binarisation with scale 2 mean|W| is already L2-optimal: HQQ returns RTN's answer.
                assert e_hqq == pytest.approx(e_rtn, rel=1e-6), (g, e_hqq, e_rtn)
            else:
                assert e_hqq < e_rtn, f"group {g}, {bits} bits: hqq {e_hqq:.5f} >= rtn {e_rtn:.5f}"
    print(f"\n{kind} {'sym' if symmetric else 'asym'}  ||W - W_hqq|| / ||W - W_rtn||")
    for g in GROUPS:
        print(f"  g={g!s:>4}: " + " ".join(f"{b}b {r:.3f}" for gg, b, r in rows if gg == g))


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [32, None])
def test_hqq_output_follows_the_float16_grid_contract(bits, symmetric, group_size):
    W = _weights("heavy_tailed")
    qw = get_quantizer("hqq").quantize(W, bits, group_size, symmetric)
    n_groups = 1 if group_size is None else W.shape[1] // group_size
    assert qw.qdata.dtype == torch.uint8 and qw.qdata.shape == W.shape
    assert int(qw.qdata.max()) <= 2**bits - 1
    assert qw.scale.dtype == SCALE_DTYPE and qw.scale.shape == (W.shape[0], n_groups)
    assert (qw.scale > 0).all()
    if symmetric:
        assert qw.zero is None
    else:
        assert qw.zero.dtype == SCALE_DTYPE and qw.zero.shape == (W.shape[0], n_groups)
    # q is computed against the stored float16 params, so any runtime reproduces it from the bytes
    assert torch.equal(qw.qdata, quantize_with_params(W, bits, qw.scale, qw.zero))
    assert torch.isfinite(qw.dequantize()).all()


def test_hqq_symmetric_uses_torchao_scale_only_hqq():
    from torchao.quantization.quant_primitives import _choose_qparams_and_quantize_scale_only_hqq

    W = _weights("gaussian")
    _, scale = _choose_qparams_and_quantize_scale_only_hqq(W, [1, 64], -4, 3)
    qw = get_quantizer("hqq").quantize(W, 3, 64, True)
    assert torch.equal(qw.scale, scale.to(SCALE_DTYPE))
    assert symmetric_zero(3) == 4.0


def test_hqq_degenerate_weights_stay_finite():
    W = torch.zeros(8, 64)
    W[1] = 1e-9  # below float16 resolution
    W[2, :32] = 0.5  # constant group
    for symmetric in (False, True):
        for bits in (1, 2, 4, 8):
            qw = get_quantizer("hqq").quantize(W, bits, 32, symmetric)
            Wh = qw.dequantize()
            assert torch.isfinite(Wh).all() and torch.isfinite(qw.scale.float()).all()
            assert (Wh - W).abs().max() < 0.3, (bits, symmetric)


def test_hqq_rejects_bad_input():
    hqq = get_quantizer("hqq")
    with pytest.raises(ValueError, match="1-8 bits"):
        hqq.quantize(torch.randn(4, 32), 9, 32, False)
    with pytest.raises(ValueError, match="2-D"):
        hqq.quantize(torch.randn(2, 4, 32), 4, 32, False)
    with pytest.raises(ValueError, match="does not divide"):
        hqq.quantize(torch.randn(4, 48), 4, 32, False)
    with pytest.raises(ValueError, match="lp_norm"):
        get_quantizer("hqq", lp_norm=2.0)
