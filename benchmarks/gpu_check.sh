#!/usr/bin/env bash
# GPU check, one command for a CUDA machine: `bash benchmarks/gpu_check.sh` (or `make gpu-check`).
#   1. tests/test_flash_attention.py with the Triton kernels compiled for real (no TRITON_INTERPRET), bf16 included
#   2. benchmarks/bench_attention.py: our kernel vs PyTorch's SDPA flash backend, forward and forward+backward
#   3. benchmarks/bench_train.py --device cuda: whole training steps (bf16 autocast), sdpa vs triton attention
#   4. the pipeline on the GPU: built-in data, 100 pretraining steps with attn_impl=triton, a stop and a resume,
#      then one sample: the training loop's CUDA path (bf16 autocast, fused AdamW, the kernel inside the model)
# Every section's output also goes to $OUT/gpu_check/ when OUT is set (the device tool fetches that folder).
# Extra arguments go to bench_attention.py, e.g. `bash benchmarks/gpu_check.sh --seqlens 1024,4096 --dims 128`.
set -uo pipefail
cd "$(dirname "$0")/.."
unset TRITON_INTERPRET  # the interpreter is for CPU-only machines; here the kernels must be compiled
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device visible; nothing to check (the CPU tests run under 'make test')" >&2
    exit 1
fi
LOGS="${OUT:-/tmp}/gpu_check"
mkdir -p "$LOGS"
status=0
section() {  # section NAME COMMAND...: run, tee to $LOGS/NAME.txt, remember a failure and go on
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$LOGS/$name.txt"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    [ "$rc" -eq 0 ] || status=1
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$LOGS/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
    | tee -a "$LOGS/gpu.txt"

# Tests take the default tile of each kernel: tuning every shape would spend minutes compiling configs.
section tests env FLASH_ATTENTION_AUTOTUNE=0 python -m pytest -q tests/test_flash_attention.py
section attention python benchmarks/bench_attention.py "$@"
section train python benchmarks/bench_train.py --device cuda --steps 10

RUN=/tmp/gpu_check_run
rm -rf "$RUN"
COMMON=(configs/pretrain_tiny.yaml "out_dir=$RUN/pretrain" "data_dir=$RUN/data" steps=100 warmup_steps=10
        eval_every=50 save_every=50 attn_impl=triton device=cuda progress=false)
section data python prepare_data.py configs/data_builtin.yaml "out_dir=$RUN/data"
section pretrain_stop python train_pretrain.py "${COMMON[@]}" stop_after_steps=50
section pretrain_resume python train_pretrain.py "${COMMON[@]}"
section sample python sample.py "checkpoint=$RUN/pretrain" "prompt=def " max_new_tokens=32 temperature=0
echo "gpu_check.sh: logs in $LOGS; overall $([ $status -eq 0 ] && echo OK || echo FAILED)"
exit $status
