"""Speed of step 2's trainer against a bare PyTorch TopK SAE loop on in-memory tensors of the same shape.

Ours: ``train_sae`` as step 2 runs it, reading the activation run's shards from disk through the shuffled loader,
with AuxK bookkeeping, metrics, checkpoints and the progress bar; tokens/s of its training loop (meta.json's
``elapsed_s`` covers the loop only, not the held-out evaluation and exports). Bare: the same model maths
(b_dec, TopK, dense decode, FVU loss, Adam, decoder renormalisation) on a random permutation of an in-memory
float32 tensor, nothing else. The ratio ours/bare is the overhead of everything the pipeline adds (target >= 0.8).

Run: ``uv run python benchmarks/train_speed.py`` (default: a synthetic run of d=384, 200k tokens in bf16 shards;
``--run minilm_l3 --store store/bench`` reuses train_quality.py's activations). ``--architectures
topk,batchtopk,matryoshka_batchtopk,jumprelu`` trains one SAE of each in turn, each against the same bare TopK loop.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.sae.loader import TokenLoader
from sae_pipeline.sae.metrics import fvu
from sae_pipeline.settings import CaptureSettings, TrainSettings
from sae_pipeline.steps.train import train_sae
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store

REPO = Path(__file__).resolve().parent.parent

LAYER = "synthetic_layer"


def synthetic_run(store: Store, d: int, n_tokens: int, shard_tokens: int = 25_000) -> str:
    """A complete bf16 activation run of random tokens (a random offset per dimension), written by the store's own
    manifest builder and shard writer; reused when it exists."""
    run_id = f"speed_d{d}_n{n_tokens}"
    run = ActivationRun(store, run_id)
    if run.status() == "complete":
        return run_id
    n_shards = -(-n_tokens // shard_tokens)
    settings = CaptureSettings(store_dir=store.root, model_id="synthetic", hf_dataset="synthetic", docs_per_shard=1)
    layer = LayerSpec(LAYER, d, None, None)
    manifest = ActivationRun.new_manifest(
        settings,
        run_id,
        [layer],
        model_dtype="float32",
        n_documents=n_shards,
        n_layers=None,
        special_token_ids=[],
        prepend_bos=False,
    )
    run.write_meta({**manifest, "n_shards": n_shards})
    gen = torch.Generator().manual_seed(0)
    offset = torch.randn(d, generator=gen)
    for i, start in enumerate(range(0, n_tokens, shard_tokens)):
        n = min(shard_tokens, n_tokens - start)
        acts = (torch.randn(n, d, generator=gen) + offset).to(torch.bfloat16)
        info = {"index": i, "doc_start": i, "doc_stop": i + 1, "n_tokens": n, "n_empty": 0}
        run.write_shard(i, {LAYER: acts}, torch.zeros(n, 3, dtype=torch.int32), info)
    assert run.finalize_if_complete() is not None
    return run_id


def machine() -> dict[str, str | int]:
    """Where and when a benchmark ran, for RESULTS.md."""
    return {
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def bare_loop(x_all: torch.Tensor, n_latents: int, k: int, batch: int, lr: float) -> float:
    """tokens/s of a minimal TopK SAE training loop over one pass of ``x_all`` (in memory, on its device)."""
    d, device = x_all.shape[1], x_all.device
    torch.manual_seed(0)
    w_dec = torch.randn(n_latents, d, device=device)
    w_dec /= w_dec.norm(dim=1, keepdim=True)
    w_dec.requires_grad_(True)
    w_enc = w_dec.detach().clone().requires_grad_(True)
    b_enc = torch.zeros(n_latents, device=device, requires_grad=True)
    b_dec = x_all[:4096].mean(0).clone().requires_grad_(True)
    opt = torch.optim.Adam([w_enc, b_enc, w_dec, b_dec], lr=lr)
    perm = torch.randperm(x_all.shape[0], device=device)
    t = time.perf_counter()
    for s in range(0, x_all.shape[0], batch):
        x = x_all[perm[s : s + batch]]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pre = torch.nn.functional.linear(x - b_dec, w_enc, b_enc)
            top = torch.relu(pre).topk(k, dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
            loss = fvu(x, z @ w_dec + b_dec)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec /= w_dec.norm(dim=1, keepdim=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return x_all.shape[0] / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "store" / "bench"))
    p.add_argument("--run", default=None, help="existing activation run (default: a synthetic one)")
    p.add_argument("--d", type=int, default=384)
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--multiplier", type=int, default=4, help="N_LATENTS_MULTIPLIER")
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--device", default="cpu")
    p.add_argument("--architectures", default="topk", help="SAE_ARCHITECTURE values, one SAE each (default: topk)")
    args = p.parse_args()
    store = Store(Path(args.store))
    run_id = args.run or synthetic_run(store, args.d, args.tokens)
    meta = ActivationRun(store, run_id).read_meta()
    (spec,) = ActivationRun.layer_specs(meta)
    d, layer = spec.d_model, spec.signature
    settings = TrainSettings(
        store_dir=store.root,
        top_k=args.k,
        n_latents_multiplier=args.multiplier,
        epochs=1,
        batch_size_train=args.batch,
        device=args.device,
        checkpoint_every_steps=10_000,
        log_every_steps=50,
    )
    loader = TokenLoader(ActivationRun(store, run_id), layer, d, args.batch, settings.holdout_fraction, 0, 1 << 20)
    x_all = torch.cat([b.float() for b in loader.iter_epoch(0)]).to(args.device)  # the same tokens, in memory
    for architecture in args.architectures.split(","):
        arch_settings = settings.model_copy(update={"sae_architecture": [architecture]})
        print(json.dumps(measure(arch_settings, run_id, x_all, args) | {"architecture": architecture, **machine()}))


def measure(settings: TrainSettings, run_id: str, x_all: torch.Tensor, args) -> dict:
    """Our trainer's tokens/s, between two runs of the bare loop on the same tokens."""
    bare = bare_loop(x_all, args.multiplier * x_all.shape[1], args.k, args.batch, settings.lr[0])
    out = train_sae(
        settings, run_id, f"speed_{run_id}_{settings.sae_architecture[0]}_k{args.k}_{time.strftime('%H%M%S')}"
    )
    m = json.loads((out / "meta.json").read_text())
    ours = m["tokens_trained"] / m["elapsed_s"]
    bare2 = bare_loop(x_all, args.multiplier * x_all.shape[1], args.k, args.batch, settings.lr[0])  # bracket noise
    return {
        "d_in": x_all.shape[1],
        "n_latents": args.multiplier * x_all.shape[1],
        "k": args.k,
        "batch": args.batch,
        "tokens": m["tokens_trained"],
        "ours_tokens_per_s": round(ours),
        "bare_tokens_per_s": [round(bare), round(bare2)],
        "ratio": round(ours / ((bare + bare2) / 2), 3),
        "timing": m["timing"],  # read / step / checkpoint / evaluate s; on CUDA GPU busy fraction, peak
    }


if __name__ == "__main__":
    main()
