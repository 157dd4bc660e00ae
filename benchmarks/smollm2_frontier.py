"""The frontier report on a real trained Llama: SmolLM2-135M-Instruct, one layer, TOP_K 16,32,64 x SEED 1,2.

Runs the real scripts as a user would (steps 1-3, the environment below), on the demo's text (English paragraphs of
Python's documentation, one Polish sample document after every three; ``sae_pipeline.demo``): block 15's
post_attention_layernorm (the middle of 30), expansion 4. Step 3 evaluates the sweep (the clean and ablated passes
once, one spliced pass per SAE) and writes ``evaluation/sweep.json`` and ``frontier.png`` in the sweep's folder;
this script copies the PNG to ``--png`` and prints the numbers RESULTS.md quotes.

    uv run python benchmarks/smollm2_frontier.py --store /tmp/smollm2_frontier          # steps 1-3
    uv run python benchmarks/smollm2_frontier.py --store /tmp/smollm2_frontier --steps 3 # evaluation only

A complete capture or sweep in the store is reused (step 1 and 2 resume or skip a finished run by id).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sae_pipeline.demo import smollm2  # noqa: E402
from sae_pipeline.demo.pipeline import CORPUS_FILE, write_corpus  # noqa: E402

RUN_ID, SWEEP_ID = "smollm2_l15", "smollm2_frontier"
SETTINGS = {
    "DEVICE": "cpu",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DATA_LIMIT": "800",
    "MAX_LENGTH": "64",
    "DOCS_PER_SHARD": "200",
    "BATCH_SIZE_SAVE": "16",
    "LAYER_NUM": "15",
    "N_LATENTS_MULTIPLIER": "4",
    "EVAL_LIMIT": "60",
    "EVAL_SCAN_TOKENS": "20000",
    "BROWSER_LATENTS": "20",
}
SWEEP = {"TOP_K": "16,32,64", "SEED": "1,2", "EPOCHS": "6", "BATCH_SIZE_TRAIN": "1024"}  # step 2 only
STEPS = {1: ("01_save_activations.py", "--run_id", RUN_ID), 2: ("02_train_sae.py", "--sae_run_id", SWEEP_ID)}
STEPS[3] = ("03_evaluate_sae.py", "--sae_run_id", SWEEP_ID)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=REPO / "store" / "smollm2_frontier")
    p.add_argument("--steps", default="1,2,3", help="which steps to run (default: all three)")
    p.add_argument("--png", type=Path, default=REPO / "docs" / "frontier_smollm2.png")
    args = p.parse_args()
    store = args.store.resolve()
    env = {
        **os.environ,
        **SETTINGS,
        "MODEL_ID": str(smollm2.model_folder(store)),
        "HF_DATASET": str(write_corpus(store / CORPUS_FILE)),
        "STORE_DIR": str(store),
        "RUN_ID": RUN_ID,
    }
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}: "
        + " ".join(f"{k}={v}" for k, v in (SETTINGS | SWEEP).items()),
        flush=True,
    )
    for step in map(int, args.steps.split(",")):
        start = time.perf_counter()
        step_env = env | SWEEP if step == 2 else env
        subprocess.run(
            [sys.executable, str(REPO / STEPS[step][0]), *STEPS[step][1:]], cwd=REPO, env=step_env, check=True
        )
        print(f"# step {step}: {time.perf_counter() - start:.0f} s", flush=True)
    if "3" in args.steps:
        report(store / "runs" / SWEEP_ID / "evaluation", args.png)


def report(folder: Path, png: Path) -> None:
    """The members' and the groups' numbers as RESULTS.md tables; the frontier PNG copied to ``png``."""
    sweep = json.loads((folder / "sweep.json").read_text(encoding="utf-8"))
    shutil.copyfile(folder / "frontier.png", png)
    print(f"# {png} ({png.stat().st_size / 1024:.0f} KiB); timing: {sweep['timing']}")
    print("\n| member | L0 | held-out FVU | CE-loss recovered | KL |\n|---|---|---|---|---|")
    for m in sweep["members"]:
        rec = "n/a" if m["ce_loss_recovered"] is None else f"{m['ce_loss_recovered']:.4f}"
        print(f"| {m['sae_run_id']} | {m['l0']:.1f} | {m['fvu']:.4f} | {rec} | {m['kl']:.4f} |")
    print("\n| k | seeds | L0 | held-out FVU | CE-loss recovered | KL |\n|---|---|---|---|---|---|")
    for g in sweep["groups"]:
        cells = [f"{g[key]['mean']:.4f} ± {g[key]['std']:.4f}" for key in ("fvu", "ce_loss_recovered", "kl")]
        print(f"| {g['top_k']} | {g['n_seeds']} | {g['l0']['mean']:.1f} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
