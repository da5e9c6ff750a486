#!/usr/bin/env bash
# Build llama.cpp's llama-quantize and llama-bench, the speed peer of `moe-export bench --llama-cpp DIR` and
# tools/bench_llama_cpp.py. Not part of CI: about 25 minutes on 2 cores.
#
#   tools/build_llama_cpp.sh [WORKDIR]      # default ~/llama.cpp-peer; prints the build folder to pass as DIR
#
# The source is the llama.cpp tree vendored in the llama-cpp-python sdist (the package registry is the one network
# source here). AMX is switched off so the CPU kernels compared are the AVX2 / AVX-512 ones every machine here has.
set -euo pipefail
work=${1:-$HOME/llama.cpp-peer}
python=${PYTHON:-python3}
mkdir -p "$work"
cd "$work"
sdist=$(ls llama_cpp_python-*.tar.gz 2>/dev/null | head -1 || true)
if [ -z "$sdist" ]; then
    "$python" -m pip download --no-deps --no-binary :all: llama-cpp-python -d . >/dev/null
    sdist=$(ls llama_cpp_python-*.tar.gz | head -1)
fi
src=$work/${sdist%.tar.gz}/vendor/llama.cpp
[ -d "$src" ] || tar xzf "$sdist"
cmake -S "$src" -B "$src/build" -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
    -DGGML_NATIVE=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF >/dev/null
cmake --build "$src/build" -j"$(nproc)" --target llama-quantize llama-bench >/dev/null
echo "$src/build"
