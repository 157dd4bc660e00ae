"""architectures.py: Matryoshka's widths and nested-prefix loss, JumpReLU's straight-through estimators, L0 penalty
and initial thresholds, each against the formula written out by hand; the settings' one-line errors."""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.sae.architectures import (
    JumpReLU,
    Step,
    check_matryoshka_widths,
    default_matryoshka_widths,
    initial_thresholds,
    jumprelu_l0_loss,
    matryoshka_inner_loss,
)
from sae_pipeline.sae.metrics import fvu
from sae_pipeline.sae.model import BiasedTopKEngine
from sae_pipeline.sae.sweep import build_grid
from sae_pipeline.settings import TrainSettings

L8 = LayerSpec("llamaforcausallm_model_layers_8_post_attention_layernorm", 32, "model.layers.8.x", 8)


def _engine(architecture: str, n_latents=64, d=16, k=4, widths=None) -> BiasedTopKEngine:
    eng = BiasedTopKEngine(d, n_latents, k, architecture, matryoshka_widths=widths)
    eng.initialize(torch.randn(d, generator=torch.Generator().manual_seed(1)), seed=0)
    with torch.no_grad():
        eng.b_enc.normal_(0, 0.2)
    return eng


def test_default_widths_are_a_geometric_progression_ending_at_the_full_width():
    assert default_matryoshka_widths(8192) == (128, 512, 2048, 8192)
    assert default_matryoshka_widths(128) == (2, 8, 32, 128)
    assert default_matryoshka_widths(4) == (1, 4)  # tiny dictionaries: fewer levels, never a repeated width
    for n in (1, 3, 100, 1536 * 16):
        check_matryoshka_widths(default_matryoshka_widths(n), n)


@pytest.mark.parametrize(
    ("widths", "message"),
    [
        ((8, 32), "last width must be the SAE's n_latents = 64"),
        ((8, 32, 128), "last width must be the SAE's n_latents = 64"),
        ((32, 8, 64), "strictly increasing"),
        ((8, 8, 64), "strictly increasing"),
        ((0, 8, 64), "positive"),
        ((), "last width"),
    ],
)
def test_widths_that_do_not_nest_up_to_the_full_width_are_refused(widths, message):
    with pytest.raises(ValueError, match=message):
        check_matryoshka_widths(widths, 64)


def test_the_sweep_names_matryoshka_widths_in_one_line_and_each_member_gets_its_own_default():
    bad = TrainSettings(device="cpu", sae_architecture="matryoshka_batchtopk", matryoshka_widths="16,32")
    with pytest.raises(PipelineError) as info:
        build_grid(bad, [L8])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("MATRYOSHKA_WIDTHS=16,32 is not valid: the last width must be the SAE's n_latents = 128")
    assert "unset it for the default" in message
    with pytest.raises(PipelineError, match="MATRYOSHKA_WIDTHS is set but SAE_ARCHITECTURE trains no matryoshka"):
        build_grid(TrainSettings(device="cpu", sae_architecture="topk,jumprelu", matryoshka_widths="8,128"), [L8])
    grid = build_grid(
        TrainSettings(device="cpu", sae_architecture="topk,matryoshka_batchtopk", n_latents_multiplier="2,4"), [L8]
    )
    assert {(g.architecture, g.n_latents): g.matryoshka_widths for g in grid} == {
        ("topk", 64): None,
        ("topk", 128): None,
        ("matryoshka_batchtopk", 64): (1, 4, 16, 64),
        ("matryoshka_batchtopk", 128): (2, 8, 32, 128),
    }


