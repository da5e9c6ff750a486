"""Build a zoo model: BPE tokenizer, pre-train (cosine decay), fine-tune on a second corpus, save the
initialisation and both trained checkpoints with ``save_pretrained`` (``initial/``, ``pretrained/``,
``finetuned/``) and write a manifest. ``initial/`` is what the router-norm change of a pre-training run is
measured against (the paper's Mixtral setting, where the pre-trained model is all there is).

Deterministic for a seed at a fixed thread count, resumable (a training-state checkpoint every
``ckpt_every`` steps) and cached (a build whose manifest fingerprint matches is skipped).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from moe_export.io import atomic_dir, atomic_path, atomic_write_json, atomic_write_text, waiting_lock
from moe_export.paths import moe_export_home
from moe_export.quiet import transformers_saving
from moe_export.zoo.data import bigram_bits_per_byte, byte_bigram_bits_per_byte, load_corpus, random_windows, token_stream
from moe_export.zoo.registry import Entry, TrainSpec, get_entry
from moe_export.zoo.tokenizer import get_tokenizer, token_bytes

FORMAT_VERSION = 2  # bump when a change to this file changes what a build produces (2: initial/ checkpoint)


# --- models ------------------------------------------------------------------------------------


def make_config(entry: Entry, tokenizer):
    m, V, T = entry.model, len(tokenizer), entry.seq_len
    ids = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    if entry.arch == "switch":
        from transformers import SwitchTransformersConfig

        return SwitchTransformersConfig(
            vocab_size=V, d_model=m["hidden"], d_kv=m["kv_dim"], d_ff=m["expert_ffn"], num_heads=m["heads"],
            num_layers=m["layers"], num_decoder_layers=m["layers"],
            # sparse step 2: every other block is MoE (HF only computes the aux loss when the step is > 1)
            num_sparse_encoder_layers=m["layers"] // 2, num_sparse_decoder_layers=m["layers"] // 2,
            num_experts=m["experts"], expert_capacity=T,  # capacity = sequence length: no token is ever dropped
            router_jitter_noise=0.0, dropout_rate=0.0, router_aux_loss_coef=0.01, router_z_loss_coef=0.001,
            decoder_start_token_id=tokenizer.pad_token_id, tie_word_embeddings=True, **ids,
        )
    common = dict(
        vocab_size=V, hidden_size=m["hidden"], num_hidden_layers=m["layers"], num_attention_heads=m["heads"],
        num_key_value_heads=m["kv_heads"], num_experts_per_tok=m["top_k"], max_position_embeddings=T,
        router_aux_loss_coef=0.02, tie_word_embeddings=False, experts_implementation="grouped_mm", **ids,
    )
    if entry.arch == "mixtral":
        from transformers import MixtralConfig

        return MixtralConfig(intermediate_size=m["expert_ffn"], num_local_experts=m["experts"], **common)
    if entry.arch == "qwen3moe":
        from transformers import Qwen3MoeConfig

        return Qwen3MoeConfig(intermediate_size=m["expert_ffn"], moe_intermediate_size=m["expert_ffn"],
                              num_experts=m["experts"], head_dim=m["hidden"] // m["heads"], norm_topk_prob=True,
                              decoder_sparse_step=1, **common)
    if entry.arch == "olmoe":
        from transformers import OlmoeConfig

        return OlmoeConfig(intermediate_size=m["expert_ffn"], num_experts=m["experts"], **common)
    raise ValueError(f"zoo entry {entry.name}: unknown architecture {entry.arch!r}")


def make_model(entry: Entry, tokenizer, seed: int):
    from transformers import AutoModelForCausalLM, SwitchTransformersForConditionalGeneration

    config = make_config(entry, tokenizer)
    torch.manual_seed(seed)
    if entry.arch == "switch":
        model = SwitchTransformersForConditionalGeneration(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("router.classifier.weight"):
                    p.normal_(0.0, entry.model["router_init"])
    else:
        model = AutoModelForCausalLM.from_config(config)
    return model


def lm_loss(model, arch: str, x: torch.Tensor, train: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to optimise incl. router losses, next-token cross entropy) for windows x [B, T]."""
    if arch == "switch":
        P = x.shape[1] // 2  # encoder reads x[:, :P]; decoder starts from x[:, P-1] and predicts x[:, P:]
        labels = x[:, P:].contiguous()
        out = model(input_ids=x[:, :P], decoder_input_ids=x[:, P - 1 : -1], labels=labels, output_router_logits=train)
        ce = F.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
        return out.loss, ce
    out = model(input_ids=x, output_router_logits=train)
    ce = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    loss = ce + model.config.router_aux_loss_coef * out.aux_loss if train else ce
    return loss, ce


