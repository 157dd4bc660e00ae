"""Capture overhead: step 1's loop vs a bare transformers forward truncated after the same layer.

    uv run python benchmarks/capture_speed.py                     # CPU, random Llama hidden 512, 8 layers
    uv run python benchmarks/capture_speed.py --bielik-shape --device cuda --dtype bfloat16   # GPU check
    uv run python benchmarks/capture_speed.py --smollm2           # a real trained Llama: SmolLM2-135M, layer 15

Every path gets the same documents, batch size and max length, and is timed in the same process, interleaved, median
of --repeats; the ratio (ours / bare) is what the README quotes. Bytes per stored token are read from a real run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from sae_pipeline import smollm2
from sae_pipeline.capture import Capturer, pad_batch, save_activations
from sae_pipeline.model import load_language_model
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.tiny_model import build_benchmark_llama, load_sample_texts

REPO = Path(__file__).resolve().parent.parent


class Stop(Exception):
    pass


def bare_forward(model, tokenizer, texts, layer, batch_size, max_length, device, sort_by_length):
    """What a hand-written script does: tokenize, pad, forward, stop after the layer, keep masked rows."""
    module = model.model.layers[layer].post_attention_layernorm
    out = {}

    def hook(m, i, o):
        out["x"] = o
        raise Stop

    handle = module.register_forward_hook(hook)
    ids_all = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
    order = sorted(range(len(ids_all)), key=lambda i: -len(ids_all[i])) if sort_by_length else range(len(ids_all))
    order = list(order)
    tokens = 0
    left = tokenizer.padding_side == "left"
    with torch.inference_mode():
        for s in range(0, len(order), batch_size):
            ids, mask = pad_batch([ids_all[i] for i in order[s : s + batch_size]], tokenizer.pad_token_id, left)
            try:
                model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
            except Stop:
                pass
            kept = out["x"][mask.to(device).bool()].cpu()
            tokens += kept.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize()
    handle.remove()
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bielik-shape", action="store_true")
    parser.add_argument("--smollm2", action="store_true", help="SmolLM2-135M-Instruct instead of a random Llama")
    parser.add_argument("--models", type=Path, default=REPO / "store" / "models", help="where SmolLM2 is converted")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--docs", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--layer", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mi-crow", action="store_true", help="also time mi_crow's own save_activations")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp())
    model_dir = (
        smollm2.model_folder(args.models) if args.smollm2 else build_benchmark_llama(tmp / "model", args.bielik_shape)
    )
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    texts = [t for t in load_sample_texts() if t.strip()]
    texts = (texts * (args.docs // len(texts) + 1))[: args.docs]
    n_layers = LlamaConfig.from_pretrained(model_dir).num_hidden_layers
    layer = args.layer if args.layer is not None else n_layers // 2
    sig = f"llamaforcausallm_model_layers_{layer}_post_attention_layernorm"

    settings = CaptureSettings(
        model_id=str(model_dir),
        store_dir=tmp / "store",
        device=args.device,
        hf_dataset="unused",
        max_length=args.max_length,
        batch_size_save=args.batch_size,
        layer_num=layer,
        keep_special_tokens=False,
        store_dtype="bfloat16",
    )
    lm = load_language_model(str(model_dir), tmp / "store", device, dtype)
    capturer = Capturer(lm, sig, settings)
    bare_model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)

    class Quiet:
        n = 0
        format_dict = {"elapsed": 1.0}

        def update(self, n):
            pass

        def set_postfix_str(self, *a, **k):
            pass

    def ours():
        acts, _ = capturer.shard(texts, list(range(len(texts))), Quiet())
        return acts.shape[0]

    paths = {
        "bare forward, same (length-sorted) batches": lambda: bare_forward(
            bare_model, tokenizer, texts, layer, args.batch_size, args.max_length, device, True
        ),
        "bare forward, batches in file order": lambda: bare_forward(
            bare_model, tokenizer, texts, layer, args.batch_size, args.max_length, device, False
        ),
        "ours: Capturer (mi_crow detector, mask on device, early stop)": ours,
    }
    if args.mi_crow:
        plain_lm = load_language_model(str(model_dir), tmp / "mi_crow_store", device, dtype)

        def mi_crow_save():
            plain_lm.activations.save_activations(
                texts, sig, batch_size=args.batch_size, max_length=args.max_length, dtype=torch.bfloat16, autocast=False
            )
            return None

        paths["mi_crow save_activations (writes to disk)"] = mi_crow_save

    times = {name: [] for name in paths}
    tokens = {}
    for fn in paths.values():  # warm-up
        fn()
    for _ in range(args.repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            n = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
            tokens[name] = (
                n if n is not None else tokens.get("ours: Capturer (mi_crow detector, mask on device, early stop)")
            )
    model_name = "SmolLM2-135M-Instruct" if args.smollm2 else "Bielik-1.5B shape" if args.bielik_shape else "hidden 512"
    real = tokens["ours: Capturer (mi_crow detector, mask on device, early stop)"]
    base = statistics.median(times["bare forward, same (length-sorted) batches"])
    print(
        f"model {model_name}, layer {layer}, {args.device} "
        f"{args.dtype}, {len(texts)} docs, batch {args.batch_size} x max {args.max_length}, {real:,} real tokens "
        f"(special tokens excluded), torch threads {torch.get_num_threads()}"
    )
    for name in paths:
        med = statistics.median(times[name])
        print(f"  {name:62s} {med:8.3f} s  {real / med:10,.0f} real tok/s  ratio vs bare {base / med:5.2f}")

    run_settings = settings.model_copy(
        update={
            "hf_dataset": str(REPO / "data" / "polish_sample.jsonl"),
            "data_limit": 400,
        }
    )
    summary = save_activations(run_settings, run_id="bytes")
    d = lm.model.config.hidden_size
    per_token = summary.bytes_written / summary.n_tokens
    print(f"bytes on disk per stored token: {per_token:.1f} (bf16, d_model {d}; budget 2*d+16 = {2 * d + 16})")


if __name__ == "__main__":
    main()
