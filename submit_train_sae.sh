#!/bin/bash
#SBATCH --job-name=sae_train
#SBATCH --output=sae_train_%j.out
#SBATCH --error=sae_train_%j.err
#SBATCH --time=48:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --gres=gpu:1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#
# Step 2 on SLURM: train the SAE, or every SAE of a sweep, on an activation run (02_train_sae.py).
#
#   sbatch submit_train_sae.sh                            # trains on the run named in $STORE_DIR/run_id.txt
#   RUN_ID=act_x EPOCHS=5 sbatch submit_train_sae.sh      # a given activation run, other settings
#   TOP_K=16,32,64 SEED=1,2 sbatch submit_train_sae.sh    # a sweep: 6 SAEs in one pass over the data
#   TOP_K=16,32,64 SEED=1,2 sbatch --array=0-2 -o sae_train_%A_%a.out -e sae_train_%A_%a.err submit_train_sae.sh
#                                                         # the same sweep split over 3 tasks: task t trains
#                                                         # SAEs t, t+3, ... of the grid (2 each here)
#   sbatch --dependency=afterok:<capture job> submit_train_sae.sh   # or use submit_pipeline.sh
#   STREAM=1 LAYER_NUM=8,16 sbatch submit_train_sae.sh   # no activation run: the model runs in this job, on its
#                                                         # GPU, with step 1's variables (docs/streaming.md)
#
# Wrapper variables: PIPELINE_DIR, VENV, SAE_MODULES (as in submit_save_activations.sh). SAE_RUN_ID defaults to
# sae_<cluster>_<job id> (an array's job id for all of its tasks), which survives a requeue, so a preempted
# training resumes from its checkpoint. See docs/slurm.md and docs/sweeps.md.

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
: "${BATCH_SIZE_TRAIN:=4096}"   # the original specification had 64: far too few tokens per step for a good SAE (docs/training.md)
: "${N_LATENTS_MULTIPLIER:=8}"
: "${TOP_K:=8}"
: "${DEVICE:=cuda}"
: "${SAE_RUN_ID:=sae_${SLURM_CLUSTER_NAME:-slurm}_${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-$(date +%Y%m%d_%H%M%S)}}}"
export EPOCHS BATCH_SIZE_TRAIN N_LATENTS_MULTIPLIER TOP_K DEVICE SAE_RUN_ID
source="activation run: ${RUN_ID:-from $STORE_DIR/run_id.txt}"
if [ "${STREAM:-0}" = 1 ] || [ "${STREAM:-}" = true ]; then
    # Streaming forwards the model here (the GPU and the 64G above hold Bielik-1.5B and the SAEs): step 1's
    # defaults (submit_save_activations.sh) say what to forward.
    : "${DATA_LIMIT:=100000}"
    : "${BATCH_SIZE_SAVE:=32}"
    : "${LAYER_NUM:=16}"
    export DATA_LIMIT BATCH_SIZE_SAVE LAYER_NUM
    source="streamed from ${MODEL_ID:-the default model} over ${HF_DATASET:-the default dataset} (DATA_LIMIT=$DATA_LIMIT)"
fi

sae_load_modules
sae_setup_python
sae_default_store
sae_log "store: $STORE_DIR, $source, SAE run: $SAE_RUN_ID" \
    "(TOP_K=$TOP_K${SEED:+, SEED=$SEED}${LAYER_NUM:+, LAYER_NUM=$LAYER_NUM})"
sae_run_step "step 2 (train SAE)" 02_train_sae.py --sae_run_id "$SAE_RUN_ID"
