#!/bin/bash
#SBATCH --job-name=sae_eval
#SBATCH --output=sae_eval_%j.out
#SBATCH --error=sae_eval_%j.err
#SBATCH --time=4:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --gres=gpu:1
#SBATCH --open-mode=append
#
# Step 3 on SLURM: evaluate a trained SAE, or every SAE of a sweep (03_evaluate_sae.py): CE-loss recovered with
# the SAE spliced in, reconstruction on held-out documents, firing-frequency histogram and the HTML feature browser,
# all written to $STORE_DIR/runs/<sae run>/evaluation/; for a sweep also evaluation/sweep.json and
# evaluation/frontier.png in the sweep's folder (the clean and ablated passes run once per layer).
#
#   sbatch submit_evaluate_sae.sh                               # the SAE or sweep in $STORE_DIR/sae_run_id.txt
#   SAE_RUN_ID=sae_x EVAL_LIMIT=500 sbatch submit_evaluate_sae.sh
#   SAE_RUN_ID=<sweep id> sbatch submit_evaluate_sae.sh         # every SAE of the sweep, one report
#   sbatch --dependency=afterok:<training job> submit_evaluate_sae.sh
#
# Wrapper variables: PIPELINE_DIR, VENV, SAE_MODULES (as in submit_save_activations.sh). Evaluation writes its
# files only at the end, atomically; a killed job is simply submitted again (no requeue needed).
# See docs/slurm.md and docs/evaluation.md.

# Find the project (SLURM runs a spool copy of this file, so $0 is no guide), then load the shared helpers.
SAE_PROJECT_DIR=
for d in "${PIPELINE_DIR:-}" "${SLURM_SUBMIT_DIR:-}" "$(dirname "$(scontrol show job "${SLURM_JOB_ID:-none}" \
        2>/dev/null | sed -n 's/^ *Command=//p' | head -n 1)")" "$(dirname "${BASH_SOURCE[0]}")"; do
    [ -f "$d/slurm/common.sh" ] && SAE_PROJECT_DIR=$(cd "$d" && pwd) && break
done
[ -n "$SAE_PROJECT_DIR" ] || { echo "error: cannot find the pipeline folder; submit from it or set PIPELINE_DIR" >&2; exit 2; }
# shellcheck source=slurm/common.sh
. "$SAE_PROJECT_DIR/slurm/common.sh"

# Defaults only, a value exported in the submitting shell wins.
: "${DEVICE:=cuda}"
export DEVICE

sae_load_modules
sae_setup_python
sae_default_store
sae_log "store: $STORE_DIR, SAE run or sweep: ${SAE_RUN_ID:-from $STORE_DIR/sae_run_id.txt}"
sae_run_step "step 3 (evaluate SAE)" 03_evaluate_sae.py   # reads SAE_RUN_ID itself when it is set
