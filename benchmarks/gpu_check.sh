#!/usr/bin/env bash
# GPU check for flash_attention.py: the kernel tests compiled for real (no TRITON_INTERPRET), then the
# speed table against PyTorch's SDPA flash backend. Run from anywhere: `bash benchmarks/gpu_check.sh`.
set -euo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the interpreter is for CPU-only machines; here the kernels must be compiled
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible; nothing to check (the CPU tests run under 'make test')" >&2
    exit 1
fi
# Tests take the default tile of each kernel: tuning every shape would spend minutes compiling configs.
FLASH_ATTENTION_AUTOTUNE=0 python -m pytest -q tests/test_flash_attention.py
python benchmarks/bench_attention.py "$@"
