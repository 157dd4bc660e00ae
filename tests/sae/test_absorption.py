"""First-letter absorption on SAEs built by hand, where the answer is known: a general "starts with a" latent that
is silenced on some words whose own token-specific latents carry the direction instead."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sae_pipeline.sae.absorption import (
    MIN_LETTERS,
    Probed,
    absorption_fractions,
    fit_letter_probe,
    measure_absorption,
)
from sae_pipeline.sae.model import BiasedTopKEngine

ALPHABET = "abcdefghijklmnopqrst"  # MIN_LETTERS letters, so the score is reported
ABSORBED = 5  # test words of "a" whose general latent is silenced
PLAIN_TEST = 10  # test words per letter without absorption
TRAIN = 30  # training words per letter


def words_of(n_per_letter: int, absorbed: int, d_in: int) -> Probed:
    """Every letter c: n words at e_c; letter a also ``absorbed`` words at e_a + u_w (u_w orthogonal to all)."""
    n_letters = len(ALPHABET)
    acts = torch.eye(d_in)[:n_letters].repeat_interleave(n_per_letter, dim=0)
    extra = torch.eye(d_in)[0] + torch.eye(d_in)[n_letters : n_letters + absorbed]
    letters = torch.arange(n_letters).repeat_interleave(n_per_letter)
    return Probed(torch.cat([acts, extra]), torch.cat([letters, torch.zeros(absorbed, dtype=torch.long)]))


def hand_built_sae(d_in: int, absorbing: bool) -> BiasedTopKEngine:
    """Latent c reads and writes e_c. Absorbing: latent a is suppressed by every u_w, and latent n_letters + w reads
    u_w and writes (e_a + u_w)/√2, so on word w it fires in place of latent a."""
    n_letters = len(ALPHABET)
    engine = BiasedTopKEngine(d_in, n_letters + ABSORBED, k=2).eval()
    eye = torch.eye(d_in)
    w_enc = torch.zeros(n_letters + ABSORBED, d_in)
    w_dec = torch.zeros_like(w_enc)
    w_enc[:n_letters], w_dec[:n_letters] = eye[:n_letters], eye[:n_letters]
    specific = eye[n_letters : n_letters + ABSORBED]
    if absorbing:
        w_enc[0] -= 2 * specific.sum(0)
        w_enc[n_letters:] = 2 * specific
        w_dec[n_letters:] = F.normalize(eye[0] + specific, dim=-1)
    with torch.no_grad():
        engine.W_enc.copy_(w_enc)
        engine.b_enc.zero_()
        engine.W_dec.copy_(w_dec)
        engine.b_dec.zero_()
    return engine


@pytest.fixture(scope="module")
def case():
    d_in = len(ALPHABET) + ABSORBED
    train = words_of(TRAIN, 0, d_in)
    test = words_of(PLAIN_TEST, ABSORBED, d_in)
    return d_in, train, test, fit_letter_probe(train, test, len(ALPHABET))


def measure(case, absorbing: bool) -> dict:
    d_in, train, test, probe = case
    engine = hand_built_sae(d_in, absorbing)
    return measure_absorption(train, test, probe, lambda x: engine.encode(x)[1], engine.W_dec.detach(), ALPHABET)


def test_absorbed_share_of_the_letters_words_is_the_absorption_fraction(case):
    result = measure(case, absorbing=True)
    by_letter = {e["letter"]: e for e in result["letters"]}
    assert by_letter["a"]["main_latents"] == [0]  # the token-specific latents are no split: each adds < 0.03 F1
    assert by_letter["a"]["probe_true_positives"] == PLAIN_TEST + ABSORBED
    assert by_letter["a"]["mean_absorption_fraction"] == pytest.approx(ABSORBED / (PLAIN_TEST + ABSORBED))
    assert by_letter["a"]["full_absorption_rate"] == pytest.approx(ABSORBED / (PLAIN_TEST + ABSORBED))
    assert all(by_letter[c]["mean_absorption_fraction"] == 0 for c in ALPHABET[1:])
    assert result["letters_evaluated"] == MIN_LETTERS
    assert result["absorption_fraction"] == pytest.approx(ABSORBED / (PLAIN_TEST + ABSORBED) / len(ALPHABET))


def test_an_sae_without_absorption_scores_zero(case):
    result = measure(case, absorbing=False)
    assert result["absorption_fraction"] == 0
    assert result["full_absorption_rate"] == 0
    assert {e["letter"]: e["main_latents"] for e in result["letters"]}["a"] == [0]


def test_too_few_letters_known_to_the_probe_give_no_score_and_say_why(case):
    d_in, train, test, probe = case
    engine = hand_built_sae(d_in, absorbing=True)
    few = ALPHABET[:2]
    keep_train, keep_test = train.letters < 2, test.letters < 2
    result = measure_absorption(
        Probed(train.acts[keep_train], train.letters[keep_train]),
        Probed(test.acts[keep_test], test.letters[keep_test]),
        fit_letter_probe(
            Probed(train.acts[keep_train], train.letters[keep_train]),
            Probed(test.acts[keep_test], test.letters[keep_test]),
            2,
        ),
        lambda x: engine.encode(x)[1],
        engine.W_dec.detach(),
        few,
    )
    assert result["absorption_fraction"] is None
    assert "only 2 letters" in result["reason"]


def test_partial_absorption_is_the_absorbers_share_of_the_unexplained_projection():
    """SAEBench's graded case: the main latent carries 0.25 of a projection of 1, an aligned latent carries more
    than the rest, so the fraction is 0.75 / (0.75 + 0.25)."""
    direction = torch.tensor([1.0, 0.0])
    w_dec = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    codes = torch.tensor([[0.25, 2.0, 5.0], [1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    acts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]])
    fraction, full = absorption_fractions(acts, codes, direction, w_dec, [0])
    # word 2: main silent, absorber's 0.5 * 0.6 = 0.3 of a projection of 1 is under 0.4 of it: no absorption
    assert fraction.tolist() == pytest.approx([0.75, 0.0, 0.0])
    assert full.tolist() == [False, False, False]
