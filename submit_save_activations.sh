#!/bin/bash
#SBATCH --job-name=sae_save_activations
#SBATCH --output=sae_save_activations_%j.out
#SBATCH --error=sae_save_activations_%j.err
#SBATCH --time=24:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --mem=32G
#SBATCH --gres=gpu:1
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#
# Step 1 on SLURM: capture a layer's activations into the store (01_save_activations.py).
#
#   sbatch submit_save_activations.sh                              # the original specification's settings below
#   DATA_LIMIT=5000 LAYER_NUM=20 sbatch submit_save_activations.sh # any pipeline variable, from your shell
#   LAYER_NUM=8,16,24 BATCH_TOKENS_SAVE=65536 sbatch submit_save_activations.sh   # 3 layers, GPU-sized batches
#   sbatch --time=2:00:00 --mem=16G submit_save_activations.sh     # any #SBATCH line, on the command line
#   sbatch --array=0-3 -o sae_save_activations_%A_%a.out -e sae_save_activations_%A_%a.err \
#          submit_save_activations.sh                              # 4 tasks fill one run together
#
# Wrapper variables: PIPELINE_DIR (the project folder, found automatically), VENV (a virtualenv; default
# `uv run` in the project), SAE_MODULES (modules to load where `module` exists; default "python/3.10 cuda/11.8",
# empty for none). RUN_ID defaults to act_<cluster>_<job id> (the array's job id for all of its tasks), so a
# requeued job or task resumes the same run. See docs/slurm.md.

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
: "${DATA_LIMIT:=100000}"
: "${BATCH_SIZE_SAVE:=32}"
: "${LAYER_NUM:=16}"
: "${DEVICE:=cuda}"
: "${RUN_ID:=act_${SLURM_CLUSTER_NAME:-slurm}_${SLURM_ARRAY_JOB_ID:-${SLURM_JOB_ID:-$(date +%Y%m%d_%H%M%S)}}}"
export DATA_LIMIT BATCH_SIZE_SAVE LAYER_NUM DEVICE RUN_ID

sae_load_modules
sae_setup_python
sae_default_store
sae_log "store: $STORE_DIR, run: $RUN_ID"
sae_run_step "step 1 (save activations)" 01_save_activations.py --run_id "$RUN_ID"
