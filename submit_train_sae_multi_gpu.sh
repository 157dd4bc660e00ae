#!/bin/bash
#SBATCH --job-name=sae_train_multi
#SBATCH --output=sae_train_multi_%j.out
#SBATCH --error=sae_train_multi_%j.err
#SBATCH --time=48:00:00
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=32
#SBATCH --mem=256G
#SBATCH --gres=gpu:4
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#
# Step 2 on several GPUs: data-parallel SAE training (02_train_sae.py under torchrun, one process per GPU).
#
#   sbatch submit_train_sae_multi_gpu.sh                                   # 1 node x 4 GPUs
#   sbatch --nodes=2 --gres=gpu:8 submit_train_sae_multi_gpu.sh            # 2 nodes x 8 GPUs
#   RUN_ID=act_x BATCH_SIZE_TRAIN=16384 sbatch submit_train_sae_multi_gpu.sh
#
# BATCH_SIZE_TRAIN is the GLOBAL batch (tokens per optimisation step over all GPUs): each GPU takes
# BATCH_SIZE_TRAIN / (nodes x GPUs per node), which must divide evenly. Same settings, same SAE_RUN_ID handling,
# preemption, requeue and sweeps (TOP_K=16,32 ...; --array splits them) as submit_train_sae.sh; see docs/training.md,
# "Training on several GPUs".
#
# Wrapper variables: PIPELINE_DIR, VENV, SAE_MODULES (as in submit_train_sae.sh); SAE_GPUS_PER_NODE (default:
# the GPUs SLURM gave this node); SAE_RDZV_PORT (default 29500), the rendezvous port on the first node.

# Find the project (SLURM runs a spool copy of this file, so $0 is no guide), then load the shared helpers.
SAE_PROJECT_DIR=
for d in "${PIPELINE_DIR:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" \
        2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)")" "$(dirname "${BASH_SOURCE[0]}")"; do
    [ -f "$d/slurm/common.sh" ] && SAE_PROJECT_DIR=$(cd "$d" && pwd) && break
done
[ -n "$SAE_PROJECT_DIR" ] || { echo "error: cannot find the pipeline folder; submit from it or set PIPELINE_DIR" >&2; exit 2; }
# shellcheck source=slurm/common.sh
. "$SAE_PROJECT_DIR/slurm/common.sh"

# The original specification's example settings: defaults only, a value exported in the submitting shell wins.
: "${EPOCHS:=20}"
: "${BATCH_SIZE_TRAIN:=4096}"   # global: split over all GPUs
: "${N_LATENTS_MULTIPLIER:=8}"
: "${TOP_K:=8}"
: "${DEVICE:=cuda}"             # each process uses cuda:LOCAL_RANK
: "${SAE_RUN_ID:=sae_${SLURM_CLUSTER_NAME:-slurm}_${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-$(date +%Y%m%d_%H%M%S)}}}"
export EPOCHS BATCH_SIZE_TRAIN N_LATENTS_MULTIPLIER TOP_K DEVICE SAE_RUN_ID

gpus=${SAE_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [ -z "$gpus" ] && [ -n "${CUDA_VISIBLE_DEVICES:-}" ]; then
    gpus=$(printf '%s' "$CUDA_VISIBLE_DEVICES" | tr ',' '\n' | grep -c .)
fi
case $gpus in
    '' | *[!0-9]* | 0) sae_fail "$SAE_EXIT_USAGE" "cannot tell how many GPUs this node has (SLURM_GPUS_ON_NODE" \
        "unset); request them with --gres=gpu:N or set SAE_GPUS_PER_NODE" ;;
esac
nodes=${SLURM_NNODES:-1}
master=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-}" 2>/dev/null | head -n 1)
master=${master:-$(hostname)}

sae_load_modules
sae_setup_python
# One interpreter path for every node: `uv run` once here (it may sync the environment), not once per task.
py=$("${SAE_PYTHON_CMD[@]}" -c 'import sys; print(sys.executable)') || sae_fail 1 "cannot start ${SAE_PYTHON_CMD[*]}"
sae_default_store
sae_log "store: $STORE_DIR, activation run: ${RUN_ID:-from $STORE_DIR/run_id.txt}, SAE run: $SAE_RUN_ID," \
    "$nodes node(s) x $gpus GPU(s), global batch $BATCH_SIZE_TRAIN, rendezvous $master:${SAE_RDZV_PORT:-29500}"
# torchrun reports the training processes' "stopped, state saved" (exit 75) as 1: the committed checkpoint tells.
SAE_RESUMABLE_IF_EXISTS="$STORE_DIR/runs/$SAE_RUN_ID/checkpoint*.json"
sae_run_command "step 2 (train SAE on $nodes x $gpus GPUs)" \
    srun --nodes="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash "$SAE_PROJECT_DIR/slurm/torchrun_node.sh" "$py" "$gpus" "$master:${SAE_RDZV_PORT:-29500}" \
    "$SAE_PROJECT_DIR/02_train_sae.py" --sae_run_id "$SAE_RUN_ID"
