"""The SAE: our forward (b_dec, TopK/BatchTopK), unit-norm decoder, and model.pt that mi_crow's own loader opens."""

import pytest
import torch
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.sae.model import PipelineSae


def _random_sae(architecture="topk", n_latents=96, d=24, k=5, seed=0):
    torch.manual_seed(seed)
    sae = PipelineSae(n_latents, d, k, architecture=architecture)
    eng = sae.sae_engine
    eng.initialize(torch.randn(d) * 3, seed)
    with torch.no_grad():
        eng.b_enc.normal_(0, 0.2)
        eng.W_enc.add_(0.3 * torch.randn_like(eng.W_enc))
    sae.context.lm_layer_signature, sae.context.model_id = "layer_x", "model_y"
    return sae


def test_forward_applies_decoder_bias_and_topk():
    sae = _random_sae()
    eng = sae.sae_engine
    x = torch.randn(10, 24) * 2 + 1
    pre, z, x_hat = eng(x)
    expected_pre = (x - eng.b_dec) @ eng.W_enc.T + eng.b_enc
    torch.testing.assert_close(pre, expected_pre)
    assert ((z != 0).sum(-1) <= 5).all() and ((z != 0).sum(-1) == 5).any()
    kept = torch.relu(expected_pre).topk(5, dim=-1)
    torch.testing.assert_close(z.gather(-1, kept.indices), kept.values)
    torch.testing.assert_close(x_hat, z @ eng.W_dec + eng.b_dec)


