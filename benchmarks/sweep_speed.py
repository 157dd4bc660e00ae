"""A sweep of 6 SAEs in one pass against the same 6 SAEs trained one after the other, in one run.

Sweep: ``TOP_K=16,32,64 SEED=1,2`` on one layer (d 512, 4x: 2,048 latents), every batch read and shuffled once
and stepped on by all six. Separate: six runs of step 2, one per (k, seed), each with ``DATA_SEED=1`` (the sweep's
data seed, its first SEED), so each must end with exactly the model its sweep member ends with. Both in this
process (``train_sae``, after the imports are done), so the separate runs are not charged the seconds of imports
a fresh ``02_train_sae.py`` pays: the conservative ratio; rounds alternate the order (sweep first, then separate
first). Then the same as a user runs it: ``02_train_sae.py`` once with the lists against six times with one value
each, as subprocesses. Reports wall seconds, the ratios, the sweep's stage times and the largest difference between
a sweep member's tensors and its separate twin's (0: bit for bit).

Run: ``uv run python benchmarks/sweep_speed.py`` (``--tokens``, ``--epochs`` for a longer run).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from train_speed import machine, synthetic_run

from sae_pipeline.settings import TrainSettings
from sae_pipeline.steps.train import train_sae
from sae_pipeline.store.runs import Store
from sae_pipeline.store.training import training_runs

REPO = Path(__file__).resolve().parent.parent


def max_difference(a: Path, b: Path) -> float:
    ta, tb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    pairs = [(ta["sae_state_dict"][k], tb["sae_state_dict"][k]) for k in ta["sae_state_dict"]]
    pairs.append((ta["pipeline_sae"]["b_dec"], tb["pipeline_sae"]["b_dec"]))
    return max(float((x - y).abs().max()) for x, y in pairs)


def scripts(store: Store, run_id: str, args, tag: str) -> tuple[float, float]:
    """Wall seconds of ``02_train_sae.py`` with the lists, and of the six runs with one value each."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SAE_", "TRAIN_", "LAYER_"))}
    env.update(STORE_DIR=str(store.root), RUN_ID=run_id, DEVICE="cpu", EPOCHS=str(args.epochs))
    env.update(BATCH_SIZE_TRAIN=str(args.batch), CHECKPOINT_EVERY_STEPS="10000", DATA_SEED="1")

    def step2(sae_run_id: str, **values: str) -> float:
        start = time.perf_counter()
        cmd = [sys.executable, str(REPO / "02_train_sae.py"), "--sae_run_id", sae_run_id]
        subprocess.run(cmd, cwd=REPO, env={**env, **values}, check=True, capture_output=True)
        return time.perf_counter() - start

    sweep = step2(f"script_sweep_{tag}", TOP_K="16,32,64", SEED="1,2")
    separate = sum(
        step2(f"script_{tag}_k{k}_s{seed}", TOP_K=str(k), SEED=str(seed)) for k in (16, 32, 64) for seed in (1, 2)
    )
    return sweep, separate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "store" / "bench"))
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--tokens", type=int, default=26_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch", type=int, default=4096)
    args = p.parse_args()
    store = Store(Path(args.store))
    run_id = synthetic_run(store, args.d, args.tokens, shard_tokens=10_000)
    tag = time.strftime("%H%M%S")
    common = dict(
        store_dir=store.root,
        epochs=args.epochs,
        batch_size_train=args.batch,
        device="cpu",
        checkpoint_every_steps=10_000,
        log_every_steps=10,
    )
    import sae_pipeline.sae  # noqa: F401  (the seconds of imports before any timing)

    sweep_s, separate_s, differences = [], [], {}
    for r in range(args.rounds):  # ABBA...: sweep, separate, separate, sweep, so that a drift in machine load cancels
        for kind in ("sweep", "separate") if r % 2 == 0 else ("separate", "sweep"):
            name = f"{kind}_{tag}_{r}"
            start = time.perf_counter()
            if kind == "sweep":
                train_sae(TrainSettings(**common, top_k=(16, 32, 64), seed=(1, 2)), run_id, name)
                sweep_s.append(time.perf_counter() - start)
                continue
            for k in (16, 32, 64):
                for seed in (1, 2):
                    train_sae(TrainSettings(**common, top_k=k, seed=seed, data_seed=1), run_id, f"{name}_k{k}_s{seed}")
            separate_s.append(time.perf_counter() - start)
    script_sweep_s, script_separate_s = scripts(store, run_id, args, tag)
    members = training_runs(store, f"sweep_{tag}_0")
    for member in members:
        meta = member.read_meta()
        alone = store.run_dir(f"separate_{tag}_0_k{meta['k']}_s{meta['seed']}")
        differences[member.run_id.split(".", 1)[1]] = max_difference(member.model_path, alone / "model.pt")
    print(
        json.dumps(
            {
                "d_in": args.d,
                "n_latents": 4 * args.d,
                "saes": len(members),
                "tokens_per_epoch": members[0].read_meta()["n_train_tokens"],
                "epochs": args.epochs,
                "batch": args.batch,
                "sweep_s": [round(t, 1) for t in sweep_s],
                "six_separate_runs_s": [round(t, 1) for t in separate_s],
                "wall_time_ratio_sweep_over_separate": round(sum(sweep_s) / sum(separate_s), 3),
                "script_sweep_s": round(script_sweep_s, 1),
                "script_six_separate_runs_s": round(script_separate_s, 1),
                "script_wall_time_ratio": round(script_sweep_s / script_separate_s, 3),
                "sweep_stages_round_0": members[0].read_meta()["timing"],
                "max_abs_difference_sweep_vs_alone": differences,
                **machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
