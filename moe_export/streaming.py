"""Quantize a safetensors checkpoint larger than memory, one MoE layer at a time.

    quantize_checkpoint("Mixtral-8x7B/", "plan.json", "Mixtral-q/", quantizer="hqq")

The source is read lazily with ``pread`` (`moe_export.plan.reader.StreamReader`; through safetensors'
mmap, every page read stays resident while the file is open): each work unit (one MoE layer's routed
experts, or a run of non-expert tensors no larger than the largest layer) reads one expert's weights
at a time, quantizes and packs it, and writes one output shard. Peak RSS above the process's baseline is
one layer's packed output plus one expert's temporaries, whatever the checkpoint size (measured: +9-12 MiB
for 24 MiB float32 layers of a 149 MiB checkpoint, tests/test_streaming_quantize.py).

Every shard is written to a temp file and renamed. A shard's safetensors header records the unit
and a fingerprint of (source headers, plan, quantizer), so rerunning the same command skips the
shards that are already there and produces byte-identical files. The index, written last, is the
"done" marker. `moe_export.distributed` runs the units of one call on several ranks.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

INDEX = "model.safetensors.index.json"
SHARD = "model-{:05d}-of-{:05d}.safetensors"
DATA_FREE = ("rtn", "hqq")


class StreamingError(ValueError):
    """Bad input to a streaming quantization run: one message naming the file or field and the fix."""


# ----------------------------------------------------------------------------------------------- units


@dataclass
class Unit:
    """One output shard: a MoE layer's routed experts, or a run of non-expert tensors."""

    index: int
    kind: str  # "experts" | "rest"
    nbytes: int  # source bytes read
    layer: object = None  # moe_export.models.MoELayerKeys for "experts"
    keys: list[str] = field(default_factory=list)  # disk keys for "rest"

    @property
    def name(self) -> str:
        return self.layer.name if self.kind == "experts" else f"non-expert[{self.keys[0]}..{self.keys[-1]}]"


