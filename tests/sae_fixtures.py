"""Synthetic activation runs in the real on-disk format (ActivationRun.write_shard + write_meta) for SAE tests.

Tokens are sparse sums of hidden unit directions plus a per-dimension offset and a little noise, so an SAE has a
real structure to find and FVU falls well below 1 when training works. A run may hold several layers (``layers``);
``write_shard`` writes one layer per shard, so the others' files are added to the same shard folder in the shard
format (``batch_<i>/<signature>/activations.safetensors``) until the store writes several layers itself.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_pipeline.lm.layers import LayerSpec, block_index
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store

LAYER = "llamaforcausallm_model_layers_1_post_attention_layernorm"
LAYER3 = "llamaforcausallm_model_layers_3_post_attention_layernorm"
RUN_FOLDER = ["history.json", "meta.json", "model.pt", "saelens", "training_curves.png"]  # a finished SAE's folder


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
    layers: tuple[str, ...] = (LAYER,),
    token_ids: torch.Tensor | None = None,
) -> ActivationRun:
    """A complete activation run written by the store's own manifest builder and shard writer; ``tokens`` (default
    synthetic) is split into shards of ``shard_sizes``, 16 tokens per document; ``token_ids`` (default all 7) are
    the provenance's token ids."""
    store = Store(Path(store_dir))
    run = ActivationRun(store, run_id)
    total = sum(shard_sizes)
    if tokens is None:
        tokens = synthetic_tokens(total, d, seed)
    assert tokens.shape == (total, d)
    docs_per_shard = max(shard_sizes) // 16 + 1
    settings = CaptureSettings(
        model_id="tiny/test-model",
        hf_dataset="synthetic",
        store_dir=store.root,
        max_length=16,
        docs_per_shard=docs_per_shard,
        data_limit=docs_per_shard * len(shard_sizes),
        store_dtype=str(dtype).removeprefix("torch."),
        seed=seed,
    )
    specs = [
        LayerSpec(sig, d, f"model.layers.{block_index(sig)}.post_attention_layernorm", block_index(sig))
        for sig in layers
    ]
    run.write_meta(
        ActivationRun.new_manifest(
            settings,
            run_id,
            specs,
            model_dtype="float32",
            n_documents=settings.data_limit,
            n_layers=4,
            special_token_ids=[0, 1, 2],
            prepend_bos=True,
        )
    )
    start = 0
    for i, n in enumerate(shard_sizes):
        acts = tokens[start : start + n].to(dtype)
        doc = i * docs_per_shard + torch.arange(n) // 16
        ids = torch.full((n,), 7) if token_ids is None else token_ids[start : start + n]
        prov = torch.stack([doc, torch.arange(n) % 16, ids], dim=1).to(torch.int32)
        info = {
            "index": i,
            "doc_start": i * docs_per_shard,
            "doc_stop": (i + 1) * docs_per_shard,
            "n_tokens": n,
            "n_empty": 0,
        }
        per_layer = {layers[0]: acts}
        for j, sig in enumerate(layers[1:], 1):  # another layer: other tokens of the same shape
            per_layer[sig] = synthetic_tokens(n, d, seed + 100 * j + i).to(dtype)
        run.write_shard(i, per_layer, prov, info)
        start += n
    assert run.finalize_if_complete() is not None
    return run
