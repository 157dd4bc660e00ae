"""Peak memory of one training step, in dense [batch, n_latents] float32 tensors: the constant behind
``sweep.DENSE_TENSORS_PER_STEP`` (the up-front memory estimate of a sweep).

One ``Trainer`` on the CPU, d_in 512, n_latents 8,192, batch 4,096 (one dense tensor = 128 MiB, far above
everything else a step allocates). A first step on 8 tokens creates Adam's moments; then, with every latent that
did not fire counted as dead (so AuxK runs, the most expensive path), the resident set size is read before a full
step and its peak (``ru_maxrss``) after it. The difference divided by the size of one dense tensor is the count.
Run alone (it measures this process): ``uv run python benchmarks/train_memory.py [--architecture jumprelu]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from sae_pipeline.infra.distributed import Dist
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.sae.sweep import DENSE_TENSORS_PER_STEP, EXTRA_DENSE_TENSORS, SaeSpec
from sae_pipeline.sae.trainer import Trainer
from sae_pipeline.settings import TrainSettings


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d", type=int, default=512)
    p.add_argument("--latents", type=int, default=8192)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--architecture", default="topk")
    args = p.parse_args()
    spec = SaeSpec(LayerSpec("bench", args.d), args.latents // args.d, args.k, args.architecture, 1e-3, 0)
    settings = TrainSettings(device="cpu", batch_size_train=args.batch)
    trainer = Trainer(spec, settings, 100, 1, torch.device("cpu"), Dist(), None)
    x = torch.randn(args.batch, args.d)
    trainer.initialize(x[:1024])
    trainer.step(x[:8])  # Adam's moments exist from here on; every latent that did not fire is now dead
    dead = int((trainer.since_fired >= trainer.window).sum())
    before = rss_bytes()
    trainer.step(x)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    dense = 4 * args.batch * args.latents
    print(
        json.dumps(
            {
                "d_in": args.d,
                "n_latents": args.latents,
                "batch": args.batch,
                "k": args.k,
                "architecture": args.architecture,
                "dead_latents_in_the_step": dead,
                "step_peak_mib": round((peak - before) / (1 << 20), 1),
                "dense_tensors": round((peak - before) / dense, 2),
                "estimate_uses": DENSE_TENSORS_PER_STEP + EXTRA_DENSE_TENSORS.get(args.architecture, 0),
                "torch": torch.__version__,
                "date": time.strftime("%Y-%m-%d"),
            }
        )
    )


if __name__ == "__main__":
    main()
