"""SAELens export: the folder alone (plain safetensors + SAELens' formula) reconstructs what our model does."""

import json

import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline.errors import PipelineError
from sae_pipeline.export import export_saelens, load_saelens, saelens_forward
from sae_pipeline.sae import PipelineSae


def _sae(architecture="topk", d=20, n=80, k=6):
    torch.manual_seed(1)
    sae = PipelineSae(n, d, k, architecture=architecture)
    sae.sae_engine.initialize(torch.randn(d) * 4, seed=1)
    with torch.no_grad():
        sae.sae_engine.b_enc.normal_(0, 0.3)
        sae.sae_engine.W_enc.add_(0.2 * torch.randn(n, d))
    return sae


def test_export_reconstructs_like_the_model(tmp_path):
    sae = _sae()
    folder = export_saelens(
        sae, tmp_path / "saelens", hook_name="hook.x", model_name="speakleash/Bielik", hook_layer=16
    )
    cfg, w = load_saelens(folder)
    assert w["W_enc"].shape == (20, 80) and w["b_enc"].shape == (80,)
    assert w["W_dec"].shape == (80, 20) and w["b_dec"].shape == (20,)
    assert (cfg["architecture"], cfg["k"], cfg["d_in"], cfg["d_sae"]) == ("topk", 6, 20, 80)
    assert (cfg["hook_name"], cfg["model_name"], cfg["hook_layer"]) == ("hook.x", "speakleash/Bielik", 16)
    x = torch.randn(500, 20) * 3 + 2
    z_ref, x_hat_ref = saelens_forward(cfg, w, x)
    sae.sae_engine.eval()
    pre, z, x_hat = sae.sae_engine(x)
    assert (x_hat_ref - x_hat).abs().max() <= 1e-5
    assert torch.equal(z_ref != 0, z != 0)
    assert not torch.allclose(w["b_dec"], torch.zeros(20))
    # plain safetensors reads the same tensors
    assert set(load_file(str(folder / "sae_weights.safetensors"))) == {"W_enc", "b_enc", "W_dec", "b_dec"}
    assert json.loads((folder / "cfg.json").read_text())["apply_b_dec_to_input"] is True


def test_batchtopk_exported_the_same_way_with_its_threshold(tmp_path):
    sae = _sae("batchtopk")
    sae.sae_engine.train()
    sae.sae_engine(torch.randn(64, 20))
    cfg, w = load_saelens(export_saelens(sae, tmp_path / "s", hook_name="h", model_name="m", hook_layer=None))
    assert cfg["architecture"] == "topk" and cfg["k"] == 6 and cfg["pipeline_architecture"] == "batchtopk"
    assert cfg["batchtopk_threshold"] == pytest.approx(float(sae.sae_engine.threshold))
    assert cfg["batchtopk_threshold"] > 0


def test_load_saelens_names_a_broken_folder(tmp_path):
    folder = export_saelens(_sae(), tmp_path / "s", hook_name="h", model_name="m", hook_layer=1)
    (folder / "sae_weights.safetensors").write_bytes(b"garbage")
    with pytest.raises(PipelineError, match="sae_weights.safetensors"):
        load_saelens(folder)
