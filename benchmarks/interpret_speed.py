"""Step 4's speed on SmolLM2: latents per minute of the real script, generated tokens per second, and the CPU path
(each chat after its cached shared prefix) against plain batched ``generate`` on the same scoring prompts.

    uv run python benchmarks/interpret_speed.py --latents 6                    # CPU; builds a small SmolLM2 run
    uv run python benchmarks/interpret_speed.py --store /tmp/s --sae-run sae   # an existing store
    uv run python benchmarks/interpret_speed.py --device cuda --latents 50     # the GPU form (gpu_checks.sh)

The script's settings are the documented defaults but ``--latents``; the explainer and scorer are SmolLM2-135M
-Instruct. The ratio part times ``ChatModel.answer`` both ways in one process, interleaved, on the detection and
fuzzing prompts of the first latents' rows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sae_pipeline.demo import smollm2  # noqa: E402
from tests.helpers import pipeline_env  # noqa: E402


def build_store(model: Path, store: Path) -> dict[str, str]:
    env = pipeline_env(model, store, DATA_LIMIT="240", MAX_LENGTH="48", LAYER_NUM="15", N_LATENTS_MULTIPLIER="4")
    env |= {"TOP_K": "32", "EPOCHS": "4", "BATCH_SIZE_TRAIN": "512", "DOCS_PER_SHARD": "120"}
    for script, args in (
        ("01_save_activations.py", ["--run_id", "acts"]),
        ("02_train_sae.py", ["--sae_run_id", "sae"]),
    ):
        subprocess.run([sys.executable, str(REPO / script), *args], env=env, cwd=REPO, check=True, capture_output=True)
    return env


def step4(env: dict[str, str], sae_run: str) -> tuple[float, dict]:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, str(REPO / "04_interpret_sae.py"), "--sae_run_id", sae_run], env=env, cwd=REPO, check=True
    )
    seconds = time.perf_counter() - started
    folder = Path(env["STORE_DIR"]) / "runs" / sae_run / "interpretation"
    return seconds, json.loads((folder / "summary.json").read_text(encoding="utf-8"))


def prefix_ratio(model: Path, rows: list[dict], device: str, repeats: int = 2) -> dict[str, float]:
    """Seconds of the same scoring prompts through the cached-prefix path and through batches of 8."""
    from sae_pipeline.interpret import scorers
    from sae_pipeline.interpret.chat import ChatModel
    from sae_pipeline.interpret.examples import Context, LatentExamples

    def examples(row):
        kinds = {k: [Context(**c) for c in row["examples"][k]] for k in ("top", "test", "non_activating")}
        return LatentExamples(row["latent"], row["frequency"], **kinds)

    chats = [
        p
        for row in rows
        for kind in scorers.SCORERS
        for p in scorers.plan(kind, examples(row), row["explanation"], 5, "Polish", 0).prompts
    ]
    chat = ChatModel.load(str(model), "EXPLAINER_MODEL", torch.device(device), "float32", 8)
    times: dict[str, list[float]] = {"cached prefix": [], "batches of 8": []}
    for _ in range(repeats):
        for name in times:
            chat._prefixes.clear()
            started = time.perf_counter()
            if name == "cached prefix":
                for c in chats:
                    chat._answer_after_prefix(c, 23)
            else:
                for i in range(0, len(chats), 8):
                    chat._answer_batch(chats[i : i + 8], 23)
            times[name].append(time.perf_counter() - started)
    return {name: min(t) for name, t in times.items()} | {"prompts": len(chats)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--latents", type=int, default=6)
    parser.add_argument("--store", type=Path)
    parser.add_argument("--sae-run", default="sae")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    model = smollm2.model_folder(Path(tempfile.gettempdir()) / "sae_bench_models")
    store = args.store or Path(tempfile.mkdtemp()) / "store"
    env = build_store(model, store) if args.store is None else pipeline_env(model, store)
    env |= {"INTERPRET_LIMIT": str(args.latents), "DEVICE": args.device, "OMP_NUM_THREADS": str(os.cpu_count())}
    seconds, summary = step4(env, args.sae_run)
    gen = summary["generation"][str(model)]
    rows_path = store / "runs" / args.sae_run / "interpretation" / "latents.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines()]
    ratio = prefix_ratio(model, rows[:1], args.device, repeats=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(
        f"step 4, {summary['latents']} latents, whole script: {seconds:.1f} s = "
        f"{60 * summary['latents'] / seconds:.2f} latents/min"
    )
    print(
        f"generation: {gen['chats']} chats, {gen['generated_tokens']} tokens in {gen['seconds']} s = "
        f"{gen['generated_tokens'] / gen['seconds']:.1f} generated tokens/s"
    )
    for kind, s in summary["scores"].items():
        print(
            f"{kind}: real mean {s['real']['mean']} median {s['real']['median']} (n {s['real']['n']}); "
            f"control mean {s['control']['mean']} median {s['control']['median']} (n {s['control']['n']})"
        )
    base = ratio["batches of 8"]
    print(
        f"{ratio['prompts']} scoring prompts: cached prefix {ratio['cached prefix']:.1f} s, batches of 8 "
        f"{base:.1f} s; speed-up {base / ratio['cached prefix']:.2f}x"
    )


if __name__ == "__main__":
    main()
