#!/bin/bash
# Multi-node pretraining under Slurm: one torchrun per node, joined by a c10d rendezvous on the
# first node. Usage: sbatch --nodes=4 scripts/slurm-pretrain.sh recipes/llama3-8b.toml [--set ...]
#SBATCH --job-name=herd-pretrain
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --output=%x-%j.out
set -euo pipefail

head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# --resume: a requeued or restarted job continues from the newest complete checkpoint
srun torchrun \
    --nnodes="$SLURM_NNODES" \
    --nproc-per-node="${GPUS_PER_NODE:-8}" \
    --rdzv-id="$SLURM_JOB_ID" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$head_node:29500" \
    --max-restarts=3 \
    -m herd pretrain "$@" --resume
