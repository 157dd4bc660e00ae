#!/bin/bash
# Submit the whole pipeline: capture (step 1), then training (step 2) once capture succeeded, then evaluation.
#
#   ./submit_pipeline.sh [CAPTURE_SBATCH_ARGS...] [-- TRAIN_SBATCH_ARGS...]
#
#   ./submit_pipeline.sh                                     # the original specification's settings
#   DATA_LIMIT=5000 EPOCHS=5 ./submit_pipeline.sh            # pipeline variables, as for the single steps
#   ./submit_pipeline.sh --array=0-7 -- --time=12:00:00      # capture as an 8-task array; training's own args
#   LAYER_NUM=8,16,24 TOP_K=16,32 ./submit_pipeline.sh -- --array=0-2
#                                                            # 3 layers captured in one pass, a sweep of 6 SAEs
#                                                            # trained by 3 tasks (SAEs t, t+3 each)
#
# All jobs get one RUN_ID and SAE_RUN_ID (the sweep's id when several SAEs train), so pipelines sharing a store
# never mix: training reads its activation run by id, not from run_id.txt. Training is submitted with
# --dependency=afterok on the capture job (the whole array, when --array is given) and --kill-on-invalid-dep=yes:
# if capture fails, training is cancelled instead of pending forever. If submit_evaluate_sae.sh exists, it is
# chained after training (all of its tasks) the same way; with SUBMIT_INTERPRET=1, submit_interpret_sae.sh after it.
# Prints run_id=, sae_run_id=, capture_job=, train_job= (and eval_job=, interpret_job=) lines.
#
#   STREAM=1 LAYER_NUM=8,16 TOP_K=16,32 ./submit_pipeline.sh
#                                                            # no full capture: training streams from the model;
#                                                            # a small capture (EVAL_CAPTURE_LIMIT documents,
#                                                            # default 2000) runs beside it for step 3, which
#                                                            # starts after both (docs/streaming.md)
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
: "${PIPELINE_DIR:=$here}"
tag=$(date +%Y%m%d_%H%M%S)_$$
: "${RUN_ID:=act_$tag}"
: "${SAE_RUN_ID:=sae_$tag}"
export PIPELINE_DIR RUN_ID SAE_RUN_ID

capture_args=() train_args=()
target=capture
for arg in "$@"; do
    if [ "$target" = capture ] && [ "$arg" = "--" ]; then target=train; continue; fi
    if [ "$target" = capture ]; then capture_args+=("$arg"); else train_args+=("$arg"); fi
done

# An array's tasks get %A_%a log names (job id_task index) unless the caller chose the log names.
array_logs() {  # array_logs NAME_OF_ARGS_ARRAY LOG_PREFIX
    local -n args=$1
    local is_array=0 has_output=0 has_error=0 arg
    for arg in "${args[@]+"${args[@]}"}"; do
        case $arg in
            --array|--array=*|-a|-a?*) is_array=1 ;;
            --output|--output=*|-o|-o?*) has_output=1 ;;
            --error|--error=*|-e|-e?*) has_error=1 ;;
        esac
    done
    if [ "$is_array" = 1 ]; then
        [ "$has_output" = 1 ] || args=(--output="$2_%A_%a.out" "${args[@]+"${args[@]}"}")
        [ "$has_error" = 1 ] || args=(--error="$2_%A_%a.err" "${args[@]+"${args[@]}"}")
    fi
}
array_logs capture_args sae_save_activations
array_logs train_args sae_train

submit() {  # prints the job id
    local out
    out=$(sbatch --parsable "$@") || { echo "error: sbatch $* failed" >&2; return 1; }
    printf '%s\n' "${out%%;*}"
}

if [ "${STREAM:-0}" = 1 ] || [ "${STREAM:-}" = true ]; then
    # streaming: training needs no capture; step 3 reads a small one (docs/streaming.md), captured meanwhile
    capture_job=$(submit --export="ALL,DATA_LIMIT=${EVAL_CAPTURE_LIMIT:-2000}" \
        "${capture_args[@]+"${capture_args[@]}"}" "$PIPELINE_DIR/submit_save_activations.sh")
    train_job=$(submit "${train_args[@]+"${train_args[@]}"}" "$PIPELINE_DIR/submit_train_sae.sh")
    trained="$train_job:$capture_job"  # what evaluation waits for
else
    capture_job=$(submit "${capture_args[@]+"${capture_args[@]}"}" "$PIPELINE_DIR/submit_save_activations.sh")
    train_job=$(submit --dependency="afterok:$capture_job" --kill-on-invalid-dep=yes \
        "${train_args[@]+"${train_args[@]}"}" "$PIPELINE_DIR/submit_train_sae.sh")
    trained=$train_job
fi

echo "run_id=$RUN_ID"
echo "sae_run_id=$SAE_RUN_ID"
echo "capture_job=$capture_job"
echo "train_job=$train_job"
if [ -f "$PIPELINE_DIR/submit_evaluate_sae.sh" ]; then
    eval_job=$(submit --dependency="afterok:$trained" --kill-on-invalid-dep=yes \
        "$PIPELINE_DIR/submit_evaluate_sae.sh")
    echo "eval_job=$eval_job"
fi
if [ "${SUBMIT_INTERPRET:-0}" = 1 ]; then  # step 4 after step 3: explanations and scores of the latents
    interpret_job=$(submit --dependency="afterok:${eval_job:-$train_job}" --kill-on-invalid-dep=yes \
        "$PIPELINE_DIR/submit_interpret_sae.sh")
    echo "interpret_job=$interpret_job"
fi
echo "logs in $PWD (sae_save_activations_*, sae_train_*, sae_eval_*); follow with: squeue -u ${USER:-\$USER}" >&2
