#!/usr/bin/env bash
# The GPU checks the issues ask for, as one short script (a few minutes on a machine with one CUDA GPU):
#   bash benchmarks/gpu_checks.sh                  # with the project's environment (uv), else python3
# 1. Capture (step 1) on a random-weight Llama with Bielik-1.5B's shape (hidden 1536, 32 layers, 12 heads, 2 KV
#    heads, intermediate 8960, vocab 32000), layer 16, bf16 storage: marginal tokens/s of the whole step 1 against
#    the bare truncated forward at the same batches, step 1's GPU busy fraction and peak memory, at the seed's batch
#    (16 documents x up to 128 tokens) and at the recommended BATCH_TOKENS_SAVE=65536 (DOCS_PER_SHARD=4096).
# 2. SAE training tokens/s at d_in 1536, 4x expansion, k 32, batch 4096, bf16 autocast, shards read from disk,
#    against a bare in-memory TopK loop.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SAE_PYTHON:-}" ]; then read -r -a PY <<<"$SAE_PYTHON"
elif command -v uv >/dev/null; then PY=(uv run python)
else PY=(python3); fi
export PYTHONUNBUFFERED=1
WORK="${TMPDIR:-/tmp}/sae_gpu_bench"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CAPTURE=(benchmarks/capture_speed.py --bielik-shape --device cuda --dtype bfloat16 --layer 16 --max-length 128
         --model-dir "$WORK/bielik_shape" --repeats 2)
"${PY[@]}" "${CAPTURE[@]}" --batch-size 16 --small 1024 --large 4096 2>"$WORK/capture_seed.err" \
    || { tail -n 30 "$WORK/capture_seed.err"; exit 1; }
"${PY[@]}" "${CAPTURE[@]}" --batch-tokens 65536 --docs-per-shard 4096 --small 2048 --large 8192 \
    2>"$WORK/capture_tokens.err" || { tail -n 30 "$WORK/capture_tokens.err"; exit 1; }
"${PY[@]}" benchmarks/train_speed.py --device cuda --d 1536 --tokens 2000000 --k 32 --batch 4096 \
    --store "$WORK/train"
