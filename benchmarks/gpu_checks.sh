#!/usr/bin/env bash
# The GPU checks the issues ask for, as one short script (run on a machine with one CUDA GPU):
#   bash benchmarks/gpu_checks.sh
# 1. capture tokens/s on a random-weight Llama with Bielik-1.5B's shape (hidden 1536, 32 layers, 12 heads, 2 KV
#    heads, intermediate 8960, vocab 32000), layer 16, bf16, batch 16 x 128, against the bare truncated forward;
# 2. SAE training tokens/s at d_in 1536, 4x expansion, k 32, batch 4096, bf16 autocast, shards read from disk,
#    against a bare in-memory TopK loop;
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
uv run python benchmarks/capture_speed.py --bielik-shape --device cuda --dtype bfloat16 --docs 1024 \
    --batch-size 16 --max-length 128 --layer 16 --repeats 3
uv run python benchmarks/train_speed.py --device cuda --d 1536 --tokens 2000000 --k 32 --batch 4096 \
    --store "${TMPDIR:-/tmp}/sae_gpu_bench"
# 3. capture on a real trained Llama (SmolLM2-135M-Instruct, layer 15 of 30), bf16, against the bare truncated forward.
uv run python benchmarks/capture_speed.py --smollm2 --device cuda --dtype bfloat16 --docs 1024 --batch-size 16 \
    --max-length 128 --repeats 3