def lr_at(step: int, spec: TrainSpec) -> float:
    if step < spec.warmup:
        return spec.lr * (step + 1) / spec.warmup
    t = (step - spec.warmup) / max(1, spec.steps - spec.warmup)
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


# --- training ----------------------------------------------------------------------------------


class Interrupted(RuntimeError):
    """Raised by ``train_stage(stop_after=...)``: the state checkpoint lets the next call resume."""


def train_stage(model, arch: str, stream: torch.Tensor, spec: TrainSpec, seq_len: int, seed: int, state_path: Path,
                desc: str = "train", stop_after: int | None = None, progress: bool = True) -> dict:
    """AdamW with warm-up + cosine decay on random windows of ``stream``; resumes from ``state_path``."""
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.95), weight_decay=spec.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    step, elapsed, losses = 0, 0.0, []
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["optim"])
        gen.set_state(st["gen"])
        step, elapsed, losses = st["step"], st["elapsed"], st["losses"]

    def save_state():
        with atomic_path(state_path) as tmp:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict(), "gen": gen.get_state(), "step": step,
                        "elapsed": elapsed, "losses": losses}, tmp)

    model.train()
    bar = tqdm(total=spec.steps, initial=step, desc=desc, disable=not progress, dynamic_ncols=True)
    t0, done_here = time.perf_counter(), 0
    while step < spec.steps:
        for g in opt.param_groups:
            g["lr"] = lr_at(step, spec)
        x = random_windows(stream, spec.batch, seq_len, gen)  # [B, T]
        loss, ce = lm_loss(model, arch, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.clip)
        opt.step()
        losses.append(round(ce.item(), 5))
        step += 1
        done_here += 1
        bar.update(1)
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}", lr=f"{lr_at(step - 1, spec):.1e}")
        if step % spec.ckpt_every == 0 or step == spec.steps or (stop_after is not None and done_here >= stop_after):
            elapsed += time.perf_counter() - t0
            t0 = time.perf_counter()
            save_state()
            if stop_after is not None and done_here >= stop_after and step < spec.steps:
                bar.close()
                raise Interrupted(f"{desc}: stopped after {step} of {spec.steps} steps")
    bar.close()
    model.eval()
    tail = losses[-50:]
    return {"steps": step, "tokens": step * spec.batch * seq_len, "final_loss": round(sum(tail) / len(tail), 4),
            "wall_s": round(elapsed, 1), "lr": spec.lr, "batch": spec.batch, "seq_len": seq_len, "losses": losses}


# --- build -------------------------------------------------------------------------------------


def default_dir(name: str, seed: int) -> Path:
    return moe_export_home() / "zoo" / f"{name}-s{seed}"


def fingerprint(entry: Entry, seed: int) -> str:
    corpora = {c: load_corpus(c).sha256 for c in entry.corpora}
    recipe = {k: v for k, v in entry.to_json().items() if k not in ("name", "description", "notes", "eval_tokens", "eval_cloze")}
    blob = json.dumps({"format": FORMAT_VERSION, "recipe": recipe, "seed": seed, "corpora": corpora}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _save_checkpoint(model, tokenizer, final: Path) -> None:
    """save_pretrained into a temporary sibling folder, then rename: never a half-written checkpoint."""
    with atomic_dir(final) as tmp, transformers_saving():
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


@contextlib.contextmanager
def _threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _versions() -> dict:
    import tokenizers
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "platform": platform.platform()}


def is_built(out: Path, entry: Entry, seed: int) -> bool:
    man = out / "manifest.json"
    if not man.exists() or not all((out / d).is_dir() for d in ("initial", "pretrained", "finetuned")):
        return False
    try:
        return json.loads(man.read_text()).get("fingerprint") == fingerprint(entry, seed)
    except (OSError, ValueError):
        return False


def build(name: str, out_dir=None, seed: int = 0, *, force: bool = False, threads: int = 1, progress: bool = True) -> Path:
    """Build (or reuse) zoo entry ``name``; returns the folder with initial/, pretrained/, finetuned/, manifest.json."""
    entry = get_entry(name)
    out = Path(out_dir) if out_dir is not None else default_dir(name, seed)
    if not force and is_built(out, entry, seed):
        return out
    out.mkdir(parents=True, exist_ok=True)
    with waiting_lock(out / ".lock"):  # concurrent builds of one folder (parallel test sessions) wait for each other
        if not force and is_built(out, entry, seed):
            return out
        return _build_locked(name, entry, out, seed, force, threads, progress)