def _nbytes(rd, key: str) -> int:
    dtype, shape, _ = rd.info(key)
    n = torch.empty(0, dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


def make_units(rd, layout) -> list[Unit]:
    """Layers in order, then the non-expert tensors packed (in key order) into units <= the largest layer."""
    units, expert_keys = [], set()
    for layer in layout:
        keys = layer.expert_keys()
        expert_keys.update(keys)
        units.append(Unit(len(units), "experts", sum(_nbytes(rd, k) for k in keys), layer=layer))
    cap = max(u.nbytes for u in units)
    rest = sorted(k for k in rd.weight_map if k not in expert_keys)
    cur, size = [], 0
    for k in rest:
        n = _nbytes(rd, k)
        if cur and size + n > cap:
            units.append(Unit(len(units), "rest", size, keys=cur))
            cur, size = [], 0
        cur.append(k)
        size += n
    if cur:
        units.append(Unit(len(units), "rest", size, keys=cur))
    return units


# ------------------------------------------------------------------------------------------ the work


def _finite(w: torch.Tensor, what: str, src) -> torch.Tensor:
    if w.is_floating_point() and not bool(torch.isfinite(w).all()):
        bad = int((~torch.isfinite(w)).sum())
        raise StreamingError(
            f"{src}: tensor {what} has {bad} NaN/Inf value(s); the checkpoint is damaged or was saved after a diverged "
            "step: fix or re-export the weights before quantizing"
        )
    return w


def _cat_rows(parts):
    return parts[0] if len(parts) == 1 else torch.cat(parts, 0)


def _quantize_layer(rd, layer, bits, gs, quantizer, sym, dtype) -> dict[str, torch.Tensor]:
    """{model FQN: packed tensor subclass} for one MoE layer, reading one expert's weights at a time. ``bits`` /
    ``gs``: one for every projection, or ``{proj: ...}`` (``BitPlan.expert_quant``)."""
    from moe_export.quant.apply import for_projection
    from moe_export.tensors import MixedWidthExpertsTensor, PackedLinearWeight

    out = {}
    if layer.fused or layer.gate is not None:
        # model side: gate_up_proj [E, 2I, H] (gate rows, then up rows) and down_proj [E, H, I]; an expert's
        # [2I, H] is quantized as one weight, as quantize_ does on the loaded model.
        for proj, parts in (("gate_up_proj", (layer.gate, layer.up)), ("down_proj", (layer.down,))):
            qws = []
            for e in range(layer.num_experts):
                w = _cat_rows([_finite(rd.read_slice(p[e]), p[e].key, rd.folder) for p in parts])  # [N, K]
                # pack now: the uint8 codes of a whole layer would be a quarter of its float32 bytes
                qw = quantizer.quantize(w.float(), int(for_projection(bits, proj)[e]), for_projection(gs, proj), sym)
                qws.append(PackedLinearWeight.from_quantized(qw, dtype))
                del w
            out[f"{layer.name}.experts.{proj}"] = MixedWidthExpertsTensor.from_packed_experts(qws, dtype)
    else:  # Switch: one module per expert
        for proj, parts in (("wi", layer.up), ("wo", layer.down)):
            for e in range(layer.num_experts):
                w = _finite(rd.read_slice(parts[e]), parts[e].key, rd.folder)
                qw = quantizer.quantize(w.float(), int(for_projection(bits, proj)[e]), for_projection(gs, proj), sym)
                out[f"{layer.name}.experts.expert_{e}.{proj}.weight"] = PackedLinearWeight.from_quantized(qw, dtype=dtype)
    return out


def _model_key(disk_key: str, model_type: str) -> str:
    # transformers renames Mixtral's `block_sparse_moe` to `mlp` at load time (conversion_mapping.py)
    if model_type == "mixtral":
        return disk_key.replace(".block_sparse_moe.", ".mlp.")
    return disk_key


def _rest(rd, unit: Unit, model_type: str, roles: Callable[[str], str], plan) -> dict[str, torch.Tensor]:
    """The non-expert tensors of ``unit``, packed where ``plan`` gives the tensor (``BitPlan.non_expert_quant_for``:
    its own entry, else its role's policy) a width and the weight packs (``size.packs``; otherwise kept float, as ``quant.apply.quantize_non_expert_`` does)."""
    from moe_export.quant.apply import non_expert_quantizer
    from moe_export.size import packs
    from moe_export.tensors import PackedLinearWeight

    out, quantizer = {}, non_expert_quantizer()
    for key in unit.keys:
        w = _finite(rd.read(key), key, rd.folder)
        name = _model_key(key, model_type)
        q = plan.non_expert_quant_for([name], roles(name))
        if q is not None and packs(w.shape, q.group_size):
            w = PackedLinearWeight.from_quantized(quantizer.quantize(w.float(), q.bits, q.group_size, q.symmetric),
                                                  dtype=w.dtype)
        out[name] = w
    return out


# ----------------------------------------------------------------------------------------- on disk


def encode_state(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Plain tensors + header metadata of one shard, encoded as `moe_export.checkpoint` encodes a model."""
    from moe_export.checkpoint import FORMAT, VERSION, _describe

    tensors, quantized = {}, {}
    for k, v in state.items():
        if type(v) is torch.Tensor:
            tensors[k] = v
            continue
        desc, parts = _describe(v)
        quantized[k] = desc
        for part, t in parts.items():
            tensors[f"{k}.{part}"] = t
    return tensors, {"format": FORMAT, "version": VERSION, "quantized": json.dumps(quantized)}


def _write_shard(path: Path, tensors: dict, metadata: dict) -> None:
    from moe_export.io import save_safetensors

    save_safetensors(tensors, path, metadata)  # sorted header: a rerun or another rank writes the same bytes


def _shard_done(path: Path, unit: int, fp: str) -> bool:
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        meta = safe_open(str(path), framework="pt").metadata() or {}
    except Exception:
        return False  # unreadable leftover from another tool: redo it
    return meta.get("moe_export.unit") == str(unit) and meta.get("moe_export.fingerprint") == fp


def fingerprint(src: Path, plan, quantizer, quantizer_options: dict) -> str:
    """What a shard depends on, cheap to compute: every source file's header, size and mtime, the plan, the quantizer."""
    h = hashlib.sha256()
    for f in sorted(src.glob("*.safetensors")):
        st = f.stat()
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            h.update(fh.read(min(n, 1 << 26)))
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(plan.to_json().encode())
    h.update(json.dumps({"quantizer": quantizer, "options": quantizer_options}, sort_keys=True).encode())
    return h.hexdigest()


def check_output_dir(out: Path) -> None:
    """Fail before any work if ``out`` cannot be written (read-only folder, a file in the way)."""
    if out.exists() and not out.is_dir():
        raise StreamingError(f"output {out} exists and is not a folder; pass -o a new or existing folder")
    probe_dir = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    if not os.access(probe_dir, os.W_OK | os.X_OK):
        raise StreamingError(f"output folder {probe_dir} is not writable; pick another -o or fix its permissions")


def disk_full_message(err: OSError, where) -> str:
    return (f"{err.strerror or err} (output {where}); then rerun the same command: the finished shards are kept "
            "and skipped, no partial file is left")


# ------------------------------------------------------------------------------------------ the call


def quantize_checkpoint(model_dir, plan, output, quantizer: str = "rtn", quantizer_options: dict | None = None,
                        progress: bool = True, rank: int = 0, world_size: int = 1,
                        barrier: Callable[[], None] | None = None) -> Path:
    """Quantize the checkpoint folder ``model_dir`` by ``plan`` (BitPlan or path) into ``output``.

    With ``world_size > 1`` this rank writes only its share of the shards (`distributed.assign`);
    ``barrier`` must synchronise all ranks, and rank 0 writes the index, config and plan last.
    Returns ``output``. Raises `StreamingError` (or BitPlanError / CheckpointError / UnsupportedModelError)
    with nothing new left in ``output``.
    """
    from moe_export.distributed import assign
    from moe_export.io import SafetensorsCheckpoint
    from moe_export.loading import checkpoint_dtype
    from moe_export.models import checkpoint_moe_layout
    from moe_export.plan.bitplan import BitPlan, BitPlanError
    from moe_export.plan.reader import StreamReader
    from moe_export.quant.base import get_quantizer

    src, out = Path(model_dir), Path(output)
    quantizer_options = dict(quantizer_options or {})
    if quantizer not in DATA_FREE:
        raise StreamingError(f"streaming and multi-process quantization need a data-free quantizer ({', '.join(DATA_FREE)}), "
                             f"got {quantizer!r}; run {quantizer} in one process without --streaming (it loads the model)")
    if src.resolve() == out.resolve():
        raise StreamingError(f"output {out} is the source checkpoint folder; pass -o a different folder")
    label = "bit plan" if isinstance(plan, BitPlan) else str(plan)
    if not isinstance(plan, BitPlan):
        plan = BitPlan.load(plan)
    if plan.quantizer.name != quantizer:  # as quantize_ records it
        plan.provenance = {**plan.provenance, "quantized_with": quantizer}
    qz = get_quantizer(quantizer, **quantizer_options)
    ckpt = SafetensorsCheckpoint(src)
    ckpt.verify()  # truncated / corrupt files fail here, before anything is written
    cfg = ckpt.config()
    layout = checkpoint_moe_layout(src)
    try:
        plan.validate_against(src)  # layers, expert counts, group size, router hash
    except BitPlanError as err:
        raise BitPlanError(f"{label}: {err}") from None
    check_output_dir(out)
    reader = StreamReader(src)
    units = make_units(reader, layout)
    reader.close()
    fp = fingerprint(src, plan, quantizer, quantizer_options)
    mine = [u for u in units if assign([v.nbytes for v in units], world_size)[u.index] == rank]
    model_type = cfg.get("model_type", "")
    policy = plan.non_expert_policy()
    roles = (lambda n: "other") if policy.all_float and not plan.tensors else _role_lookup(cfg)
    dtype = checkpoint_dtype(cfg)
    sym = plan.quantizer.symmetric

    _fixed_mmap_threshold()
    created = not out.exists()
    written: list[Path] = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if rank == 0 and (out / INDEX).is_file() and _index_fingerprint(out) != fp:
            (out / INDEX).unlink()  # another run's output: unmark it complete before its shards are replaced
        bar = tqdm(mine, desc=f"quantize {quantizer} (rank {rank}/{world_size})" if world_size > 1 else f"quantize {quantizer}",
                   disable=not progress, unit="shard")
        for u in bar:
            path = out / SHARD.format(u.index + 1, len(units))
            if _shard_done(path, u.index, fp):
                continue
            bar.set_postfix_str(u.name[-40:])
            # pread, not mmap: pages read through a map stay resident while the file is open
            reader = StreamReader(src)
            if u.kind == "experts":
                projs = ("gate_up_proj", "down_proj") if u.layer.fused or u.layer.gate is not None else ("wi", "wo")
                state = _quantize_layer(reader, u.layer, *plan.expert_quant(u.layer.name, projs), qz, sym, dtype)
            else:
                state = _rest(reader, u, model_type, roles, plan)
            reader.close()
            tensors, meta = encode_state(state)
            meta = {**meta, "moe_export.unit": str(u.index), "moe_export.fingerprint": fp}
            _write_shard(path, tensors, meta)
            written.append(path)
            del state, tensors
            _trim_heap()
        if barrier is not None:
            barrier()
        if rank == 0:
            _finish(src, out, units, plan, quantizer, quantizer_options, fp)
        if barrier is not None:
            barrier()
    except StreamingError:
        _cleanup(out, written, created)  # bad input found mid-run (NaN weights): leave nothing of this run
        raise
    except OSError as err:
        # Finished shards are complete (atomic) and fingerprinted: keep them so that the rerun resumes.
        _cleanup(out, [], created)
        if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise StreamingError(disk_full_message(err, out)) from None
        if err.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise StreamingError(f"{err.strerror or err}; pick another -o or fix its permissions") from None
        raise
    return out


def _libc():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def _fixed_mmap_threshold() -> None:
    # glibc raises its mmap threshold each time a large block is freed, after which an expert's MB-sized
    # temporaries come from the heap, interleave with the small packed outputs kept, and cannot be given
    # back: measured +40% peak RSS over a layer. A fixed threshold (M_MMAP_THRESHOLD = -3) keeps them mmapped.
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, 256 * 1024)


def _trim_heap() -> None:
    # what the heap still holds after a unit would otherwise add to the next unit's peak
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def _index_fingerprint(out: Path) -> str | None:
    try:
        return json.loads((out / INDEX).read_text())["metadata"]["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _cleanup(out: Path, written: list[Path], created: bool) -> None:
    # An error run leaves nothing of its own: shards of earlier (interrupted) runs stay for resuming.
    for p in written:
        p.unlink(missing_ok=True)
    if created and out.is_dir() and not any(out.iterdir()):
        out.rmdir()


def _finish(src: Path, out: Path, units, plan, quantizer, options, fp) -> None:
    from safetensors import safe_open

    from moe_export.io import atomic_path, atomic_write_json, atomic_write_text

    weight_map, total = {}, 0
    for u in units:
        name = SHARD.format(u.index + 1, len(units))
        path = out / name
        if not _shard_done(path, u.index, fp):
            raise StreamingError(f"{path}: shard of unit {u.index} ({u.name}) is missing after all ranks finished; rerun")
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():
                weight_map[k] = name
        total += path.stat().st_size
    from moe_export.checkpoint import FORMAT, PLAN_NAME, VERSION, copy_tokenizer, quantization_config

    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = quantization_config()
    atomic_write_text(out / "config.json", json.dumps(cfg, indent=2, sort_keys=True, default=str) + "\n")
    plan.save(out / PLAN_NAME)
    copy_tokenizer(src, out)
    # temp files of writes a killed run never finished (atomic_path names them .<name>.<random>.tmp), and
    # weights of an earlier run with another shard count or of the in-memory path (model.safetensors)
    names = {SHARD.format(u.index + 1, len(units)) for u in units}
    stale = [p for p in out.glob(".*.tmp")] + [p for p in out.glob("model*.safetensors") if p.name not in names]
    for p in stale:
        p.unlink(missing_ok=True)
    # written last: a folder with an index is complete
    atomic_write_json(out / INDEX, {
        "metadata": {"total_size": total, "format": FORMAT, "version": VERSION, "bitplan": plan.to_json(),
                     "quantizer": quantizer, "quantizer_options": options, "fingerprint": fp},
        "weight_map": dict(sorted(weight_map.items())),
    })


def _role_lookup(cfg: dict) -> Callable[[str], str]:
    """parameter roles of a model built on the meta device: no weights, just module structure."""
    import transformers

    from moe_export.models import parameter_role_lookup

    config = transformers.AutoConfig.for_model(**cfg)
    arch = (cfg.get("architectures") or [None])[0]
    with torch.device("meta"):
        model = getattr(transformers, arch)(config) if arch and hasattr(transformers, arch) else \
            transformers.AutoModelForCausalLM.from_config(config)
    return parameter_role_lookup(model)


# ------------------------------------------------------------------- whether the CLI streams


def mem_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (unbounded where it cannot be read)."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def fits_in_memory(src, budget: int | None = None) -> bool:
    """Whether the in-memory path can quantize checkpoint ``src`` within ``budget`` bytes (default: the available
    memory): it holds the float model and its quantized copy, so the checkpoint must be at most half of it."""
    from moe_export.size import safetensors_bytes

    return safetensors_bytes(src) <= (mem_available() if budget is None else budget) // 2


def should_stream(src, quantizer: str, flag: bool | None) -> bool:
    """``--streaming`` / ``--no-streaming`` decide; by default stream data-free runs launched by torchrun or
    whose checkpoint does not fit in memory (:func:`fits_in_memory`)."""
    from moe_export.distributed import launched_by_torchrun

    if flag is not None:
        return flag
    if launched_by_torchrun():
        return True  # the in-memory path has no layer split; quantize_checkpoint names the quantizer if it cannot stream
    return quantizer in DATA_FREE and not fits_in_memory(src)
