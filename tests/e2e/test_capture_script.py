"""Step 1 as a user runs it, with several layers: one run holding each, readable by mi_crow, a time report, and a
start-up that imports nothing a text model does not use."""

from __future__ import annotations

import json

import torch
from mi_crow.store.local_store import LocalStore
from mi_crow.store.store_dataloader import StoreDataloader

from sae_pipeline.cli import UNUSED_BY_TEXT_MODELS
from tests.helpers import run_script


def test_several_layers_through_the_script(pipeline_env, tmp_path):
    env = {**pipeline_env, "LAYER_NUM": "3,1", "PYTHONPROFILEIMPORTTIME": "1"}
    res = run_script("01_save_activations.py", env, "--run_id", "layers")
    assert res.returncode == 0, res.stderr[-3000:]
    imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" in imported and "transformers" in imported, "the import trace is there"
    unused = {name.split(".")[0] for name in imported} & set(UNUSED_BY_TEXT_MODELS)
    assert not unused, f"step 1 imported {unused}, which a text model never uses"

    lines = [line for line in res.stderr.splitlines() if not line.startswith("import time:")]
    assert any("bytes per token" in line and "free" in line for line in lines)
    summary = next(line for line in lines if line.startswith("Captured"))
    assert "from 2 layers" in summary and "start-up" in summary and "write" in summary and "waiting" in summary

    store = tmp_path / "store"
    meta = json.loads((store / "runs" / "layers" / "meta.json").read_text())
    signatures = [f"llamaforcausallm_model_layers_{i}_post_attention_layernorm" for i in (3, 1)]
    assert meta["status"] == "complete" and meta["layer_signatures"] == signatures
    assert len(meta["timing"]) == 1 and meta["timing"][0]["tokens"] == meta["n_tokens"]
    for signature in signatures:
        loader = StoreDataloader(LocalStore(base_path=store), "layers", signature, batch_size=512, dtype=torch.float32)
        assert torch.cat(list(loader)).shape == (meta["n_tokens"], 64)
