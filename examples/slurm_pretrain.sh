#!/bin/bash
# Multi-node pretraining under SLURM: one `llmctl pretrain` per node, each starting 8 GPU workers
# through torchrun (llmctl re-executes itself under `python -m torch.distributed.run`).
#
#   sbatch examples/slurm_pretrain.sh                 # from the project folder (llmctl.yaml)
#   sbatch --nodes 4 examples/slurm_pretrain.sh --set pretrain.max_tokens=10000000000
#
# The workspace must be on a filesystem every node sees: rank 0 writes the run folder and
# checkpoints, and every rank reads the tokens artifact and, on --resume, the latest checkpoint.
# Extra arguments are passed to `llmctl pretrain`. Resubmit with --resume to continue a run.
#SBATCH --job-name=llmctl-pretrain
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1          # one launcher per node; torchrun starts the 8 workers
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --signal=TERM@300            # SIGTERM to the tasks 5 min before the limit: llmctl checkpoints, exits 130
set -euo pipefail

export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-29500}
export OMP_NUM_THREADS=8             # cores per worker; llmctl never uses more than the cores it has

# Single quotes: SLURM_NODEID differs per node, so it must expand inside each srun task.
srun --kill-on-bad-exit=1 bash -c 'exec llmctl pretrain \
  --nodes "$SLURM_NNODES" --node-rank "$SLURM_NODEID" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  --gpus 8 "$@"' llmctl-pretrain "$@"
