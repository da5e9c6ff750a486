"""llama.cpp as a speed peer on the same weights: convert a float folder to GGUF, quantize it to k-quants, time it
with ``llama-bench``.

llama.cpp is not a dependency: ``tools/build_llama_cpp.sh`` builds ``llama-quantize`` and ``llama-bench`` from the
source vendored in the llama-cpp-python sdist (about 25 minutes on 2 cores). Everything here takes that build's
folder (the one holding ``bin/llama-bench``); without it nothing runs.

    peer = LlamaCpp.find("~/llama.cpp/build")        # None when no build is there
    ggufs = peer.prepare(model_dir, out_dir, ["Q2_K", "Q4_K_M"])   # {"f32": path, "Q2_K": path, ...}
    peer.decode_tps(ggufs["Q2_K"], threads=1)        # llama-bench -p 0 -n 64 -t 1 -r 1: tok/s from an empty cache

k-quants give one type to all experts of a layer (a fused 3-D expert tensor has one ggml type), so these rows are
uniform-width baselines at about the size of our mixed-width plans.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

# The converter recognises a BPE pre-tokenizer by hashing its output on a check text; a tokenizer trained here is
# unknown to it, but it is byte-level BPE with GPT-2's pre-tokenizer, which is what this tells the converter.
_CONVERT = """
import runpy, sys
sys.path[:0] = [{src!r}, {gguf!r}]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = {argv!r}
runpy.run_path({script!r}, run_name="__main__")
"""


@dataclass
class LlamaCpp:
    build: Path   # cmake build folder: bin/llama-bench, bin/llama-quantize
    source: Path  # llama.cpp source tree: convert_hf_to_gguf.py, gguf-py/

    @classmethod
    def find(cls, build: str | os.PathLike | None) -> "LlamaCpp | None":
        """The build at ``build`` (or ``$MOE_EXPORT_LLAMA_CPP``), or None when there is none."""
        build = build or os.environ.get("MOE_EXPORT_LLAMA_CPP")
        if not build:
            return None
        build = Path(build).expanduser().resolve()
        if not (build / "bin" / "llama-bench").exists() or not (build / "bin" / "llama-quantize").exists():
            raise FileNotFoundError(f"{build}: no bin/llama-bench and bin/llama-quantize (build them with "
                                    "tools/build_llama_cpp.sh)")
        source = build.parent
        if not (source / "convert_hf_to_gguf.py").exists():
            raise FileNotFoundError(f"{source}: no convert_hf_to_gguf.py next to the build folder")
        return cls(build, source)

    def convert(self, model_dir: Path, out: Path) -> Path:
        """``model_dir`` (a float transformers folder with its tokenizer) as an f32 GGUF file."""
        if out.exists():
            return out
        tmp = out.with_suffix(".part")
        argv = ["convert_hf_to_gguf.py", str(model_dir), "--outtype", "f32", "--outfile", str(tmp)]
        code = _CONVERT.format(src=str(self.source), gguf=str(self.source / "gguf-py"), argv=argv,
                               script=str(self.source / "convert_hf_to_gguf.py"))
        _run([sys.executable, "-c", code], "convert_hf_to_gguf")
        tmp.rename(out)
        return out

    def quantize(self, f32: Path, qtype: str) -> Path:
        out = f32.with_name(f"{f32.stem.removesuffix('-f32')}-{qtype}.gguf")
        if not out.exists():
            tmp = out.with_suffix(".part")
            _run([str(self.build / "bin" / "llama-quantize"), str(f32), str(tmp), qtype], f"llama-quantize {qtype}")
            tmp.rename(out)
        return out

    def prepare(self, model_dir: Path, out_dir: Path, qtypes: list[str]) -> dict[str, Path]:
        """``{"f32": gguf, qtype: gguf, ...}`` for the float folder ``model_dir``, cached in ``out_dir``."""
        out_dir.mkdir(parents=True, exist_ok=True)
        f32 = self.convert(Path(model_dir), out_dir / "model-f32.gguf")
        return {"f32": f32, **{q: self.quantize(f32, q) for q in qtypes}}

    def bench(self, gguf: Path, threads: int, n_prompt: int, n_gen: int, reps: int = 1) -> float:
        """tok/s of one ``llama-bench`` test: ``-p 0 -n 64`` is decode from an empty cache, ``-p 128 -n 0`` prefill."""
        cmd = [str(self.build / "bin" / "llama-bench"), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen),
               "-t", str(threads), "-r", str(reps), "-o", "json"]
        rows = json.loads(_run(cmd, "llama-bench"))
        if len(rows) != 1:
            raise RuntimeError(f"llama-bench returned {len(rows)} results, expected 1: {cmd}")
        return float(rows[0]["avg_ts"])

    def decode_tps(self, gguf: Path, threads: int, n_gen: int = 64) -> float:
        return self.bench(gguf, threads, 0, n_gen)

    def prefill_tps(self, gguf: Path, threads: int, n_prompt: int = 128) -> float:
        return self.bench(gguf, threads, n_prompt, 0)


def _run(cmd: list[str], what: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{tail}")
    return proc.stdout
