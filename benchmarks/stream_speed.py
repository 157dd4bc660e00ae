"""Streaming (STREAM=1) against capture then training in series: tokens trained per second, and the forward's share.

    uv run python benchmarks/stream_speed.py [--epochs 1,2] [--docs 384] [--repeats 3]
    uv run python benchmarks/stream_speed.py --device cuda --bielik-shape --layer 16 --docs 8192   # the GPU form

Random Llama hidden 512, 8 layers (the CPU benchmark shape; --bielik-shape: Bielik-1.5B's), layer 4 (--layer), one
TopK SAE (k 32, 4x); the real steps 1, 2
and 2-with-STREAM=1 called in this process (model loading included, imports not), interleaved, median of --repeats.
Cached = step 1's wall time + step 2's; streamed = one step 2 that forwards every epoch. Both train on the same
tokens in the same order (SHUFFLE_BUFFER_TOKENS = STREAM_BUFFER_TOKENS), so the script also checks that their SAEs
are equal. The forward's share is the streamed run's forward seconds (meta.json "streamed".forward_s) over its wall
time. Prints one JSON line per epochs value.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sae_pipeline.demo.tiny_model import build_benchmark_llama, load_sample_texts
from sae_pipeline.settings import CaptureSettings, StreamSettings, TrainSettings
from sae_pipeline.steps.capture import save_activations
from sae_pipeline.steps.stream import stream_sae
from sae_pipeline.steps.train import train_sae

BUFFER = 65_536


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", default="1,2")
    parser.add_argument("--docs", type=int, default=384)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layer", default="4")
    parser.add_argument("--bielik-shape", action="store_true")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="stream_speed_"))
    sample = [t for t in load_sample_texts() if t.strip()]
    model_dir = build_benchmark_llama(tmp / "model", args.bielik_shape)
    data = tmp / "docs.jsonl"
    with data.open("w", encoding="utf-8") as f:
        for i in range(args.docs):
            f.write(json.dumps({"text": sample[i % len(sample)]}, ensure_ascii=False) + "\n")
    capture = dict(
        model_id=str(model_dir),
        hf_dataset=str(data),
        data_limit=args.docs,
        max_length=128,
        batch_size_save=16,
        docs_per_shard=64,
        layer_num=args.layer,
        device=args.device,
    )
    batch = 1024 if args.device == "cpu" else 4096
    train = dict(top_k="32", n_latents_multiplier=4, batch_size_train=batch, device=args.device, log_every_steps=1000)
    for epochs in (int(e) for e in args.epochs.split(",")):
        runs = {"cached": [], "streamed": [], "forward_share": []}
        for r in range(args.repeats):
            store = tmp / f"e{epochs}r{r}"
            started = time.perf_counter()
            save_activations(CaptureSettings(store_dir=store / "c", **capture), run_id="acts")
            settings = TrainSettings(store_dir=store / "c", epochs=epochs, shuffle_buffer_tokens=BUFFER, **train)
            cached = train_sae(settings, None, "sae")
            runs["cached"].append(time.perf_counter() - started)
            started = time.perf_counter()
            values = {**capture, **train, "epochs": epochs, "stream": True, "stream_buffer_tokens": BUFFER}
            streamed = stream_sae(StreamSettings(store_dir=store / "s", **values), "sae")
            runs["streamed"].append(time.perf_counter() - started)
            meta = json.loads((streamed / "meta.json").read_text())
            runs["forward_share"].append(meta["streamed"]["forward_s"] / runs["streamed"][-1])
            a, b = (torch.load(p / "model.pt", weights_only=True)["sae_state_dict"] for p in (cached, streamed))
            if args.device == "cpu":  # on a GPU kernels may differ from run to run
                assert all(torch.equal(a[k], b[k]) for k in a), "the streamed SAE differs from the cached one"
        tokens = meta["tokens_trained"]
        median = {k: statistics.median(v) for k, v in runs.items()}
        print(
            json.dumps(
                {
                    "epochs": epochs,
                    "tokens_trained": tokens,
                    "cached_tokens_per_s": round(tokens / median["cached"]),
                    "streamed_tokens_per_s": round(tokens / median["streamed"]),
                    "streamed_over_cached": round(median["cached"] / median["streamed"], 3),
                    "forward_share_of_streamed": round(median["forward_share"], 3),
                    "runs_s": {k: [round(x, 2) for x in v] for k, v in runs.items() if k != "forward_share"},
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
