#!/usr/bin/env bash
# The GPU checks the issues ask for, as one short script (a few minutes on a machine with one CUDA GPU):
#   bash benchmarks/gpu_checks.sh                  # with the project's environment (uv), else python3
# 1. Capture (step 1) on a random-weight Llama with Bielik-1.5B's shape (hidden 1536, 32 layers, 12 heads, 2 KV
#    heads, intermediate 8960, vocab 32000), layer 16, bf16 storage: marginal tokens/s of the whole step 1 against
#    the bare truncated forward at the same batches, step 1's GPU busy fraction and peak memory, at the original specification's batch
#    (16 documents x up to 128 tokens) and at the recommended BATCH_TOKENS_SAVE=65536 (DOCS_PER_SHARD=4096).
# 2. SAE training tokens/s at d_in 1536, 4x expansion (6,144 latents), k 32, batch 4096, bf16 autocast, shards read
#    from disk, against a bare in-memory TopK loop; its "timing" has the time per stage, the GPU's busy fraction
#    and the peak GPU memory.
# 3. Step 2's loader alone against a plain read() of the same shard files at d 1536: batches on the host, then
#    batches delivered to the GPU (pinned groups, large copies on a side stream).
# 4. A sweep of 3 SAEs (k 16, 32, 64) at the same shape in one pass: tokens/s of the pass, GPU busy, peak memory.
# 5. Capture on a real trained Llama (SmolLM2-135M-Instruct, layer 15 of 30), bf16, against the bare forward.
# 6. Streaming (STREAM=1) at Bielik-1.5B's shape, layer 16, 1 and 2 epochs: tokens/s against capture + training
#    in series, and the forward's share of the streamed run.
# 7. Step 4 on the GPU: SmolLM2 as explainer and scorer on 50 latents, chats in batches (latents/min, generated
#    tokens/s). A Bielik-size explainer needs its weights cached on the node: then rerun step 4 with
#    EXPLAINER_MODEL=speakleash/Bielik-11B-v2.3-Instruct on the same store.
# 8. The four SAE architectures (TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU) as one sweep at the shape of 2.,
#    k 32, bf16 autocast: each trains (held-out FVU, L0), tokens/s of the pass, peak memory against the estimate.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${SAE_PYTHON:-}" ]; then read -r -a PY <<<"$SAE_PYTHON"
elif command -v uv >/dev/null; then PY=(uv run python)
else PY=(python3); fi
export PYTHONUNBUFFERED=1
WORK="${TMPDIR:-/tmp}/sae_gpu_bench"
mkdir -p "$WORK"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
CAPTURE=(benchmarks/capture_speed.py --device cuda --dtype bfloat16 --max-length 128 --repeats 2)
BIELIK=("${CAPTURE[@]}" --bielik-shape --layer 16 --model-dir "$WORK/bielik_shape")
"${PY[@]}" "${BIELIK[@]}" --batch-size 16 --small 1024 --large 4096 2>"$WORK/capture_seed.err" \
    || { tail -n 30 "$WORK/capture_seed.err"; exit 1; }
"${PY[@]}" "${BIELIK[@]}" --batch-tokens 65536 --docs-per-shard 4096 --small 2048 --large 8192 \
    2>"$WORK/capture_tokens.err" || { tail -n 30 "$WORK/capture_tokens.err"; exit 1; }
"${PY[@]}" benchmarks/train_speed.py --device cuda --d 1536 --tokens 2000000 --k 32 --batch 4096 \
    --store "$WORK/train"
LOADER=(benchmarks/loader_speed.py --d 1536 --tokens 2000000 --shard-tokens 25000 --buffer 262144 --repeats 3
        --store "$WORK/train")
"${PY[@]}" "${LOADER[@]}"
"${PY[@]}" "${LOADER[@]}" --device cuda
DEVICE=cuda STORE_DIR="$WORK/train" RUN_ID=speed_d1536_n2000000 TOP_K=16,32,64 EPOCHS=1 \
    CHECKPOINT_EVERY_STEPS=100000 "${PY[@]}" 02_train_sae.py --sae_run_id "gpu_sweep_$(date +%H%M%S)" \
    2>&1 | grep "Trained"
"${PY[@]}" "${CAPTURE[@]}" --smollm2 --models "$WORK/models" --batch-tokens 65536 --docs-per-shard 4096 \
    --small 1024 --large 4096 2>"$WORK/capture_smollm2.err" || { tail -n 30 "$WORK/capture_smollm2.err"; exit 1; }
"${PY[@]}" benchmarks/stream_speed.py --device cuda --bielik-shape --layer 16 --docs 8192 --epochs 1,2 --repeats 1 \
    2>"$WORK/stream.err" || { tail -n 30 "$WORK/stream.err"; exit 1; }
"${PY[@]}" benchmarks/interpret_speed.py --device cuda --latents 50 2>"$WORK/interpret.err" \
    || { tail -n 30 "$WORK/interpret.err"; exit 1; }
DEVICE=cuda STORE_DIR="$WORK/train" RUN_ID=speed_d1536_n2000000 TOP_K=32 EPOCHS=1 CHECKPOINT_EVERY_STEPS=100000 \
    SAE_ARCHITECTURE=topk,batchtopk,matryoshka_batchtopk,jumprelu \
    "${PY[@]}" 02_train_sae.py --sae_run_id "gpu_arch_$(date +%H%M%S)" 2>&1 | grep -E "Trained|Sweep|memory"
