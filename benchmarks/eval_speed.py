"""Evaluation speed: step 3's clean condition (forward + masked next-token CE) vs a bare full forward.

    uv run python benchmarks/eval_speed.py                       # CPU, random Llama hidden 512, 8 layers
    uv run python benchmarks/eval_speed.py --bielik-shape --device cuda --dtype bfloat16   # GPU check
    uv run python benchmarks/eval_speed.py --append-results      # also append the table to benchmarks/RESULTS.md

Both paths get the same length-sorted, padded batches of the same documents (sae_pipeline.evaluate.make_batches)
and the same model object; they are timed in the same process, interleaved, median of --repeats. "bare" is
``model(input_ids, attention_mask, position_ids)`` with no hook and nothing computed from the logits; "clean" is
``evaluate.downstream(conditions=("clean",))`` with the splice controller registered (idle). The other conditions
(SAE spliced, zero/mean ablation, each with KL from clean) are timed as one 4-condition pass, as step 3 runs them,
and reported per condition. Ratio = tokens/s of the path / tokens/s of bare (target >= 0.8 for clean).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline.demo.tiny_model import build_benchmark_llama, load_sample_texts
from sae_pipeline.lm.loading import load_language_model
from sae_pipeline.lm.splice import make_splice
from sae_pipeline.lm.tokens import token_batches
from sae_pipeline.sae.downstream import CONDITIONS, downstream
from sae_pipeline.sae.model import PipelineSae

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bielik-shape", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--docs", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--append-results", action="store_true")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    model_dir = build_benchmark_llama(tmp / "model", args.bielik_shape)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    lm = load_language_model(str(model_dir), tmp / "store", device, dtype)
    n_layers = lm.model.config.num_hidden_layers
    d = lm.model.config.hidden_size
    sig = f"llamaforcausallm_model_layers_{n_layers // 2}_post_attention_layernorm"
    texts = [t for t in load_sample_texts() if t.strip()]
    texts = (texts * (args.docs // len(texts) + 1))[: args.docs]
    batches = [b.to(device) for b in token_batches(lm.tokenizer, texts, args.max_length, args.batch_size, False)]
    n_tokens = sum(b.n_real for b in batches)
    sae = PipelineSae(8 * d, d, 32).to_device(device)
    engine = sae.sae_engine.eval()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    @torch.inference_mode()
    def bare():
        for b in batches:
            lm.model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False)
        sync()

    def with_splice(conditions):
        splice = make_splice(sig, "output", engine, torch.zeros(d, device=device))
        lm.layers.register_hook(sig, splice)
        try:
            return downstream(lm.model, splice, batches, device, conditions)
        finally:
            lm.layers.unregister_hook(splice.id)

    paths = {"bare": bare, "clean": lambda: with_splice(("clean",)), "all": lambda: with_splice(CONDITIONS)}
    load_before = os.getloadavg()[0]
    for fn in paths.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    per_cond: dict[str, list[float]] = {c: [] for c in CONDITIONS}
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            res = fn()
            times[name].append(time.perf_counter() - t0)
            if name == "all":
                for c, s in res.seconds.items():
                    per_cond[c].append(s)
    bare_rate = n_tokens / statistics.median(times["bare"])
    rows = [
        ("bare full forward (no hook, logits unused)", bare_rate),
        ("step 3 clean condition (idle splice + masked CE)", n_tokens / statistics.median(times["clean"])),
    ]
    rows += [(f"4-condition pass: {c}", n_tokens / statistics.median(per_cond[c])) for c in CONDITIONS]
    rows.append(("4-condition pass, whole (per condition)", 4 * n_tokens / statistics.median(times["all"])))
    shape = (
        "Bielik-1.5B shape (d 1536, 32 layers, vocab 32000)"
        if args.bielik_shape
        else "random Llama d 512, 8 layers, vocab 4000"
    )
    header = (
        f"{shape}, {args.device} {args.dtype}, torch threads {torch.get_num_threads()}, {len(texts)} docs, "
        f"{n_tokens:,} real tokens, batch {args.batch_size}, max length {args.max_length}, SAE {8 * d} "
        f"latents k=32 at {sig}, median of {args.repeats} interleaved runs, "
        f"{platform.processor() or platform.machine()} with {os.cpu_count()} cores, load average "
        f"{load_before:.1f} -> {os.getloadavg()[0]:.1f} (other processes slow both paths alike only when "
        "the load is steady)"
    )
    table = ["| path | tokens/s | vs bare |", "|---|---|---|"]
    table += [f"| {name} | {rate:,.0f} | {rate / bare_rate:.2f} |" for name, rate in rows]
    text = "\n".join([header, "", *table])
    print(text)
    if args.append_results:
        cmd = (
            "uv run python benchmarks/eval_speed.py"
            + (" --bielik-shape" if args.bielik_shape else "")
            + (f" --device {args.device} --dtype {args.dtype}" if args.device != "cpu" else "")
        )
        with RESULTS.open("a", encoding="utf-8") as f:
            f.write(f"\n## Evaluation\n\n`{cmd}` ({time.strftime('%Y-%m-%d')}): {text}\n")


if __name__ == "__main__":
    main()
