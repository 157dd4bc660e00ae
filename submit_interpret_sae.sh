#!/bin/bash
#SBATCH --job-name=sae_interpret
#SBATCH --output=sae_interpret_%j.out
#SBATCH --error=sae_interpret_%j.err
#SBATCH --time=12:00:00
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --gres=gpu:1
#SBATCH --open-mode=append
#
# Step 4 on SLURM: explain the latents of a trained SAE, or of every SAE of a sweep, with a local instruct model and
# score the explanations by detection and fuzzing against a control (04_interpret_sae.py); written to
# $STORE_DIR/runs/<sae run>/interpretation/, and step 3's feature browser shows them.
#
#   sbatch submit_interpret_sae.sh                              # the SAE or sweep in $STORE_DIR/sae_run_id.txt
#   EXPLAINER_MODEL=speakleash/Bielik-11B-v2.3-Instruct INTERPRET_LIMIT=1000 sbatch submit_interpret_sae.sh
#   sbatch --dependency=afterok:<evaluation job> submit_interpret_sae.sh
#
# Wrapper variables: PIPELINE_DIR, VENV, SAE_MODULES (as in submit_save_activations.sh). Every latent's row is
# written as soon as it is scored: a killed or timed-out job, submitted again, continues after the last row.
# See docs/slurm.md and docs/interpretation.md.

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
sae_run_step "step 4 (interpret SAE)" 04_interpret_sae.py   # reads SAE_RUN_ID itself when it is set
