#!/bin/bash
# Example SLURM job: 2 nodes x 8 GPUs, one torchrun per node, rendezvous on the first node.
#   sbatch scripts/slurm_example.sh configs/pretrain_0.5B.yaml parallel=fsdp
# torchrun starts the 8 workers of its node and sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
# which is all distributed.init_distributed() reads.
#SBATCH --job-name=zts-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one torchrun launcher per node; it forks one process per GPU
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail
mkdir -p logs

# The first node of the allocation hosts the c10d rendezvous store.
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
rdzv_port=29500

export OMP_NUM_THREADS=8              # CPU threads per worker (data loading, tokenization)
# export NCCL_SOCKET_IFNAME=ib0       # pick the fast interface if NCCL guesses wrong
# export NCCL_DEBUG=WARN

srun torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc_per_node=8 \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:$rdzv_port" \
    train_pretrain.py "$@"
