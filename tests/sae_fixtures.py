"""Synthetic activation runs in the real on-disk format (ActivationRun.write_shard + write_meta) for SAE tests.

Tokens are sparse sums of hidden unit directions plus a per-dimension offset and a little noise, so an SAE has a
real structure to find and FVU falls well below 1 when training works.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_pipeline.store import ActivationRun, Store

LAYER = "llamaforcausallm_model_layers_1_post_attention_layernorm"


def synthetic_tokens(n: int, d: int, seed: int = 0, n_features: int = 96, active: int = 4) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    feats = torch.randn(n_features, d, generator=gen)
    feats /= feats.norm(dim=1, keepdim=True)
    offset = torch.randn(d, generator=torch.Generator().manual_seed(1234)) * 2
    idx = torch.stack([torch.randperm(n_features, generator=gen)[:active] for _ in range(n)])
    coef = torch.rand(n, active, generator=gen) * 3 + 0.5
    x = (coef[..., None] * feats[idx]).sum(1) + offset + 0.05 * torch.randn(n, d, generator=gen)
    return x


def make_run(
    store_dir: Path,
    run_id: str = "acts",
    shard_sizes=(700, 500, 900, 400),
    d: int = 32,
    dtype: torch.dtype = torch.float32,
    tokens: torch.Tensor | None = None,
    seed: int = 0,
    write_pointer: bool = True,
) -> ActivationRun:
    """A complete activation run; ``tokens`` (default synthetic) is split into shards of ``shard_sizes``."""
    store = Store(Path(store_dir))
    run = ActivationRun(store, run_id)
    run.dir.mkdir(parents=True, exist_ok=True)
    total = sum(shard_sizes)
    if tokens is None:
        tokens = synthetic_tokens(total, d, seed)
    assert tokens.shape == (total, d)
    start = 0
    for i, n in enumerate(shard_sizes):
        acts = tokens[start : start + n].to(dtype)
        prov = torch.stack([torch.arange(start, start + n) // 16, torch.arange(n) % 16, torch.full((n,), 7)], dim=1).to(
            torch.int32
        )
        run.write_shard(i, LAYER, acts, prov, {"n_tokens": n, "n_documents": n // 16 + 1})
        start += n
    run.write_meta(
        {
            "kind": "activations",
            "status": "complete",
            "run_id": run_id,
            "model_id": "tiny/test-model",
            "layer_signature": LAYER,
            "hook_side": "output",
            "d_model": d,
            "store_dtype": str(dtype).removeprefix("torch."),
            "n_tokens": total,
            "n_shards": len(shard_sizes),
            "n_documents": total // 16,
            "dataset": {"name": "synthetic"},
            "max_length": 16,
            "seed": seed,
            "versions": {},
            "layer_num": 1,
        }
    )
    if write_pointer:
        store.write_pointer(run_id)
    return run
