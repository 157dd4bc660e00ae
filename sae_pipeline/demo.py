"""Offline demo: capture -> training -> evaluation on a tiny random-weight Llama and the shipped Polish sample,
no network.

    uv run python -m sae_pipeline.demo            # writes ./demo_store (set STORE_DIR to put it elsewhere)

It runs the real scripts with the environment a user would export, so it exercises exactly the production path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from sae_pipeline.tiny_model import build_tiny_llama, load_sample_texts

REPO = Path(__file__).resolve().parent.parent
SAMPLE = REPO / "data" / "polish_sample.jsonl"


def main() -> None:
    store = Path(os.environ.get("STORE_DIR", "demo_store")).resolve()
    model_dir = store / "tiny_llama"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, load_sample_texts(SAMPLE), hidden_size=128, num_layers=4, intermediate_size=256)
    env = {
        "MODEL_ID": str(model_dir),
        "HF_DATASET": str(SAMPLE),
        "STORE_DIR": str(store),
        "DEVICE": "cpu",
        "DATA_LIMIT": "340",
        "EVAL_LIMIT": "60",
        "BROWSER_LATENTS": "30",
        "MAX_LENGTH": "64",
        "BATCH_SIZE_SAVE": "16",
        "DOCS_PER_SHARD": "100",
        "LAYER_NUM": "2",
        "N_LATENTS_MULTIPLIER": "4",
        "TOP_K": "8",
        "EPOCHS": "5",
        "BATCH_SIZE_TRAIN": "512",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    for name, value in env.items():
        os.environ.setdefault(name, value)
    print(f"demo: tiny Llama at {model_dir}; settings: " + " ".join(f"{k}={os.environ[k]}" for k in env), flush=True)
    for script in ("01_save_activations.py", "02_train_sae.py", "03_evaluate_sae.py"):
        print(f"\n$ python {script}", flush=True)
        code = subprocess.call([sys.executable, str(REPO / script)], cwd=REPO)
        if code != 0:
            sys.exit(code)
    sae_run = (store / "sae_run_id.txt").read_text().strip()
    print(
        f"\ndemo finished: activations and the SAE are under {store}/runs/; open "
        f"{store}/runs/{sae_run}/evaluation/feature_browser.html in a browser"
    )


if __name__ == "__main__":
    main()
