"""Do step 1's stages overlap? Step 1 against a bare serial loop, with the forward made nearly free.

    uv run python benchmarks/capture_overlap.py

A CPU stand-in for a GPU node, where the forward is fast and everything around it must keep up: a random one-layer
Llama with hidden 1536, hooked at its embedding (``llamaforcausallm_model_embed_tokens``), bf16 storage, batch 64,
torch on one thread so that the second core is free for the stages beside the forward. Both paths get the same
documents in the same length-sorted batches; the bare loop does only the irreducible work, one step after the other:
tokenise, forward, keep real tokens, cast, one raw write per shard. Each path runs on --small and --large documents;
the marginal rate (tokens_large - tokens_small) / (t_large - t_small) cancels start-up. Runs are interleaved, each
after an os.sync(). Printed: the ratio (step 1 / bare) from each path's fastest run of each size (robust to other
load on a shared machine), and the median of the ratios of each repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts
from sae_pipeline.lm.data import load_texts
from sae_pipeline.lm.tokens import keep_mask, pad_batch
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.steps.capture import save_activations

SIGNATURE = "llamaforcausallm_model_embed_tokens"
BATCH, MAX_LENGTH, DOCS_PER_SHARD = 64, 128, 1024


class Stop(Exception):
    pass


def bare_serial(model_dir: Path, data: Path, limit: int, out_dir: Path) -> int:
    """Tokenise, forward (stopped after the embedding), keep real tokens, cast, one raw write per shard."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    seen = {}

    def hook(module, inputs, output):
        seen["x"] = output
        raise Stop

    model.model.embed_tokens.register_forward_hook(hook)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)))
    texts = load_texts(str(data), "train", "text", limit, False, 0)["text"]
    out_dir.mkdir(parents=True)
    tokens = 0
    with torch.inference_mode():
        for shard, start in enumerate(range(0, len(texts), DOCS_PER_SHARD)):
            docs = [t for t in texts[start : start + DOCS_PER_SHARD] if t.strip()]
            encoded = tokenizer(docs, truncation=True, max_length=MAX_LENGTH)["input_ids"]
            encoded.sort(key=len, reverse=True)
            kept = []
            for b in range(0, len(encoded), BATCH):
                ids, mask = pad_batch(encoded[b : b + BATCH], tokenizer.pad_token_id, tokenizer.padding_side == "left")
                try:
                    model(input_ids=ids, attention_mask=mask, use_cache=False)
                except Stop:
                    pass
                rows = keep_mask(ids, mask, special, False).flatten().nonzero().squeeze(1)
                kept.append(seen["x"].to(torch.bfloat16).flatten(0, 1).index_select(0, rows))  # the fastest way here
            acts = torch.cat(kept)
            with open(out_dir / f"shard_{shard}.raw", "wb") as f:
                f.write(memoryview(acts.view(torch.uint8).numpy()))
            tokens += acts.shape[0]
    return tokens


def step1(model_dir: Path, data: Path, limit: int, store: Path) -> int:
    settings = CaptureSettings(
        model_id=str(model_dir),
        hf_dataset=str(data),
        store_dir=store,
        device="cpu",
        data_limit=limit,
        max_length=MAX_LENGTH,
        batch_size_save=BATCH,
        docs_per_shard=DOCS_PER_SHARD,
        layer_signature=SIGNATURE,
        store_dtype="bfloat16",
    )
    return save_activations(settings, run_id="overlap").n_tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--small", type=int, default=1500)
    parser.add_argument("--large", type=int, default=4500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: a core is free for the stages)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="capture_overlap_"))
    texts = [t for t in load_sample_texts() if t.strip()]
    model_dir = build_tiny_llama(
        tmp / "model", texts, hidden_size=1536, num_layers=1, num_heads=12, num_kv_heads=2, intermediate_size=4096
    )
    data = tmp / "docs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(args.large):
            f.write(json.dumps({"text": texts[i % len(texts)]}, ensure_ascii=False) + "\n")
    paths = {"bare serial loop": bare_serial, "step 1": step1}

    runs: dict[tuple[str, int], list[tuple[int, float]]] = {(p, n): [] for p in paths for n in (args.small, args.large)}
    step1(model_dir, data, 200, tmp / "warm")  # warm-up: first imports, first allocations
    for repeat in range(args.repeats):
        for limit in (args.small, args.large):
            for name, fn in paths.items():
                out = tmp / f"{name.replace(' ', '_')}_{limit}_{repeat}"
                os.sync()  # each run starts with no dirty pages of the last one still being written back
                started = time.perf_counter()
                n = fn(model_dir, data, limit, out)
                runs[name, limit].append((n, time.perf_counter() - started))
                shutil.rmtree(out)
        print(f"repeat {repeat}: " + ", ".join(f"{p} {n}: {runs[p, n][-1][1]:.2f} s" for p, n in runs), flush=True)

    def marginal(name: str, pick) -> float:
        (n_small, t_small), (n_large, t_large) = pick(runs[name, args.small]), pick(runs[name, args.large])
        return (n_large - n_small) / (t_large - t_small)

    per_repeat = [
        marginal("step 1", lambda r, i=i: r[i]) / marginal("bare serial loop", lambda r, i=i: r[i])
        for i in range(args.repeats)
    ]
    fastest = {name: marginal(name, lambda r: min(r, key=lambda x: x[1])) for name in paths}
    print(
        f"hidden 1536, hook {SIGNATURE}, bf16, batch {BATCH} x max {MAX_LENGTH}, {DOCS_PER_SHARD} docs per shard, "
        f"{args.small} vs {args.large} documents, torch threads {torch.get_num_threads()}, {args.repeats} repeats"
    )
    print(
        f"  fastest runs: step 1 {fastest['step 1']:,.0f} marginal tok/s, bare serial loop "
        f"{fastest['bare serial loop']:,.0f}: ratio {fastest['step 1'] / fastest['bare serial loop']:.2f}"
    )
    print(
        f"  per repeat: ratio median {statistics.median(per_repeat):.2f} "
        f"(each: {', '.join(f'{r:.2f}' for r in per_repeat)}); target >= 1.5"
    )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