def test_matryoshka_selects_like_batchtopk_and_its_loss_adds_every_inner_prefix():
    torch.manual_seed(0)
    eng = _engine("matryoshka_batchtopk", widths=(4, 16, 64)).train()
    x = torch.randn(32, 16) * 2 + 1
    _, z, x_hat = eng(x)
    assert int((z != 0).sum()) == 4 * 32  # BatchTopK over the whole dictionary
    by_hand = sum(fvu(x, z[:, :w] @ eng.W_dec[:w] + eng.b_dec) for w in (4, 16))
    torch.testing.assert_close(matryoshka_inner_loss(eng, x, z), by_hand)
    torch.testing.assert_close(x_hat, z @ eng.W_dec + eng.b_dec)  # the outer level is the plain reconstruction
    # the first group's decoder rows get gradient from every level, the last group's from none of the inner ones
    matryoshka_inner_loss(eng, x, z).backward()
    assert eng.W_dec.grad[:4].abs().sum() > 0 and eng.W_dec.grad[16:].abs().sum() == 0


def test_jumprelu_gradients_are_the_straight_through_estimators_of_the_paper():
    pre = torch.tensor([[0.05, 0.52, 0.9], [0.48, 0.5, -0.2]], requires_grad=True)
    threshold = torch.tensor([0.5, 0.5, 0.5], requires_grad=True)
    bandwidth = torch.tensor(0.1)
    z = JumpReLU.apply(pre, threshold, bandwidth)
    assert torch.equal(z.detach(), torch.tensor([[0.0, 0.52, 0.9], [0.0, 0.0, 0.0]]))
    grad = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    z.backward(grad)
    assert torch.equal(pre.grad, torch.tensor([[0.0, 2.0, 3.0], [0.0, 0.0, 0.0]]))  # only through open gates
    # d/dθ = −θ/ε · rect((pre − θ)/ε) · grad, summed over tokens: |pre − θ| < ε/2 for 0.52, 0.48 and 0.5
    torch.testing.assert_close(threshold.grad, torch.tensor([-(0.5 / 0.1) * 4.0, -(0.5 / 0.1) * (2.0 + 5.0), 0.0]))

    threshold.grad = None
    Step.apply(pre, threshold, bandwidth).sum().backward()  # d/dθ of the L0: −1/ε · rect(...)
    torch.testing.assert_close(threshold.grad, torch.tensor([-10.0, -20.0, 0.0]))


def test_jumprelu_l0_penalty_is_the_quadratic_target_form():
    eng = _engine("jumprelu")
    with torch.no_grad():
        eng.jump_threshold.fill_(0.5)
    pre = torch.zeros(3, 64)
    pre[0, :4] = 1.0  # L0 4 = the target: no penalty
    pre[1, :10] = 1.0  # L0 10
    # L0 0 on the last token
    expected = (0 + 2 / 4 * 6**2 + 2 / 4 * 4**2) / 3
    assert jumprelu_l0_loss(eng, pre, target_l0=4).item() == pytest.approx(expected)


def test_jumprelu_infers_with_saelens_formula_and_starts_near_the_target_l0():
    torch.manual_seed(0)
    eng = _engine("jumprelu", n_latents=64, k=4)
    x = torch.randn(2000, 16) * 2 + 1
    eng.initialize_thresholds(x, bandwidth=0.05)
    assert (eng.jump_threshold >= 0).all() and eng.jump_threshold.unique().numel() > 32
    assert 0 < float(eng.bandwidth) < 0.05 * 3  # in units of the activations' RMS (about 2 here)
    eng.eval()
    pre, z, x_hat = eng(x)
    assert torch.equal(z, torch.relu(pre) * (pre > eng.jump_threshold))  # SAELens' JumpReLUSAE.encode
    assert 3.0 <= float((z != 0).sum(-1).float().mean()) <= 5.0
    torch.testing.assert_close(x_hat, z @ eng.W_dec + eng.b_dec)
    # each latent fires on about k / n of the tokens it was initialised on
    assert float((initial_thresholds(pre, 4) < pre).float().mean(0).max()) <= 4 / 64 + 1 / 2000


def test_jumprelu_thresholds_are_kept_non_negative():
    eng = _engine("jumprelu")
    with torch.no_grad():
        eng.jump_threshold.fill_(-0.3)
    eng.clamp_thresholds()
    assert torch.equal(eng.jump_threshold.detach(), torch.zeros(64))
