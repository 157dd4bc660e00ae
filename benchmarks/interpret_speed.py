"""Step 4's speed on the offline demo (SmolLM2-135M-Instruct as explainer and scorer, the demo's settings): latents
per minute of the real script, prompt and generated tokens per second, per torch thread count; then the scorers'
constrained answers against free greedy generation on the same prompts.

    uv run python benchmarks/interpret_speed.py                          # builds the demo's store first (minutes)
    uv run python benchmarks/interpret_speed.py --store demo_store       # a store the demo wrote
    uv run python benchmarks/interpret_speed.py --store demo_store --threads 1,2 --latents 50
    uv run python benchmarks/interpret_speed.py --device cuda --latents 50   # the GPU form (gpu_checks.sh)

Each run removes the SAE's ``interpretation/`` folder and runs ``04_interpret_sae.py`` with the demo's environment
(``sae_pipeline.demo.pipeline``), INTERPRET_LIMIT=--latents and OMP_NUM_THREADS set; the load average before and
after is printed, since other work on a shared machine changes every number here.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sae_pipeline.demo import pipeline  # noqa: E402


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def step4(env: dict[str, str], sae_dir: Path) -> tuple[float, dict]:
    shutil.rmtree(sae_dir / "interpretation", ignore_errors=True)
    started = time.perf_counter()
    subprocess.run([sys.executable, str(REPO / "04_interpret_sae.py")], env=env, cwd=REPO, check=True)
    seconds = time.perf_counter() - started
    return seconds, json.loads((sae_dir / "interpretation" / "summary.json").read_text(encoding="utf-8"))


def report(threads: str, seconds: float, summary: dict, before: str, after: str) -> None:
    (gen,) = summary["generation"].values()
    print(f"OMP_NUM_THREADS={threads}, load average before {before}, after {after}")
    print(
        f"  step 4, {summary['latents']} latents, whole script: {seconds:.1f} s = "
        f"{60 * summary['latents'] / seconds:.1f} latents/min"
    )
    print(
        f"  model: {gen['chats']} chats, {gen['prompt_tokens']} prompt tokens and {gen['generated_tokens']} generated "
        f"in {gen['seconds']} s: {gen['prompt_tokens'] / gen['seconds']:.0f} prompt tokens/s, "
        f"{gen['generated_tokens'] / gen['seconds']:.1f} generated tokens/s"
    )
    for kind, s in summary["scores"].items():
        print(
            f"  {kind}: real mean {s['real']['mean']} median {s['real']['median']} (n {s['real']['n']}); "
            f"control mean {s['control']['mean']} median {s['control']['median']} (n {s['control']['n']})"
        )


def constrained_vs_free(model: str, rows: list[dict], per_prompt: int, language: str, device: str) -> None:
    """The same scoring prompts answered both ways (on a CPU one thread): seconds, and how many free answers parse."""
    from sae_pipeline.interpret import scorers
    from sae_pipeline.interpret.chat import ChatModel
    from sae_pipeline.interpret.examples import Context, LatentExamples

    torch.set_num_threads(1)
    chat = ChatModel.load(model, "SCORER_MODEL", torch.device(device), "float32", 8)
    plans = []
    for row in rows:
        kinds = {k: [Context(**c) for c in row["examples"][k]] for k in ("top", "test", "non_activating")}
        ex = LatentExamples(row["latent"], row["frequency"], **kinds)
        plans += [scorers.plan(k, ex, row["explanation"], per_prompt, language, 0) for k in scorers.SCORERS]
    prompts = [p for plan in plans for p in plan.prompts]
    sizes = [len(b) for plan in plans for b in plan.batches]
    chat.classify(prompts[:2], sizes[:2])  # both prefixes cached before timing
    started = time.perf_counter()
    constrained = chat.classify(prompts, sizes)
    t_constrained = time.perf_counter() - started
    started = time.perf_counter()
    free = chat.answer(prompts, 3 * per_prompt + 8)  # the token budget the free answers had
    t_free = time.perf_counter() - started
    parsed = [scorers.parse_answer(a, n) for a, n in zip(free, sizes)]
    same = sum(p is not None and c == "[" + ",".join(str(int(v)) for v in p) + "]" for p, c in zip(parsed, constrained))
    print(
        f"{len(prompts)} scoring prompts on {device}: constrained {t_constrained:.1f} s, free greedy {t_free:.1f} s "
        f"({t_free / t_constrained:.1f}x); free answers parsed {sum(p is not None for p in parsed)}/{len(prompts)}, "
        f"equal to the constrained answer {same}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", type=Path, help="a demo store (default: run the demo into a temporary folder)")
    parser.add_argument("--latents", type=int, default=50)
    parser.add_argument("--threads", default="1", help="OMP_NUM_THREADS values to run step 4 with, e.g. 1,2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compare-latents", type=int, default=4, help="latents whose prompts are answered both ways")
    args = parser.parse_args()
    store = (args.store or Path(tempfile.mkdtemp()) / "demo_store").resolve()
    env = {**os.environ, **pipeline.prepare("smollm2", store), "INTERPRET_LIMIT": str(args.latents)}
    env["DEVICE"] = args.device
    if args.store is None:
        subprocess.run([sys.executable, "-m", "sae_pipeline.demo"], env=env, cwd=REPO, check=True)
    sae_dir = store / "runs" / (store / "sae_run_id.txt").read_text().strip()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    for threads in args.threads.split(","):
        before = load()
        seconds, summary = step4({**env, "OMP_NUM_THREADS": threads}, sae_dir)
        report(threads, seconds, summary, before, load())
    rows_path = sae_dir / "interpretation" / "latents.jsonl"
    rows = [json.loads(line) for line in rows_path.read_text(encoding="utf-8").splitlines()]
    before = load()
    constrained_vs_free(
        env["MODEL_ID"],
        rows[: args.compare_latents],
        int(env["INTERPRET_EXAMPLES_PER_PROMPT"]),
        env["INTERPRET_LANGUAGE"],
    )
    print(f"  load average before {before}, after {load()}")


if __name__ == "__main__":
    main()
