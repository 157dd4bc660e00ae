"""SAELens export: the layout SAELens 6 itself writes for each architecture (a TopK SAE as "topk", a BatchTopK or
Matryoshka SAE as "jumprelu" with its threshold, a JumpReLU SAE as "jumprelu" with its thresholds), SAELens'
formulas on the folder give our codes, and the metadata comes from the activation run's manifest
(built here by the store's own builder, as capture builds it).

SAELens itself runs on exports of the real scripts in tests/e2e/test_saelens_export.py.
"""

import re

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.outputs.saelens import SAELENS_VERSION, excluded_tokens, export_saelens, load_saelens, saelens_forward
from sae_pipeline.sae.model import PipelineSae
from sae_pipeline.store.activations import ActivationRun
from tests.helpers import REPO
from tests.sae_fixtures import make_run

D, N, K = 32, 128, 6
# cfg.json keys of SAELens 6.54.12's own save_inference_model for a TopKTrainingSAE / BatchTopKTrainingSAE
SAELENS_TOPK_KEYS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "k",
    "rescale_acts_by_decoder_norm",
    "metadata",
}
SAELENS_JUMPRELU_KEYS = SAELENS_TOPK_KEYS - {"k", "rescale_acts_by_decoder_norm"}


@pytest.fixture
def run(tmp_path):
    return make_run(tmp_path / "store", shard_sizes=(400, 200), d=D)


def _sae(architecture="topk", x=None):
    torch.manual_seed(1)
    sae = PipelineSae(N, D, K, architecture=architecture)
    eng = sae.sae_engine
    eng.initialize(x.mean(0) if x is not None else torch.zeros(D), seed=1)
    with torch.no_grad():
        eng.b_enc.normal_(0, 0.3)
        eng.W_enc.add_(0.2 * torch.randn(N, D))
    if architecture == "jumprelu" and x is not None:
        eng.initialize_thresholds(x, 0.05)
    if architecture in ("batchtopk", "matryoshka_batchtopk") and x is not None:
        eng.train()
        for batch in x.split(64):  # learns the inference threshold, as training does
            eng(batch)
    eng.eval()
    return sae


def _export(sae, run, tmp_path):
    meta = run.read_meta()
    layer = ActivationRun.layer_specs(meta)[0]
    return load_saelens(export_saelens(sae, tmp_path / "saelens", layer, meta, extra={"sae_run_id": "sae_1"}))


def _tokens(run):
    return run.read_shard(0, ActivationRun.layer_specs(run.read_meta())[0].signature)[0].float()


