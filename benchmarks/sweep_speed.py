"""A sweep of 6 SAEs in one pass against the same 6 SAEs trained one after the other, in one run.

Sweep: ``TOP_K=16,32,64 SEED=1,2`` on one layer (d 512, 4x: 2,048 latents), every batch read and shuffled once
and stepped on by all six. Separate: six runs of step 2, one per (k, seed), each with ``DATA_SEED=1`` (the sweep's
data seed, its first SEED), so each must end with exactly the model its sweep member ends with. Both in this
process (``train_sae``), so the separate runs are not charged the ~10 s of imports a fresh ``02_train_sae.py``
pays: the ratio is the conservative one. Reports wall seconds, their ratio, the stage times and the largest
difference between a sweep member's tensors and its separate twin's (0: bit for bit).

Run: ``uv run python benchmarks/sweep_speed.py`` (``--tokens``, ``--epochs`` for a longer run).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from train_speed import machine, synthetic_run

from sae_pipeline.settings import TrainSettings
from sae_pipeline.store import Store, training_runs
from sae_pipeline.train import train_sae

REPO = Path(__file__).resolve().parent.parent


def max_difference(a: Path, b: Path) -> float:
    ta, tb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    pairs = [(ta["sae_state_dict"][k], tb["sae_state_dict"][k]) for k in ta["sae_state_dict"]]
    pairs.append((ta["pipeline_sae"]["b_dec"], tb["pipeline_sae"]["b_dec"]))
    return max(float((x - y).abs().max()) for x, y in pairs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "store" / "bench"))
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--tokens", type=int, default=80_000)
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
    start = time.perf_counter()
    train_sae(TrainSettings(**common, top_k=(16, 32, 64), seed=(1, 2)), run_id, f"sweep_{tag}")
    sweep_s = time.perf_counter() - start
    members = training_runs(store, f"sweep_{tag}")

    separate_s, differences = [], {}
    for member in members:
        values = member.read_meta()
        start = time.perf_counter()
        alone = train_sae(
            TrainSettings(**common, top_k=values["k"], seed=values["seed"], data_seed=1),
            run_id,
            f"alone_{tag}_k{values['k']}_s{values['seed']}",
        )
        separate_s.append(time.perf_counter() - start)
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
                "sweep_s": round(sweep_s, 1),
                "separate_s": [round(s, 1) for s in separate_s],
                "separate_total_s": round(sum(separate_s), 1),
                "wall_time_ratio_sweep_over_separate": round(sweep_s / sum(separate_s), 3),
                "sweep_stages": members[0].read_meta()["timing"],
                "max_abs_difference_sweep_vs_alone": differences,
                **machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
