"""Speed of step 2's loader alone against a plain ``read()`` of the same shard files (from the page cache).

The loader (``TokenLoader.iter_epoch``) reads every shard file of an epoch, permutes each shuffle group's tokens and
cuts them into batches; the plain read only reads the same files' bytes. Both run over the same files, interleaved,
after one warm-up pass that puts the files in the page cache; the ratio is plain-read time / loader time for one
epoch (target >= 0.9). With ``--device cuda`` the loader also moves the batches to the GPU (pinned groups, large
copies on a side stream) and the batch count is synchronised at the end.

Run: ``uv run python benchmarks/loader_speed.py`` (d 1536, 240k tokens in bf16 shards of 20k: 700 MiB;
``--buffer`` sets SHUFFLE_BUFFER_TOKENS).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from train_speed import LAYER, machine, synthetic_run

from sae_pipeline.sae.loader import TokenLoader
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store

REPO = Path(__file__).resolve().parent.parent


def plain_read(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            fh.read()
    return time.perf_counter() - start


def loader_epoch(loader: TokenLoader, epoch: int, device: torch.device | None) -> float:
    start = time.perf_counter()
    last = None
    for batch in loader.iter_epoch(epoch, device=device):
        last = batch
    if device is not None and device.type == "cuda":
        last.sum().item()  # every copy has landed
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "store" / "bench"))
    p.add_argument("--d", type=int, default=1536)
    p.add_argument("--tokens", type=int, default=240_000)
    p.add_argument("--shard-tokens", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--buffer", type=int, default=80_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None)
    args = p.parse_args()
    store = Store(Path(args.store))
    run = ActivationRun(store, synthetic_run(store, args.d, args.tokens, args.shard_tokens))
    device = torch.device(args.device) if args.device else None
    loader = TokenLoader(
        run, LAYER, args.d, args.batch, 0.05, 0, args.buffer, pin_memory=device is not None and device.type == "cuda"
    )
    files = [run.shard_dir(i) / LAYER / "activations.safetensors" for i in sorted(run.completed_shards())]
    plain_read(files)  # warm the page cache
    loader_epoch(loader, 0, device)
    plain, ours = [], []
    for r in range(args.repeats):
        plain.append(plain_read(files))
        ours.append(loader_epoch(loader, r + 1, device))
    n_bytes = sum(f.stat().st_size for f in files)
    t_plain, t_ours = statistics.median(plain), statistics.median(ours)
    print(
        json.dumps(
            {
                "d": args.d,
                "tokens_in_files": sum(s.n_tokens for s in loader.shards),
                "train_tokens_per_epoch": loader.n_train,
                "file_mib": round(n_bytes / (1 << 20)),
                "batch": args.batch,
                "buffer_tokens": args.buffer,
                "device": str(device or "cpu (batches stay on the host)"),
                "plain_read_s": [round(t, 3) for t in plain],
                "loader_s": [round(t, 3) for t in ours],
                "plain_read_tokens_per_s": round(sum(s.n_tokens for s in loader.shards) / t_plain),
                "loader_train_tokens_per_s": round(loader.n_train / t_ours),
                "ratio_plain_time_over_loader_time": round(t_plain / t_ours, 3),
                **machine(),
            }
        )
    )


if __name__ == "__main__":
    main()