def test_topk_is_exported_as_saelens_topk(run, tmp_path):
    x = _tokens(run)
    sae = _sae("topk", x)
    cfg, w = _export(sae, run, tmp_path)
    assert set(cfg) == SAELENS_TOPK_KEYS
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", K, D, N)
    assert cfg["apply_b_dec_to_input"] is True and cfg["rescale_acts_by_decoder_norm"] is False
    assert set(load_file(str(tmp_path / "saelens" / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert w["W_enc"].shape == (D, N) and w["W_dec"].shape == (N, D)
    _, z, x_hat = sae.sae_engine(x)
    z_lens, x_hat_lens = saelens_forward(cfg, w, x)
    assert (x_hat_lens - x_hat).abs().max() <= 1e-5
    assert torch.equal(z_lens != 0, z != 0)


def test_batchtopk_is_exported_as_saelens_jumprelu_with_its_threshold(run, tmp_path):
    """What SAELens writes for its own BatchTopK SAEs; SAELens' TopK formula on the same weights activates other
    latents (the export this replaces)."""
    x = _tokens(run)
    sae = _sae("batchtopk", x)
    threshold = float(sae.sae_engine.threshold)
    assert threshold > 0
    cfg, w = _export(sae, run, tmp_path)
    assert set(cfg) == SAELENS_JUMPRELU_KEYS and cfg["architecture"] == "jumprelu"
    assert torch.equal(w["threshold"], torch.full((N,), threshold))
    assert cfg["metadata"]["training_architecture"] == "batchtopk"
    assert cfg["metadata"]["training_architecture_details"] == {
        "k": K,
        "topk_threshold": threshold,
        "topk_threshold_lr": 0.01,
    }
    _, z, x_hat = sae.sae_engine(x)
    z_lens, x_hat_lens = saelens_forward(cfg, w, x)
    assert (x_hat_lens - x_hat).abs().max() <= 1e-5
    assert torch.equal(z_lens != 0, z != 0)
    assert (z != 0).sum(1).float().std() > 0  # a varying number of latents per token: not per-token top-k
    _, x_hat_topk = saelens_forward({"architecture": "topk", "k": K}, w, x)
    assert (x_hat_topk - x_hat).abs().max() > 0.1


def test_matryoshka_is_exported_as_jumprelu_with_its_widths_in_the_metadata(run, tmp_path):
    x = _tokens(run)
    sae = _sae("matryoshka_batchtopk", x)
    cfg, w = _export(sae, run, tmp_path)
    assert set(cfg) == SAELENS_JUMPRELU_KEYS and cfg["architecture"] == "jumprelu"
    assert torch.equal(w["threshold"], torch.full((N,), float(sae.sae_engine.threshold)))
    assert cfg["metadata"]["training_architecture"] == "matryoshka_batchtopk"
    assert cfg["metadata"]["training_architecture_details"]["matryoshka_widths"] == [2, 8, 32, 128]
    _, z, x_hat = sae.sae_engine(x)
    z_lens, x_hat_lens = saelens_forward(cfg, w, x)
    assert torch.equal(z_lens != 0, z != 0) and (x_hat_lens - x_hat).abs().max() <= 1e-5


def test_jumprelu_is_exported_with_its_thresholds_per_latent(run, tmp_path):
    x = _tokens(run)
    sae = _sae("jumprelu", x)
    thresholds = sae.sae_engine.jump_threshold.detach()
    assert thresholds.unique().numel() > N // 2  # one per latent
    cfg, w = _export(sae, run, tmp_path)
    assert set(cfg) == SAELENS_JUMPRELU_KEYS and cfg["architecture"] == "jumprelu"
    assert torch.equal(w["threshold"], thresholds)
    details = cfg["metadata"]["training_architecture_details"]
    assert details["target_l0"] == K and details["jumprelu_bandwidth"] == float(sae.sae_engine.bandwidth)
    _, z, x_hat = sae.sae_engine(x)
    z_lens, x_hat_lens = saelens_forward(cfg, w, x)
    assert torch.equal(z_lens != 0, z != 0) and (x_hat_lens - x_hat).abs().max() <= 1e-5
    assert 0 < (z != 0).sum(1).float().mean() < 3 * K


def test_batchtopk_without_a_threshold_is_exported_as_topk(run, tmp_path):
    """Before its threshold is estimated a BatchTopK SAE infers with per-token top-k: SAELens' TopK."""
    sae = _sae("batchtopk")
    assert float(sae.sae_engine.threshold) < 0
    cfg, w = _export(sae, run, tmp_path)
    assert cfg["architecture"] == "topk" and "threshold" not in w


def test_metadata_comes_from_the_manifest(run, tmp_path):
    cfg, _ = _export(_sae(), run, tmp_path)
    meta = cfg["metadata"]
    assert meta == {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,
        "training_architecture": "topk",
        "training_architecture_details": {"k": K},
        "model_name": "tiny/test-model",
        "hook_name": "model.layers.1.post_attention_layernorm",
        "hook_side": "output",
        "hook_layer": 1,
        "hook_head_index": None,
        "mi_crow_layer_signature": "llamaforcausallm_model_layers_1_post_attention_layernorm",
        "context_size": 16,
        "prepend_bos": True,
        "exclude_special_tokens": [0, 1, 2],
        "dataset_path": "synthetic",
        "sae_pipeline": {"sae_run_id": "sae_1"},
    }


def test_kept_special_tokens_are_not_excluded(run):
    meta = run.read_meta()
    assert excluded_tokens(meta) == [0, 1, 2]
    assert excluded_tokens({**meta, "keep_special_tokens": True}) is False


def test_a_format_1_manifest_gets_its_layer_from_the_signature(run, tmp_path):
    """Runs captured before the manifest recorded layers: hook_layer is parsed from mi_crow's signature."""
    meta = run.read_meta()
    old = {k: v for k, v in meta.items() if k not in ("layers", "prepend_bos")}
    old.update(layer_signature="llamaforcausallm_model_layers_1_post_attention_layernorm", d_model=D)
    layer = ActivationRun.layer_specs(old)[0]
    cfg, _ = load_saelens(export_saelens(_sae(), tmp_path / "s", layer, old))
    assert cfg["metadata"]["hook_layer"] == 1
    assert cfg["metadata"]["hook_name"] == "llamaforcausallm_model_layers_1_post_attention_layernorm"
    assert cfg["metadata"]["prepend_bos"] is None  # not recorded then: unknown, not guessed


def test_export_refuses_a_layer_of_another_width(run, tmp_path):
    with pytest.raises(PipelineError, match="reads 32 dimensions"):
        export_saelens(_sae(), tmp_path / "s", LayerSpec("sig", 64), run.read_meta())


def test_the_layout_version_is_the_one_the_check_installs():
    """SAELENS_VERSION names the release whose layout is written; tests/saelens_env installs that release."""
    pinned = re.search(r'"sae-lens==([^"]+)"', (REPO / "tests" / "saelens_env" / "pyproject.toml").read_text())
    assert pinned and pinned[1] == SAELENS_VERSION


def test_load_saelens_names_a_broken_folder(run, tmp_path):
    _export(_sae(), run, tmp_path)
    (tmp_path / "saelens" / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="sae_weights.safetensors"):
        load_saelens(tmp_path / "saelens")
