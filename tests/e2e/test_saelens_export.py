"""The SAELens export through the real scripts (capture, then training of a TopK, a BatchTopK, a Matryoshka
BatchTopK and a JumpReLU SAE), opened by SAELens itself.

SAELens runs in its own environment (tests/saelens_env, pinned by its own uv.lock; it pins numpy 2 and
transformer-lens, which the pipeline's mi_crow cannot share): ``SAE.load_from_disk``, then its encode and decode on
the activations the capture stored, against our model's codes and reconstructions.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from sae_pipeline.outputs.saelens import SAELENS_VERSION
from sae_pipeline.sae.model import PipelineSae
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store
from tests.helpers import SAMPLE, pipeline_env, run_saelens, run_script

SIG = "llamaforcausallm_model_layers_2_post_attention_layernorm"
SAES = {
    "sae_topk": "topk",
    "sae_batchtopk": "batchtopk",
    "sae_matryoshka": "matryoshka_batchtopk",
    "sae_jumprelu": "jumprelu",
}
MATRYOSHKA_WIDTHS = "8,32,128"  # the tiny model's d_model 64 x N_LATENTS_MULTIPLIER 2


@pytest.fixture(scope="module")
def store(tiny_model, tmp_path_factory):
    store = tmp_path_factory.mktemp("saelens") / "store"
    env = pipeline_env(tiny_model, store)
    res = run_script("01_save_activations.py", env, "--run_id", "acts")
    assert res.returncode == 0, res.stderr[-3000:]
    for sae_run_id, architecture in SAES.items():
        arch_env = {**env, "SAE_ARCHITECTURE": architecture}
        if architecture == "matryoshka_batchtopk":
            arch_env["MATRYOSHKA_WIDTHS"] = MATRYOSHKA_WIDTHS
        res = run_script("02_train_sae.py", arch_env, "--sae_run_id", sae_run_id)
        assert res.returncode == 0, res.stderr[-3000:]
    return store


@pytest.mark.parametrize("sae_run_id", SAES)
def test_the_export_says_where_its_activations_come_from(store, tiny_model, sae_run_id):
    cfg = json.loads((store / "runs" / sae_run_id / "saelens" / "cfg.json").read_text())
    meta = cfg["metadata"]
    assert meta["model_name"] == str(tiny_model)
    assert (meta["hook_name"], meta["hook_side"], meta["hook_layer"]) == (
        "model.layers.2.post_attention_layernorm",
        "output",
        2,
    )
    assert meta["mi_crow_layer_signature"] == SIG
    assert (meta["context_size"], meta["prepend_bos"], meta["exclude_special_tokens"]) == (32, True, [0, 1, 2])
    assert meta["dataset_path"] == str(SAMPLE)
    assert meta["sae_pipeline"] == {"sae_run_id": sae_run_id, "activation_run_id": "acts"}
    assert meta["training_architecture"] == SAES[sae_run_id]


def test_saelens_itself_computes_our_codes(store, tmp_path):
    run = ActivationRun(Store(store), "acts")
    x = torch.cat([acts for _, acts, _ in run.iter_shards(SIG)]).float()
    checks = {}
    for sae_run_id in SAES:
        engine = PipelineSae.load(store / "runs" / sae_run_id / "model.pt").sae_engine.eval()
        with torch.no_grad():
            _, z, x_hat = engine(x)
        save_file({"x": x, "z": z, "x_hat": x_hat}, str(tmp_path / f"{sae_run_id}.safetensors"))
        checks[store / "runs" / sae_run_id / "saelens"] = tmp_path / f"{sae_run_id}.safetensors"

    topk, batchtopk, matryoshka, jumprelu = results = run_saelens(checks)
    assert (topk["class"], topk["architecture"]) == ("TopKSAE", "topk")
    for result in (batchtopk, matryoshka, jumprelu):  # SAELens saves BatchTopK and Matryoshka as JumpReLU too
        assert (result["class"], result["architecture"]) == ("JumpReLUSAE", "jumprelu"), result
    assert matryoshka["metadata"]["training_architecture_details"]["matryoshka_widths"] == [8, 32, 128]
    assert jumprelu["distinct_thresholds"] > 64 and batchtopk["distinct_thresholds"] == 1  # one per latent
    for result in results:
        assert result["sae_lens_version"] == SAELENS_VERSION
        assert result["same_active_latents"], result
        assert result["codes_max_abs_diff"] <= 1e-5, result
        assert result["reconstruction_max_abs_diff"] <= 1e-5, result
        assert result["forward_max_abs_diff"] <= 1e-5, result
        assert result["metadata"]["hook_layer"] == 2 and result["metadata"]["context_size"] == 32
    assert topk["mean_l0"] == 4.0 and batchtopk["mean_l0"] != 4.0  # BatchTopK: k on average, not per token
