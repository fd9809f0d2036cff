#!/usr/bin/env bash
# refvllm training on several nodes under SLURM: one accelerate launcher per node, each starting one process
# per GPU, all meeting at the first node. Adapt the #SBATCH lines to your cluster, then from the repository root:
#
#   sbatch scripts/slurm_train.sh                                   # configs/sft.yaml, DDP, 2 nodes x 8 GPUs
#   CONFIG=configs/sft_qwen2_5_vl.yaml ACCELERATE_CONFIG=configs/accelerate/zero3.yaml sbatch scripts/slurm_train.sh
#   sbatch --nodes 8 scripts/slurm_train.sh train.max_steps=20000  # extra arguments are config overrides
#
# The global batch is train.micro_batch_size x train.grad_accum x (nodes x GPUS_PER_NODE): a job resubmitted on
# another node count resumes from the newest checkpoint with train.grad_accum recomputed (docs/training.md,
# "Resume"); train.resume=auto (the configs' default) makes a requeued job continue where it stopped.
#SBATCH --job-name=refvllm-sft
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --requeue
set -euo pipefail

export CONFIG=${CONFIG:-configs/sft.yaml}
export ACCELERATE_CONFIG=${ACCELERATE_CONFIG:-configs/accelerate/ddp.yaml}
export GPUS_PER_NODE=${GPUS_PER_NODE:-8}
export MAIN_PORT=${MAIN_PORT:-29500}
MAIN_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MAIN_HOST
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# One task per node; $SLURM_NODEID (0..N-1) is the node's rank, read on that node.
srun --kill-on-bad-exit=1 bash -c '
  exec accelerate launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$SLURM_NNODES" --machine_rank "$SLURM_NODEID" \
    --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
    --main_process_ip "$MAIN_HOST" --main_process_port "$MAIN_PORT" --rdzv_backend static \
    scripts/train.py --config "$CONFIG" "$@"' _ "$@"
