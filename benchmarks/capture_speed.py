"""Capture on a real forward: step 1 against a bare transformers forward stopped after the same layer.

    uv run python benchmarks/capture_speed.py                                   # CPU: random Llama hidden 512, 8 layers
    uv run python benchmarks/capture_speed.py --bielik-shape --device cuda --dtype bfloat16 --batch-tokens 65536
    uv run python benchmarks/capture_speed.py --smollm2          # a real trained Llama: SmolLM2-135M, layer 15 of 30

Both paths get the same documents in the same length-sorted batches (BATCH_SIZE_SAVE documents per forward, or
--batch-tokens padded tokens). Step 1 is the whole step (its stages: tokenise, forward, copy, write; the tokenise stage
works ahead in a thread only where the forward leaves a core free: --prepare-thread also times it forced into one);
the bare loop tokenises, pads, runs the forward stopped after the layer, keeps the real tokens' rows and copies them to
the host, nothing else. Each runs on --small and --large documents; the marginal rate (tokens_large - tokens_small) /
(t_large - t_small) cancels start-up and model loading. Runs are interleaved; the median of --repeats is printed, with
step 1's GPU busy fraction and peak memory (CUDA) from its time report, and the bytes it stores per token.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sae_pipeline.demo import smollm2
from sae_pipeline.demo.tiny_model import BENCHMARK_SHAPES, build_tiny_llama, load_sample_texts
from sae_pipeline.infra.timing import StageClock
from sae_pipeline.lm.data import load_texts
from sae_pipeline.lm.tokens import keep_mask, pad_batch
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.steps import capture
from sae_pipeline.steps.capture import save_activations
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store

REPO = Path(__file__).resolve().parent.parent


class Stop(Exception):
    pass


@contextlib.contextmanager
def forced_prepare_ahead(ahead: bool):
    """Step 1 with its prepare stage in a thread (True) or between forwards (False), whatever the machine."""
    chosen = capture.prepare_ahead
    capture.prepare_ahead = lambda device: ahead
    try:
        yield
    finally:
        capture.prepare_ahead = chosen


def groups(lengths: list[int], batch_size: int, batch_tokens: int | None) -> list[slice]:
    """Consecutive documents of a longest-first list per forward, as step 1 forms them."""
    out, start = [], 0
    while start < len(lengths):
        size = max(1, batch_tokens // lengths[start]) if batch_tokens else batch_size
        out.append(slice(start, start + size))
        start += size
    return out


class Bare:
    """What a hand-written script does: tokenise, pad, forward, stop after the layer, keep masked rows on the host."""

    def __init__(self, model_dir: Path, layer: int, device: torch.device, dtype: torch.dtype, args) -> None:
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
        self.device, self.args, self.seen = device, args, {}
        self.model.model.layers[layer].post_attention_layernorm.register_forward_hook(self._hook)
        self.special = torch.tensor(sorted(set(self.tokenizer.all_special_ids)))

    def _hook(self, module, inputs, output):
        self.seen["x"] = output
        raise Stop

    def __call__(self, texts: list[str], sort_by_length: bool = True) -> int:
        tokens, left = 0, self.tokenizer.padding_side == "left"
        with torch.inference_mode():
            for start in range(0, len(texts), self.args.docs_per_shard):
                encoded = self.tokenizer(
                    [t for t in texts[start : start + self.args.docs_per_shard] if t.strip()],
                    truncation=True,
                    max_length=self.args.max_length,
                )["input_ids"]
                if sort_by_length:
                    encoded.sort(key=len, reverse=True)
                for g in groups([len(e) for e in encoded], self.args.batch_size, self.args.batch_tokens):
                    ids, mask = pad_batch(encoded[g], self.tokenizer.pad_token_id, left)
                    try:
                        self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False)
                    except Stop:
                        pass
                    keep = keep_mask(ids, mask, self.special, False).to(self.device)
                    tokens += self.seen["x"].to(torch.bfloat16)[keep].cpu().shape[0]
        return tokens


def check_rows(bare: Bare, step1, texts: list[str], layer: int, store: Path) -> str:
    """Step 1's stored rows of 8 documents against each document's forward alone (no padding): catches rows that
    land in the wrong place or never arrive (e.g. an asynchronous copy read too early)."""
    n_tokens = step1(64, "check", keep=True)
    run = ActivationRun(Store(store), "check")
    signature = f"llamaforcausallm_model_layers_{layer}_post_attention_layernorm"
    acts, prov = (torch.cat(t) for t in zip(*(run.read_shard(i, signature) for i in sorted(run.completed_shards()))))
    assert acts.shape[0] == n_tokens and torch.isfinite(acts.float()).all(), "missing or unwritten rows"
    worst = 0.0
    with torch.inference_mode():
        for doc in range(0, 64, 8):
            ids = bare.tokenizer(texts[doc], truncation=True, max_length=bare.args.max_length, return_tensors="pt")
            try:
                bare.model(input_ids=ids["input_ids"].to(bare.device), use_cache=False)
            except Stop:
                pass
            rows = prov[:, 0] == doc
            want = bare.seen["x"][0][prov[rows, 1].long().to(bare.device)].float().cpu()
            got = acts[rows].float()
            worst = max(worst, float((got - want).norm() / want.norm()))
    assert worst < 3e-2, f"stored rows differ from the forward alone: relative error {worst:.3g}"
    return f"rows checked against each document alone: relative error at most {worst:.2g} (bf16)"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bielik-shape", action="store_true")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of a random Llama")
    parser.add_argument("--models", type=Path, default=REPO / "store" / "models", help="where SmolLM2 is converted")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--small", type=int, default=256)
    parser.add_argument("--large", type=int, default=768)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batch-tokens", type=int, default=None)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--docs-per-shard", type=int, default=1024)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--file-order", action="store_true", help="also time the bare loop over unsorted batches")
    parser.add_argument(
        "--prepare-thread", action="store_true", help="also time step 1 with its prepare stage forced into a thread"
    )
    parser.add_argument("--model-dir", type=Path, default=None, help="reuse (or build once into) this model folder")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="capture_speed_"))
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    shape = BENCHMARK_SHAPES["bielik-1.5b" if args.bielik_shape else "cpu"]
    sample = [t for t in load_sample_texts() if t.strip()]
    model_dir = smollm2.model_folder(args.models) if args.smollm2 else args.model_dir or tmp / "model"
    if not (model_dir / "config.json").is_file():
        build_tiny_llama(model_dir, sample, **shape, dtype=dtype)
    layer = args.layer if args.layer is not None else LlamaConfig.from_pretrained(model_dir).num_hidden_layers // 2
    data = tmp / "docs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(args.large):
            f.write(json.dumps({"text": sample[i % len(sample)]}, ensure_ascii=False) + "\n")
    bare = Bare(model_dir, layer, device, dtype, args)
    reports = {}

    def step1(limit: int, run_id: str, keep: bool = False, ahead: bool | None = None) -> int:
        settings = CaptureSettings(
            model_id=str(model_dir),
            hf_dataset=str(data),
            store_dir=tmp / "store",
            device=args.device,
            model_dtype=args.dtype,
            data_limit=limit,
            max_length=args.max_length,
            batch_size_save=args.batch_size,
            batch_tokens_save=args.batch_tokens,
            docs_per_shard=args.docs_per_shard,
            layer_num=layer,
            store_dtype="bfloat16",
        )
        if ahead is None:
            summary = save_activations(settings, run_id=run_id)
            reports[limit] = summary
        else:
            with forced_prepare_ahead(ahead):
                summary = save_activations(settings, run_id=run_id)
        if not keep:
            shutil.rmtree(tmp / "store" / "runs" / run_id)
        return summary.n_tokens

    texts = load_texts(str(data), "train", "text", args.large, False, 0)["text"]
    paths = {
        "bare forward, same (length-sorted) batches": lambda limit, rid: bare(texts[:limit]),
        "step 1 (01_save_activations, whole step)": step1,
    }
    if args.prepare_thread:
        paths["step 1, prepare forced into its own thread"] = functools.partial(step1, ahead=True)
    if args.file_order:
        paths["bare forward, batches in file order"] = lambda limit, rid: bare(texts[:limit], sort_by_length=False)
    check = check_rows(bare, step1, texts, layer, tmp / "store")  # also the warm-up
    for fn in paths.values():  # warm-up
        fn(min(64, args.small), "warm")
    rates: dict[str, list[float]] = {name: [] for name in paths}
    for repeat in range(args.repeats):
        for name, fn in paths.items():
            timed = {}
            for limit in (args.small, args.large):
                if device.type == "cuda":
                    torch.cuda.synchronize()
                os.sync()  # no dirty pages of the last run still being written back
                started = time.perf_counter()
                n = fn(limit, f"r{repeat}_{limit}")
                timed[limit] = (n, time.perf_counter() - started)
            (n_small, t_small), (n_large, t_large) = timed[args.small], timed[args.large]
            rates[name].append((n_large - n_small) / (t_large - t_small))
    names = list(paths)
    model_name = "SmolLM2-135M-Instruct" if args.smollm2 else "Bielik-1.5B shape" if args.bielik_shape else "hidden 512"
    base = statistics.median(rates[names[0]])
    batches = f"{args.batch_tokens} tokens" if args.batch_tokens else f"{args.batch_size} docs"
    print(
        f"model {model_name}, layer {layer}, {args.device} "
        f"{args.dtype}, batches of {batches} (max length {args.max_length}), {args.small} vs {args.large} documents, "
        f"torch threads {torch.get_num_threads()}, median of {args.repeats}"
    )
    for name in names:
        med = statistics.median(rates[name])
        each = ", ".join(f"{r / b:.2f}" for r, b in zip(rates[name], rates[names[0]]))
        print(f"  {name:45s} {med:12,.0f} marginal tok/s  ratio vs bare {med / base:5.2f}  (each repeat: {each})")
    summary = reports[args.large]
    prepare = "ahead in a thread" if summary.timing["prepare_ahead"] else "between forwards"
    print(f"  step 1, {args.large} documents, prepare {prepare}: {StageClock.describe(summary.timing)}")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        bare(texts[: args.large])
        print(f"  bare forward peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
    d = LlamaConfig.from_pretrained(model_dir).hidden_size
    print(
        f"bytes on disk per stored token: {summary.bytes_written / summary.n_tokens:.1f} "
        f"(bf16, d_model {d}; budget 2*d+16 = {2 * d + 16}); {check}"
    )
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
