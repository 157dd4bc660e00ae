"""TopK, BatchTopK, Matryoshka BatchTopK and JumpReLU on a real trained Llama: SmolLM2-135M-Instruct, one layer, the
same width, token budget and target L0 (TOP_K=32, JumpReLU's L0 target), two seeds each, as one sweep.

Runs the real scripts as a user would (steps 1-3), with the capture settings of ``smollm2_frontier.py`` (the demo's
text, block 15's post_attention_layernorm, expansion 4) and a smaller batch so that the ~36k tokens give every SAE a
few hundred steps (JumpReLU needs them to reach its L0 target, docs/architectures.md). Prints the members' and the
seed groups' numbers as RESULTS.md tables, first-letter absorption included (EVAL_ABSORPTION=1, its default 2,000
words).

    uv run python benchmarks/smollm2_architectures.py --store /tmp/smollm2_architectures
    uv run python benchmarks/smollm2_architectures.py --store /tmp/smollm2_architectures --frontier --steps 2,3

``--frontier`` trains the four over TOP_K 16, 32 and 64 (seed 1) on the same activation run, for the sweep's
frontier.png with all four curves. ``--layer 6 --seeds 1`` captures and trains at block 6 instead, where SmolLM2
still represents first letters linearly enough for the absorption score (at block 15 fewer than 20 letters' probes
reach F1 0.6, so the score is null there):

    uv run python benchmarks/smollm2_architectures.py --store /tmp/smollm2_architectures --layer 6 --seeds 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.smollm2_frontier import RUN_ID, SETTINGS  # noqa: E402
from sae_pipeline.demo import smollm2  # noqa: E402
from sae_pipeline.demo.pipeline import CORPUS_FILE, write_corpus  # noqa: E402

SWEEP_ID = "smollm2_architectures"
FRONTIER = {"TOP_K": "16,32,64", "SEED": "1"}  # --frontier
SWEEP = {  # step 2 only
    "TOP_K": "32",
    "SEED": "1,2",
    "SAE_ARCHITECTURE": "topk,batchtopk,matryoshka_batchtopk,jumprelu",
    "EPOCHS": "3",
    "BATCH_SIZE_TRAIN": "256",
}
EVAL = {"EVAL_LIMIT": "40", "BROWSER_LATENTS": "4", "EVAL_ABSORPTION": "1"}  # step 3 only


def steps(run_id: str, sweep_id: str) -> dict[int, tuple[str, ...]]:
    return {
        1: ("01_save_activations.py", "--run_id", run_id),
        2: ("02_train_sae.py", "--sae_run_id", sweep_id),
        3: ("03_evaluate_sae.py", "--sae_run_id", sweep_id),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=REPO / "store" / "smollm2_architectures")
    p.add_argument("--steps", default="1,2,3", help="which steps to run (default: all three)")
    p.add_argument("--frontier", action="store_true", help="TOP_K 16,32,64 with one seed, as its own sweep")
    p.add_argument("--layer", type=int, default=15, help="LAYER_NUM (default 15, the frontier benchmark's run)")
    p.add_argument("--seeds", default="1,2", help="SEED of the sweep (default 1,2)")
    args = p.parse_args()
    sweep_id, sweep = (SWEEP_ID + "_frontier", SWEEP | FRONTIER) if args.frontier else (SWEEP_ID, SWEEP)
    sweep = sweep | ({} if args.frontier else {"SEED": args.seeds})
    run_id = RUN_ID if args.layer == 15 else f"smollm2_l{args.layer}"
    sweep_id += "" if args.layer == 15 else f"_l{args.layer}"
    store = args.store.resolve()
    env = {
        **os.environ,
        **SETTINGS,
        "LAYER_NUM": str(args.layer),
        "MODEL_ID": str(smollm2.model_folder(store)),
        "HF_DATASET": str(write_corpus(store / CORPUS_FILE)),
        "STORE_DIR": str(store),
        "RUN_ID": run_id,
    }
    print(
        f"# {platform.machine()}, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}: "
        + " ".join(f"{k}={v}" for k, v in (SETTINGS | {"LAYER_NUM": args.layer} | sweep | EVAL).items()),
        flush=True,
    )
    for step in map(int, args.steps.split(",")):
        start = time.perf_counter()
        step_env = env | (sweep if step == 2 else EVAL if step == 3 else {})
        script, *script_args = steps(run_id, sweep_id)[step]
        subprocess.run([sys.executable, str(REPO / script), *script_args], cwd=REPO, env=step_env, check=True)
        print(f"# step {step}: {time.perf_counter() - start:.0f} s", flush=True)
    if "3" in args.steps:
        report(store, sweep_id)


def report(store: Path, sweep_id: str) -> None:
    sweep = json.loads((store / "runs" / sweep_id / "evaluation" / "sweep.json").read_text(encoding="utf-8"))
    print("\n| member | L0 | FVU | CE-loss recovered | KL | absorption | never fired | dead |\n" + "|---" * 8 + "|")
    for m in sweep["members"]:
        meta = json.loads((store / "runs" / m["sae_run_id"] / "meta.json").read_text(encoding="utf-8"))
        dead = meta["final_metrics"]["holdout"]["dead_fraction"]
        rec = "n/a" if m["ce_loss_recovered"] is None else f"{m['ce_loss_recovered']:.4f}"
        print(
            f"| {m['architecture']}, seed {m['seed']} | {m['l0']:.1f} | {m['fvu']:.4f} | {rec} | {m['kl']:.4f} | "
            f"{cell(m.get('absorption'))} | "
            f"{m['never_fired_fraction']:.1%} | {dead:.1%} |"
        )
    print(
        "\n| architecture | seeds | L0 | FVU (mean ± std) | CE-loss recovered | KL | absorption |\n" + "|---" * 7 + "|"
    )
    for g in sweep["groups"]:
        keys = ("fvu", "ce_loss_recovered", "kl", "absorption")
        cells = [f"{cell(g[key]['mean'])} ± {cell(g[key]['std'])}" for key in keys]
        print(f"| {g['architecture']} | {g['n_seeds']} | {g['l0']['mean']:.1f} | " + " | ".join(cells) + " |")
    print(f"# timing: {sweep['timing']}")


def cell(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    main()
