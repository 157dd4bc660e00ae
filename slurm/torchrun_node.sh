#!/bin/bash
# One task per node (srun --ntasks-per-node=1, from submit_train_sae_multi_gpu.sh): torchrun starts this node's
# training processes, one per GPU, and meets the other nodes' torchrun at the rendezvous endpoint.
#
#   torchrun_node.sh PYTHON GPUS_PER_NODE HOST:PORT SCRIPT [ARGS...]
#
# Signals. SLURM's warning SIGUSR1 must reach the training processes (they checkpoint and stop together), but
# torchrun does not handle USR1 and would die of it, orphaning them. So torchrun runs with USR1 ignored and this
# script passes USR1 on to torchrun's children, the training processes (which install their own handler); if
# SLURM already signalled every process of the step, they get it twice, which is harmless. SIGTERM goes to
# torchrun, which passes it on itself.
set -u
python=$1 nproc=$2 endpoint=$3
shift 3

(trap '' USR1; exec "$python" -m torch.distributed.run --nnodes="${SLURM_NNODES:-1}" --nproc_per_node="$nproc" \
    --rdzv_backend=c10d --rdzv_endpoint="$endpoint" --rdzv_id="${SLURM_JOB_ID:-sae}" "$@") &
agent=$!
trapped=0
trap 'trapped=1; pkill -USR1 -P "$agent" 2>/dev/null || true' USR1
trap 'trapped=1; kill -TERM "$agent" 2>/dev/null || true' TERM
while :; do
    trapped=0
    wait "$agent"
    rc=$?
    [ "$trapped" = 1 ] || break   # a trap interrupted `wait`: torchrun is still running, wait again
done
exit "$rc"
