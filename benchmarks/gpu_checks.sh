#!/usr/bin/env bash
# The GPU checks the issues ask for, as one short script (run on a machine with one CUDA GPU):
#   bash benchmarks/gpu_checks.sh
# 1. capture tokens/s on a random-weight Llama with Bielik-1.5B's shape (hidden 1536, 32 layers, 12 heads, 2 KV
#    heads, intermediate 8960, vocab 32000), layer 16, bf16, batch 16 x 128, against the bare truncated forward;
# 2. SAE training tokens/s at d_in 1536, 4x expansion (6,144 latents), k 32, batch 4096, bf16 autocast, shards read
#    from disk, against a bare in-memory TopK loop; its "timing" has the time per stage, the GPU's busy fraction
#    and the peak GPU memory;
# 3. step 2's loader alone against a plain read() of the same shard files at d 1536: batches on the host, then
#    batches delivered to the GPU (pinned groups, large copies on a side stream);
# 4. a sweep of 3 SAEs (k 16, 32, 64) at the same shape in one pass: tokens/s of the pass, GPU busy, peak memory.
# 5. capture on a real trained Llama (SmolLM2-135M-Instruct, layer 15 of 30), bf16, against the bare truncated forward.
set -euo pipefail
cd "$(dirname "$0")/.."
store="${TMPDIR:-/tmp}/sae_gpu_bench"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
uv run python benchmarks/capture_speed.py --bielik-shape --device cuda --dtype bfloat16 --docs 1024 \
    --batch-size 16 --max-length 128 --layer 16 --repeats 3
uv run python benchmarks/train_speed.py --device cuda --d 1536 --tokens 2000000 --k 32 --batch 4096 --store "$store"
uv run python benchmarks/loader_speed.py --d 1536 --tokens 2000000 --shard-tokens 25000 --buffer 262144 \
    --repeats 3 --store "$store"
uv run python benchmarks/loader_speed.py --d 1536 --tokens 2000000 --shard-tokens 25000 --buffer 262144 \
    --repeats 3 --store "$store" --device cuda
DEVICE=cuda STORE_DIR="$store" RUN_ID=speed_d1536_n2000000 TOP_K=16,32,64 EPOCHS=1 CHECKPOINT_EVERY_STEPS=100000 \
    uv run python 02_train_sae.py --sae_run_id "gpu_sweep_$(date +%H%M%S)" | grep "Trained SAE"
uv run python benchmarks/capture_speed.py --smollm2 --device cuda --dtype bfloat16 --docs 1024 --batch-size 16 \
    --max-length 128 --repeats 3
