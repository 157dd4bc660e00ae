# shellcheck shell=bash
# Shared by the submit_*.sh scripts; sourced, never run.
#
# Provides:
#   sae_log / sae_fail       messages prefixed "[sae-slurm]"; sae_fail exits
#   sae_load_modules         `module load $SAE_MODULES`, only where `module` exists
#   sae_setup_python         SAE_PYTHON_CMD: $VENV/bin/python, else `uv run --project <dir> python`,
#                            else <dir>/.venv/bin/python
#   sae_default_store        STORE_DIR default: $SCRATCH/sae_store, else <project>/store (made absolute)
#   sae_run_step LABEL SCRIPT [ARGS...]
#                            runs the Python step in the background, forwards USR1/TERM to it, waits, and
#                            requeues the job when it stopped resumably (exit 75) after SLURM's warning signal.
#   sae_run_command LABEL CMD [ARGS...]
#                            the same for any command (submit_train_sae_multi_gpu.sh: srun ... torchrun ...);
#                            SAE_RESUMABLE_IF_EXISTS=PATTERN: a non-zero exit after USR1 counts as resumable
#                            when a file matches PATTERN (a glob; torchrun turns its workers' exit 75 into 1).
#
# Expects SAE_PROJECT_DIR (the folder holding 01_save_activations.py) to be set by the caller.

if [ -n "${PIPELINE_DIR:-}" ] && [ "$(cd "$PIPELINE_DIR" 2>/dev/null && pwd)" != "$SAE_PROJECT_DIR" ]; then
    echo "error: PIPELINE_DIR=$PIPELINE_DIR is not the pipeline folder (no slurm/common.sh in it)" >&2
    exit 2
fi

SAE_EXIT_RESUMABLE=75     # sae_pipeline/infra/preemption.py EXIT_RESUMABLE
SAE_EXIT_USAGE=2          # user error, as the Python steps use

sae_log() {
    printf '[sae-slurm %s] %s\n' "$(date '+%F %T')" "$*"
}

# The failure reason goes to stderr (the .err log); when stdout is a different file, its last line says it too.
sae_fail() {
    local code=$1; shift
    printf '[sae-slurm %s] FAILED: %s\n' "$(date '+%F %T')" "$*" >&2
    if ! [ /dev/stdout -ef /dev/stderr ]; then
        printf '[sae-slurm %s] FAILED: %s (exit %s)\n' "$(date '+%F %T')" "$*" "$code"
    fi
    exit "$code"
}

sae_job_label() {
    if [ -n "${SLURM_ARRAY_JOB_ID:-}" ]; then
        printf 'job %s (array %s_%s)' "${SLURM_JOB_ID:-?}" "$SLURM_ARRAY_JOB_ID" "${SLURM_ARRAY_TASK_ID:-?}"
    elif [ -n "${SLURM_JOB_ID:-}" ]; then
        printf 'job %s' "$SLURM_JOB_ID"
    else
        printf 'outside SLURM (pid %s)' "$$"
    fi
    if [ "${SLURM_RESTART_COUNT:-0}" != 0 ]; then
        printf ', restart %s' "$SLURM_RESTART_COUNT"
    fi
}

# SAE_MODULES: space-separated modules to load (default: the original specification's "python/3.10 cuda/11.8"; empty = none).
sae_load_modules() {
    local mods=${SAE_MODULES-python/3.10 cuda/11.8}
    [ -n "$mods" ] || return 0
    if ! command -v module >/dev/null 2>&1; then
        # batch shells are not login shells: try the usual init scripts before giving up
        local init
        for init in "${MODULESHOME:-/nonexistent}/init/bash" /etc/profile.d/lmod.sh /etc/profile.d/modules.sh; do
            if [ -f "$init" ]; then
                # shellcheck disable=SC1090
                . "$init" >/dev/null 2>&1 || true
                command -v module >/dev/null 2>&1 && break
            fi
        done
    fi
    if ! command -v module >/dev/null 2>&1; then
        sae_log "no 'module' command on this system: skipping module load ($mods)"
        return 0
    fi
    local m
    for m in $mods; do
        if module load "$m"; then
            sae_log "module load $m"
        else
            sae_log "WARNING: 'module load $m' failed; continuing (set SAE_MODULES to this cluster's module names)"
        fi
    done
}

# Sets the array SAE_PYTHON_CMD.
sae_setup_python() {
    if [ -n "${VENV:-}" ]; then
        [ -x "$VENV/bin/python" ] || sae_fail "$SAE_EXIT_USAGE" "VENV=$VENV has no bin/python"
        # shellcheck disable=SC1091
        [ -f "$VENV/bin/activate" ] && . "$VENV/bin/activate"
        SAE_PYTHON_CMD=("$VENV/bin/python")
        sae_log "python: $VENV/bin/python (VENV)"
    elif command -v uv >/dev/null 2>&1; then
        SAE_PYTHON_CMD=(uv run --project "$SAE_PROJECT_DIR" python)
        sae_log "python: uv run --project $SAE_PROJECT_DIR ($(command -v uv))"
    elif [ -x "$SAE_PROJECT_DIR/.venv/bin/python" ]; then
        SAE_PYTHON_CMD=("$SAE_PROJECT_DIR/.venv/bin/python")
        sae_log "python: $SAE_PROJECT_DIR/.venv/bin/python (no uv on PATH)"
    else
        sae_fail "$SAE_EXIT_USAGE" "no Python environment: set VENV=/path/to/venv, or put uv on PATH" \
            "(https://docs.astral.sh/uv/), or run 'uv sync' in $SAE_PROJECT_DIR"
    fi
    export PYTHONUNBUFFERED=1   # log lines appear as they happen, not when a buffer fills
}