def test_mi_crow_topksae_load_opens_our_model_pt(tmp_path):
    sae = _random_sae()
    path = sae.save("model", tmp_path)
    plain = TopKSae.load(path)  # mi_crow's own loader, unmodified
    assert type(plain) is TopKSae
    assert plain.sae_engine.top_k == 5 and plain.context.n_latents == 96 and plain.context.n_inputs == 24
    assert plain.context.lm_layer_signature == "layer_x" and plain.context.model_id == "model_y"
    x = torch.randn(64, 24) * 2 + 1
    ours_codes = sae.encode(x)
    # the folded encoder bias makes mi_crow's plain codes exactly ours ...
    torch.testing.assert_close(plain.encode(x), ours_codes, atol=1e-5, rtol=1e-5)
    # ... and its reconstruction lacks only b_dec, stored beside the state dict
    b_dec = torch.load(path, weights_only=True)["pipeline_sae"]["b_dec"]
    torch.testing.assert_close(plain.decode(plain.encode(x)) + b_dec, sae.forward(x), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(b_dec, torch.zeros(24))


def test_our_load_round_trips_exactly(tmp_path):
    for arch in ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"):
        sae = _random_sae(arch)
        if arch in ("batchtopk", "matryoshka_batchtopk"):
            sae.sae_engine.train()
            sae.sae_engine(torch.randn(32, 24))  # estimates the threshold
        if arch == "jumprelu":
            sae.sae_engine.initialize_thresholds(torch.randn(200, 24), bandwidth=0.05)
        path = sae.save("model", tmp_path / arch)
        back = PipelineSae.load(path)
        assert back.architecture == arch and back.k == 5
        assert float(back.sae_engine.threshold) == pytest.approx(float(sae.sae_engine.threshold))
        assert back.sae_engine.matryoshka_widths == sae.sae_engine.matryoshka_widths
        if arch == "jumprelu":
            assert torch.equal(back.sae_engine.jump_threshold, sae.sae_engine.jump_threshold)
            assert torch.equal(back.sae_engine.bandwidth, sae.sae_engine.bandwidth)
        sae.sae_engine.eval(), back.sae_engine.eval()
        x = torch.randn(50, 24)
        assert (back.forward(x) - sae.forward(x)).abs().max() <= 1e-5


def test_batchtopk_keeps_k_per_token_on_average_and_learns_a_threshold():
    sae = _random_sae("batchtopk")
    eng = sae.sae_engine.train()
    assert float(eng.threshold) < 0  # not estimated yet
    x = torch.randn(40, 24) * 2
    _, z, _ = eng(x)
    assert int((z != 0).sum()) == 5 * 40
    assert (z != 0).sum(-1).unique().numel() > 1  # varies per token
    assert float(eng.threshold) > 0
    eng.eval()
    _, z_eval, _ = eng(x)
    assert torch.equal(z_eval != 0, torch.relu(eng.pre_acts(x)) > eng.threshold)


def test_decoder_normalisation_and_parallel_gradient_removal():
    sae = _random_sae()
    eng = sae.sae_engine
    with torch.no_grad():
        eng.W_dec.mul_(torch.rand(96, 1) * 3 + 0.1)
    assert not torch.allclose(eng.W_dec.norm(dim=1), torch.ones(96))
    eng.normalize_decoder()
    torch.testing.assert_close(eng.W_dec.norm(dim=1), torch.ones(96))
    eng(torch.randn(16, 24))[2].pow(2).sum().backward()
    before = (eng.W_dec.grad * eng.W_dec).sum(1).abs().max()
    assert before > 1e-3
    eng.remove_parallel_gradient()
    assert (eng.W_dec.grad * eng.W_dec).sum(1).abs().max() < 1e-3 * before


def test_mi_crow_hook_path_uses_decoder_bias():
    """mi_crow's Controller hook (modify_activations) goes through our engine, so b_dec is applied there too."""
    sae = _random_sae()
    x = torch.randn(2, 3, 24)
    out = sae.modify_activations(None, (), x)
    torch.testing.assert_close(out, sae.forward(x.reshape(6, 24)).reshape(2, 3, 24))


def test_load_rejects_corrupted_and_foreign_files(tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(PipelineError, match="model.pt"):
        PipelineSae.load(bad)
    torch.save({"something": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(PipelineError, match="other.pt"):
        PipelineSae.load(tmp_path / "other.pt")


def test_plain_mi_crow_file_loads_with_zero_decoder_bias(tmp_path):
    plain = TopKSae(n_latents=40, n_inputs=8)
    plain.sae_engine = plain._initialize_sae_engine(k=3)
    plain.save("plain", tmp_path)
    ours = PipelineSae.load(tmp_path / "plain.pt")
    assert ours.k == 3 and torch.equal(ours.sae_engine.b_dec, torch.zeros(8))
    plain.sae_engine.eval(), ours.sae_engine.eval()
    x = torch.randn(7, 8)
    torch.testing.assert_close(ours.encode(x), plain.encode(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("offset", [5.0, 50.0])
def test_bf16_autocast_codes_agree_with_float32_on_offset_activations(offset):
    """Llama activations have a mean far larger than their spread: under bf16 autocast (CUDA's default) the codes
    must still be the ones float32 computes, the ones evaluation and the exports use."""
    torch.manual_seed(1)
    d, n_latents, k = 64, 512, 16
    centre = torch.randn(d) * offset
    x = centre + torch.randn(4096, d)
    sae = PipelineSae(n_latents, d, k)
    eng = sae.sae_engine
    eng.initialize(centre + 0.1 * torch.randn(d), seed=0)
    _, z32, _ = eng(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, z16, _ = eng(x)
    same = ((z32 != 0) & (z16 != 0)).sum() / (z32 != 0).sum()
    assert same >= 0.99, f"top-k agreement {float(same):.3f} at an offset of {offset}x the spread"


def test_b_dec_gets_its_gradient_through_the_centred_encoder():
    sae = _random_sae()
    eng = sae.sae_engine
    x = torch.randn(32, 24) * 2 + 1
    pre = eng.pre_acts(x)
    b_dec = eng.b_dec.detach().clone().requires_grad_(True)
    reference = (x - b_dec) @ eng.W_enc.T + eng.b_enc
    weights = torch.randn_like(pre)
    (pre * weights).sum().backward()
    (reference * weights).sum().backward()
    torch.testing.assert_close(eng.b_dec.grad, b_dec.grad)


def test_mi_crow_opens_a_jumprelu_model_pt_but_the_file_says_its_codes_are_not_the_saes(tmp_path):
    sae = _random_sae("jumprelu")
    sae.sae_engine.initialize_thresholds(torch.randn(200, 24) * 2, bandwidth=0.05)
    path = sae.save("model", tmp_path)
    plain = TopKSae.load(path)  # opens: same weights, per-token top-k in place of the thresholds
    x = torch.randn(64, 24) * 2
    sae.sae_engine.eval()
    assert (plain.encode(x) != 0).sum(-1).eq(5).all()
    assert not torch.equal(plain.encode(x) != 0, sae.encode(x) != 0)
    note = torch.load(path, weights_only=True)["pipeline_sae"]["mi_crow_topksae"]
    assert note.startswith("not representable") and "PipelineSae.load" in note
