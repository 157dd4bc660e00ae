"""The README's offline demo (its fast random-model variant) runs capture -> training -> evaluation, mi_crow opens
what it wrote, and step 3 says that the random model's ablation gap is noise instead of printing a ratio.
The default, SmolLM2, runs the same scripts; tests/e2e/test_smollm2_pipeline.py runs them on it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae
from mi_crow.store.local_store import LocalStore
from mi_crow.store.store_dataloader import StoreDataloader

from tests.helpers import REPO


def test_demo_command_end_to_end_and_mi_crow_reads_the_outputs(tmp_path):
    store = tmp_path / "demo_store"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RUN_ID", "SAE_", "WANDB_"))}
    env["STORE_DIR"] = str(store)
    done = subprocess.run(
        [sys.executable, "-m", "sae_pipeline.demo", "--model", "tiny"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "demo finished" in done.stdout

    run_id = (store / "run_id.txt").read_text().strip()
    meta = json.loads((store / "runs" / run_id / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["n_empty_documents"] == 3
    loader = StoreDataloader(LocalStore(base_path=store), run_id, meta["layer_signatures"][0], batch_size=1000)
    batches = list(loader)
    assert sum(b.shape[0] for b in batches) == meta["n_tokens"] > 10_000
    assert all(b.shape[1] == meta["layers"][0]["d_model"] == 128 for b in batches)

    sae_dir = store / "runs" / (store / "sae_run_id.txt").read_text().strip()
    sae = TopKSae.load(sae_dir / "model.pt")
    codes = sae.encode(batches[0][:64].float())
    assert codes.shape == (64, 4 * 128) and int((codes != 0).sum(1).max()) <= 8
    history = json.loads((sae_dir / "history.json").read_text())
    assert len(history["epochs"]) == 5
    assert {"loss", "mse", "fvu", "l0", "dead_fraction"} <= set(history["epochs"][-1])
    assert history["epochs"][-1]["fvu"] < history["epochs"][0]["fvu"] < 1.0
    metrics = json.loads((sae_dir / "evaluation" / "metrics.json").read_text())
    d = metrics["downstream"]
    assert torch.isfinite(torch.tensor(d["ce_sae"]))
    # a random model: zero-ablating the layer changes nothing that matters, so no ratio is reported
    assert d["ce_loss_recovered"] is None and d["ablation_gap_zero"]["gap"] < 0.01 * d["ce_clean"]
    assert "CE-loss recovered: none, because zero ablation changes CE by" in done.stdout
    assert (sae_dir / "evaluation" / "feature_browser.html").stat().st_size > 10_000