def _build_locked(name: str, entry: Entry, out: Path, seed: int, force: bool, threads: int, progress: bool) -> Path:
    from transformers import AutoTokenizer

    from moe_export.eval import evaluate, logits_fn_for
    from moe_export.hf import load_pretrained

    fp = fingerprint(entry, seed)
    state = out / ".state"
    state.mkdir(parents=True, exist_ok=True)
    # A state folder from a different recipe must not be resumed from.
    stamp = state / "fingerprint"
    if force or not stamp.exists() or stamp.read_text() != fp:
        shutil.rmtree(state)
        state.mkdir(parents=True)
        atomic_write_text(stamp, fp)
    t_start = time.perf_counter()
    with _threads(threads):
        tok, tok_dir = get_tokenizer(entry.vocab_size, entry.corpora)
        model = make_model(entry, tok, seed)
        if not (out / "initial").is_dir():
            _save_checkpoint(model, tok, out / "initial")
        stages = {}
        for stage, spec, stage_seed in (("pretrain", entry.pretrain, seed), ("finetune", entry.finetune, seed + 1000)):
            done = state / f"{stage}.json"
            target = out / ("pretrained" if stage == "pretrain" else "finetuned")
            if done.exists() and target.is_dir():
                stages[stage] = json.loads(done.read_text())
                model = _reload(entry, target)
                continue
            stream = token_stream(tok, spec.corpus, "train")
            stats = train_stage(model, entry.arch, stream, spec, entry.seq_len, stage_seed, state / f"{stage}.pt",
                                desc=f"{name} {stage}", progress=progress)
            _save_checkpoint(model, tok, target)
            atomic_write_json(done, stats)
            stages[stage] = stats
            (state / f"{stage}.pt").unlink(missing_ok=True)
        results = {}
        for which in ("pretrained", "finetuned"):
            trained = load_pretrained(out / which, experts_implementation="grouped_mm")
            trained_tok = AutoTokenizer.from_pretrained(out / which)
            results[which] = {"checkpoint": str(out / which), "seq_len": entry.seq_len,
                              "results": evaluate(logits_fn_for(trained), trained_tok, list(entry.corpora),
                                                  entry.seq_len, entry.eval_tokens, entry.eval_cloze,
                                                  progress=progress)}
        tb = token_bytes(tok)
        baselines = {}
        for c in entry.corpora:
            corp = load_corpus(c)
            test = token_stream(tok, c, "test")[: entry.eval_tokens]
            test_text = tok.decode(test.tolist())  # the same held-out bytes the models are scored on
            baselines[c] = {
                "token_bigram": bigram_bits_per_byte(token_stream(tok, c, "train"), test, len(tok), tb,
                                                     token_stream(tok, c, "valid")),
                "byte_bigram": byte_bigram_bits_per_byte(corp.splits["train"], test_text, corp.splits["valid"]),
            }
    _plot_losses(stages, out / "loss.png", name)
    manifest = {
        "format": "moe_export.zoo", "version": FORMAT_VERSION, "name": name, "seed": seed, "fingerprint": fp,
        "architecture": entry.arch, "description": entry.description, "entry": entry.to_json(),
        "parameters": sum(p.numel() for p in model.parameters()),
        "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": len(tok), "cache": tok_dir.name},
        "data": {c: load_corpus(c).info() for c in entry.corpora},
        "stages": {s: {k: v for k, v in st.items() if k != "losses"} for s, st in stages.items()},
        "eval": results, "baselines": baselines,
        "train_wall_s": round(sum(st["wall_s"] for st in stages.values()), 1),
        "build_wall_s": round(time.perf_counter() - t_start, 1), "threads": threads, "versions": _versions(),
        "router_init_std": entry.model.get("router_init"),  # None: the architecture's own init
        "notes": list(entry.notes),
    }
    atomic_write_json(out / "manifest.json", manifest)
    return out


def _reload(entry: Entry, path: Path):
    from moe_export.hf import load_pretrained

    return load_pretrained(path, experts_implementation="grouped_mm")


def _plot_losses(stages: dict, path: Path, name: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    off = 0
    for stage, st in stages.items():
        ls = st.get("losses", [])
        ax.plot(range(off, off + len(ls)), ls, lw=0.8, label=f"{stage} ({st['steps']} steps)")
        off += len(ls)
    ax.set_xlabel("step")
    ax.set_ylabel("train cross entropy (nats/token)")
    ax.set_title(f"zoo {name}")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
