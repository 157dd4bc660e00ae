"""Peak memory of step 1 must not grow with DATA_LIMIT: the run is streamed shard by shard.

    uv run python benchmarks/capture_memory.py

Runs the real script twice as a subprocess (N and 4N documents, same shard size) and reads each child's peak RSS
from the kernel (wait4), so the two numbers come from one machine in one run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts

REPO = Path(__file__).resolve().parent.parent


def peak_rss_mib(env: dict[str, str]) -> float:
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "01_save_activations.py")],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(proc.stderr.read().decode())
    return usage.ru_maxrss / 1024


def main() -> None:
    tmp = Path(tempfile.mkdtemp())
    texts = [t for t in load_sample_texts() if t.strip()]
    model = build_tiny_llama(tmp / "model", texts, hidden_size=256, intermediate_size=512, num_layers=4)
    small = 800
    data = tmp / "docs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(4 * small):
            f.write(json.dumps({"text": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
    base = {
        **os.environ,
        "MODEL_ID": str(model),
        "HF_DATASET": str(data),
        "DEVICE": "cpu",
        "MAX_LENGTH": "64",
        "BATCH_SIZE_SAVE": "32",
        "DOCS_PER_SHARD": "200",
        "LAYER_NUM": "2",
        "STORE_DTYPE": "float32",
    }
    results = {}
    for limit in (small, 4 * small):
        results[limit] = peak_rss_mib({**base, "DATA_LIMIT": str(limit), "STORE_DIR": str(tmp / f"store{limit}")})
    ratio = results[4 * small] / results[small]
    print(
        f"peak RSS: DATA_LIMIT={small}: {results[small]:.0f} MiB, DATA_LIMIT={4 * small}: "
        f"{results[4 * small]:.0f} MiB, ratio {ratio:.3f} (target <= 1.10)"
    )


if __name__ == "__main__":
    main()
