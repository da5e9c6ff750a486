"""The zoo's entries: architecture, model size, tokenizer and training recipe of each model.

Step counts are fixed (not wall-clock budgets) so a build is deterministic for a seed. They were
sized on the 2-core build machine at 1 thread: ``tiny*`` builds in under 3 minutes, ``small-*`` in
about 25 minutes when the machine is not shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TrainSpec:
    corpus: str
    steps: int
    lr: float
    batch: int
    warmup: int = 30
    min_lr_ratio: float = 0.01  # cosine decay to lr * min_lr_ratio: the router-norm signal needs a decayed pre-train
    weight_decay: float = 0.01
    clip: float = 1.0
    ckpt_every: int = 200  # steps between resumable training-state checkpoints


@dataclass(frozen=True)
class Entry:
    name: str
    arch: str  # mixtral | qwen3moe | olmoe | switch
    description: str
    vocab_size: int
    seq_len: int
    model: dict  # architecture kwargs (moe_export names, mapped per arch in zoo.train.make_config)
    pretrain: TrainSpec
    finetune: TrainSpec
    eval_tokens: int = 16384  # held-out tokens per corpus scored at the end of a build
    eval_cloze: int = 100  # cloze items per corpus scored at the end of a build
    notes: tuple[str, ...] = field(default=())

    @property
    def corpora(self) -> list[str]:
        return sorted({self.pretrain.corpus, self.finetune.corpus})

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


_TINY = dict(hidden=64, layers=2, heads=4, kv_heads=2, expert_ffn=128, experts=8, top_k=2)
_TINY_PRE = TrainSpec(corpus="shakespeare", steps=600, lr=3e-3, batch=16)
_TINY_FT = TrainSpec(corpus="python-stdlib", steps=200, lr=1e-3, batch=16, warmup=10)
_SWITCH_NOTE = ("router.classifier.weight re-initialised with std 0.02 (transformers' SwitchTransformers init uses std 1.0, "
                "row norms ~sqrt(d_model), which hides the router-norm change of fine-tuning)",
                "trained as a prefix LM: the encoder reads the first T//2 tokens of a window, the decoder predicts the rest; "
                "eval scores only the decoder's positions")

ENTRIES: dict[str, Entry] = {}


def _add(e: Entry) -> None:
    ENTRIES[e.name] = e


_add(Entry("tiny", "mixtral", "Mixtral, 2 layers x 8 experts (top-2), H=64: tests and demo", 1024, 64, _TINY, _TINY_PRE, _TINY_FT))
_add(Entry("tiny-qwen3moe", "qwen3moe", "Qwen3-MoE, 2 layers x 8 experts (top-2), H=64", 1024, 64, _TINY, _TINY_PRE, _TINY_FT))
_add(Entry("tiny-olmoe", "olmoe", "OLMoE, 2 layers x 8 experts (top-2), H=64", 1024, 64, _TINY, _TINY_PRE, _TINY_FT))
_add(Entry(
    "tiny-switch", "switch", "SwitchTransformers enc-dec, 2+2 layers (1+1 MoE) x 8 experts (top-1), d=64", 1024, 64,
    dict(hidden=64, layers=2, heads=4, kv_dim=16, dense_ffn=128, expert_ffn=128, experts=8, router_init=0.02),
    _TINY_PRE, _TINY_FT, notes=_SWITCH_NOTE,
))
# The small models' dims are multiples of 128 so the paper's group size 128 divides every quantized
# weight. 2,000 pre-train steps (2.9M tokens) take ~20 min at 1 thread on an idle 2-core machine; the
# earlier 600-step recipe left the models short of a token-bigram baseline.
_SMALL_PRE = TrainSpec(corpus="shakespeare", steps=2000, lr=2e-3, batch=12, warmup=60, ckpt_every=100)
_SMALL_FT = TrainSpec(corpus="python-stdlib", steps=400, lr=6e-4, batch=12, warmup=20, ckpt_every=100)
_add(Entry(
    "small-mixtral", "mixtral", "Mixtral, 4 layers x 16 experts (top-2), H=256, ~15.4M params", 4096, 128,
    dict(hidden=256, layers=4, heads=8, kv_heads=2, expert_ffn=256, experts=16, top_k=2),
    _SMALL_PRE, _SMALL_FT, eval_tokens=32768,
))
_add(Entry(
    "small-switch", "switch", "SwitchTransformers enc-dec, 4+4 layers (2+2 MoE) x 16 experts (top-1), d=256, ~17.6M params",
    4096, 128,
    dict(hidden=256, layers=4, heads=8, kv_dim=32, dense_ffn=384, expert_ffn=384, experts=16, router_init=0.02),
    _SMALL_PRE, _SMALL_FT, eval_tokens=32768, notes=_SWITCH_NOTE,
))


def get_entry(name: str) -> Entry:
    if name not in ENTRIES:
        raise KeyError(f"unknown zoo entry {name!r}; available: {', '.join(ENTRIES)} (see `moe-export zoo list`)")
    return ENTRIES[name]
