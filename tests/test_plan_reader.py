"""StreamReader: pread-based reads agree bit-exactly with safetensors, for whole tensors and expert/row slices."""

import pytest
import torch
from safetensors.torch import save_file

from moe_export.io import CheckpointError
from moe_export.plan.reader import StreamReader


@pytest.fixture()
def ckpt(tmp_path):
    t = {
        "fused": torch.randn(4, 6, 8).to(torch.bfloat16),  # [E, 2I, H]
        "plain": torch.randn(5, 3),
        "half": torch.randn(2, 8).half(),
    }
    save_file(t, str(tmp_path / "model.safetensors"))
    return tmp_path, t


def test_reads_match_bit_exactly(ckpt):
    path, t = ckpt
    rd = StreamReader(path)
    assert torch.equal(rd.read("plain"), t["plain"])
    assert torch.equal(rd.read("half"), t["half"]) and rd.read("half").dtype == torch.float16
    assert torch.equal(rd.read("fused"), t["fused"])
    assert torch.equal(rd.read("fused", expert=2), t["fused"][2])
    assert torch.equal(rd.read("fused", expert=3, rows=(3, 6)), t["fused"][3, 3:6])  # the "up" half
    assert torch.equal(rd.read("plain", rows=(1, 4)), t["plain"][1:4])
    a = rd.read("fused", expert=0, slot=0)
    b = rd.read("fused", expert=1, slot=1)
    assert torch.equal(a, t["fused"][0]) and torch.equal(b, t["fused"][1])  # two slots coexist
    c = rd.read("fused", expert=2, slot=0)
    assert torch.equal(a, t["fused"][2]) and a.data_ptr() == c.data_ptr()  # slot 0 reused in place
    with pytest.raises(KeyError, match="no tensor named 'nope'"):
        rd.read("nope")
    rd.close()


def test_truncated_file_is_a_clear_error(ckpt):
    import json

    path, t = ckpt
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        StreamReader(path)  # single file: its header is checked up front
    # sharded (index present): files are opened lazily, the short read is caught
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: f.name for k in t}}))
    rd = StreamReader(path)
    last = max(t, key=lambda k: rd.info(k)[2])  # which tensor is stored last is safetensors' choice
    with pytest.raises(CheckpointError, match="truncated"):
        rd.read(last)