sae_default_store() {
    if [ -z "${STORE_DIR:-}" ]; then
        if [ -n "${SCRATCH:-}" ]; then STORE_DIR=$SCRATCH/sae_store; else STORE_DIR=$SAE_PROJECT_DIR/store; fi
    fi
    case $STORE_DIR in
        /*) ;;
        *) STORE_DIR=$PWD/$STORE_DIR ;;   # relative to the submit dir (the job's cwd)
    esac
    export STORE_DIR
}

_sae_on_signal() {
    local sig=$1
    SAE_TRAPPED=1
    if [ "$sig" = USR1 ]; then SAE_GOT_USR1=1; fi
    if [ "$sig" = TERM ]; then SAE_GOT_TERM=1; fi
    sae_log "got SIG$sig: asking the step to save its state and stop"
    if [ -n "${SAE_CHILD:-}" ]; then kill -s "$sig" "$SAE_CHILD" 2>/dev/null || true; fi
}

# sae_run_step LABEL SCRIPT [ARGS...]: SCRIPT is relative to the project dir.
sae_run_step() {
    local label=$1 script=$2; shift 2
    sae_run_command "$label" "${SAE_PYTHON_CMD[@]}" "$SAE_PROJECT_DIR/$script" "$@"
}

sae_run_command() {
    local label=$1; shift
    local rc
    SAE_GOT_USR1=0 SAE_GOT_TERM=0 SAE_TRAPPED=0 SAE_CHILD=
    trap '_sae_on_signal USR1' USR1
    trap '_sae_on_signal TERM' TERM
    sae_log "$label: $* [$(sae_job_label), host $(hostname), cwd $PWD]"
    # Backgrounded and waited on: bash runs a trap only between commands, so a foreground child would delay
    # the USR1 handler until the step ended on its own (or was killed at the time limit).
    "$@" &
    SAE_CHILD=$!
    while :; do
        SAE_TRAPPED=0
        wait "$SAE_CHILD"
        rc=$?
        # `wait` returns >128 when a trapped signal interrupts it: the child is still running (or its status is
        # kept by bash), so wait again for its real exit status.
        [ "$SAE_TRAPPED" = 1 ] || break
    done
    SAE_CHILD=
    trap - USR1 TERM

    if [ "$rc" = 0 ]; then
        sae_log "$label: finished"
        return 0
    fi
    # A USR1 that lands before Python installed its handler kills it (128+10): nothing half-written is left
    # (every file is written atomically), so that is as resumable as a clean stop.
    if [ "$rc" = 138 ] && [ "$SAE_GOT_USR1" = 1 ]; then
        sae_log "$label: killed by SIGUSR1 before it could handle it; its saved state is consistent"
        rc=$SAE_EXIT_RESUMABLE
    fi
    if [ "$rc" != "$SAE_EXIT_RESUMABLE" ] && [ "$SAE_GOT_USR1" = 1 ] && [ -n "${SAE_RESUMABLE_IF_EXISTS:-}" ] \
        && compgen -G "$SAE_RESUMABLE_IF_EXISTS" >/dev/null; then
        sae_log "$label: exited with $rc after SIGUSR1 and $SAE_RESUMABLE_IF_EXISTS exists: resumable"
        rc=$SAE_EXIT_RESUMABLE
    fi
    if [ "$rc" = "$SAE_EXIT_RESUMABLE" ]; then
        if [ "$SAE_GOT_USR1" = 1 ] && [ "$SAE_GOT_TERM" = 0 ] && [ -n "${SLURM_JOB_ID:-}" ]; then
            sae_log "$label: state saved; requeueing job $SLURM_JOB_ID, it resumes where it stopped"
            # The job is killed as soon as the requeue is accepted: nothing after this line is guaranteed to run.
            if scontrol requeue "$SLURM_JOB_ID"; then
                sleep 60   # killed by SLURM within seconds; never reached in practice
                exit "$SAE_EXIT_RESUMABLE"
            fi
            sae_fail "$SAE_EXIT_RESUMABLE" "$label: stopped with its state saved, but 'scontrol requeue" \
                "$SLURM_JOB_ID' failed (submitted with --no-requeue?); resubmit with the same" \
                "RUN_ID/SAE_RUN_ID to resume"
        fi
        sae_fail "$SAE_EXIT_RESUMABLE" "$label: stopped with its state saved (exit 75); submit again with the" \
            "same RUN_ID/SAE_RUN_ID to resume"
    fi
    sae_fail "$rc" "$label: exited with code $rc (the step's own error, if any, is just above)"
}
