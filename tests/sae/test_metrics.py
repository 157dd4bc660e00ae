"""Metrics against hand-computed values, and streaming accumulation equal to the one-shot definition."""

import math

import pytest
import torch

from sae_pipeline.sae.metrics import (
    AblationGap,
    ReconstructionStats,
    dead_fraction,
    fvu,
    l0,
    mse,
    never_fired_fraction,
    recovered_or_reason,
)
from tests.eval_fixtures import trained_tiny_model  # noqa: F401  (fixture)

X = torch.tensor([[1.0, 10.0], [3.0, 10.0], [5.0, 16.0]])
X_HAT = torch.tensor([[2.0, 10.0], [3.0, 12.0], [5.0, 16.0]])
Z = torch.tensor([[0.0, 1.0, 0.0], [2.0, 3.0, 0.0], [0.0, 0.0, 0.0]])


def test_fvu_mse_l0_by_hand():
    # per-dimension means 3 and 12: Σ(x − mean)² = (4+0+4) + (4+4+16) = 32; Σ(x − x̂)² = 1 + 4 = 5
    assert float(fvu(X, X_HAT)) == pytest.approx(5 / 32)
    assert float(mse(X, X_HAT)) == pytest.approx(5 / 6)
    assert float(l0(Z)) == pytest.approx(1.0)  # (1 + 2 + 0) / 3
    assert float(fvu(X, X)) == 0.0


def test_fvu_uses_per_dimension_means_not_a_global_one():
    # a global mean (overcomplete's "R2") would count the offset between dimensions as explained variance
    x = X + torch.tensor([0.0, 1000.0])
    global_denominator = (x - x.mean()).pow(2).sum()
    assert float(fvu(x, X_HAT + torch.tensor([0.0, 1000.0]))) == pytest.approx(5 / 32)
    assert float((x - X_HAT - torch.tensor([0.0, 1000.0])).pow(2).sum() / global_denominator) < 5 / 32 / 100


def test_dead_and_never_fired_fractions():
    assert dead_fraction(torch.tensor([0, 5, 10, 11]), window=10) == pytest.approx(0.5)
    assert never_fired_fraction(torch.tensor([0, 3, 0, 1])) == pytest.approx(0.5)


def test_streaming_equals_one_shot_and_merge():
    torch.manual_seed(0)
    x = torch.randn(1000, 8) * torch.linspace(0.1, 5, 8) + torch.linspace(-50, 50, 8)
    x_hat = x + 0.3 * torch.randn_like(x)
    z = torch.relu(torch.randn(1000, 16) - 1.5)
    one = ReconstructionStats(8, 16)
    one.update(x, x_hat, z)
    parts, merged = ReconstructionStats(8, 16), ReconstructionStats(8, 16)
    for chunk in (slice(0, 7), slice(7, 300), slice(300, 301), slice(301, 1000)):
        parts.update(x[chunk], x_hat[chunk], z[chunk])
        piece = ReconstructionStats(8, 16)
        piece.update(x[chunk], x_hat[chunk], z[chunk])
        merged.merge(piece)
    for stats in (one, parts, merged):
        r = stats.result()
        assert r["fvu"] == pytest.approx(float(fvu(x.double(), x_hat.double())), rel=1e-9)
        assert r["mse"] == pytest.approx(float(mse(x.double(), x_hat.double())), rel=1e-9)
        assert r["l0"] == pytest.approx(float(l0(z)), rel=1e-6)
        assert r["never_fired_fraction"] == never_fired_fraction((z != 0).sum(0))
        assert r["n_tokens"] == 1000


def test_state_dict_round_trip_and_empty_stats():
    s = ReconstructionStats(2, 3)
    with pytest.raises(ValueError):
        s.result()
    s.update(X, X_HAT, Z)
    t = ReconstructionStats(2, 3)
    t.load_state_dict(s.state_dict())
    assert t.result() == s.result()
    t.reset()
    assert t.n == 0 and int(t.fire_counts.sum()) == 0


# ---------------------------------------------------------------------------------------------------- ablation gap


def cluster_se(diffs: list[torch.Tensor]) -> tuple[float, float]:
    """The gap and its standard error with documents as the units, written out from the definition."""
    d = torch.tensor([float(x.double().sum()) for x in diffs], dtype=torch.float64)
    n = torch.tensor([x.numel() for x in diffs], dtype=torch.float64)
    gap = float(d.sum() / n.sum())
    N = len(diffs)
    return gap, float(((d - gap * n) ** 2).sum() * N / (N - 1)) ** 0.5 / float(n.sum())


def test_ablation_gap_streams_to_the_cluster_standard_error():
    gen = torch.Generator().manual_seed(0)
    # 40 documents of 3..30 predictions; each document has its own offset, so predictions are correlated within it
    diffs = [
        0.2 + 0.5 * torch.randn(1, generator=gen) + 0.1 * torch.randn(int(n), generator=gen)
        for n in torch.randint(3, 30, (40,), generator=gen)
    ]
    gap = AblationGap()
    for start in range(0, 40, 7):  # batches of documents, as evaluation feeds them
        batch = diffs[start : start + 7]
        gap.update(torch.cat(batch), torch.cat([torch.full((len(x),), 100 + i) for i, x in enumerate(batch)]))
    r = gap.result()
    expected_gap, expected_se = cluster_se(diffs)
    assert r["gap"] == pytest.approx(expected_gap, rel=1e-12) and r["standard_error"] == pytest.approx(expected_se)
    assert (r["n_documents"], r["n_predictions"]) == (40, sum(len(x) for x in diffs))
    # treating the correlated predictions as independent would claim a far smaller error
    flat = torch.cat(diffs).double()
    assert float(flat.std() / len(flat) ** 0.5) < r["standard_error"] / 3
    single = AblationGap()
    single.update(diffs[0], torch.zeros(len(diffs[0]), dtype=torch.long))
    assert single.result()["standard_error"] == math.inf  # one document: no error estimate, never significant


@pytest.mark.parametrize(
    "gap, se, verdict",
    [
        (0.0004, 0.0003, "within the noise"),  # 1.3 standard errors
        (-0.05, 0.001, "within the noise"),  # ablation lowers the loss: no gap to recover
        (0.02, 0.001, "below 1% of CE clean"),  # 20 standard errors, but 0.2% of CE 9.0
        (0.5, 0.02, None),  # a real gap
    ],
)
def test_ce_loss_recovered_only_for_a_real_gap(gap, se, verdict):
    stats = {"gap": gap, "standard_error": se, "n_documents": 60, "n_predictions": 3000}
    ce_clean = 9.0
    value, reason = recovered_or_reason(ce_clean, ce_clean + gap / 4, ce_clean + gap, stats)
    if verdict is None:
        assert reason is None and value == pytest.approx(0.75)
    else:
        assert value is None and verdict in reason
        assert f"{gap:+.4f} ± {se:.4f}" in reason and "60 documents, 3,000 predictions" in reason


def test_gap_is_noise_on_a_random_model_and_real_on_a_trained_one(tiny_model, trained_tiny_model, tmp_path):
    """Through step 3's own forwards: zero-ablating block 2 of the random tiny Llama changes nothing measurable,
    of the briefly trained one a lot."""
    from sae_pipeline.demo.tiny_model import load_sample_texts
    from sae_pipeline.lm.loading import load_language_model
    from sae_pipeline.lm.splice import make_splice
    from sae_pipeline.lm.tokens import token_batches
    from sae_pipeline.sae.downstream import downstream
    from sae_pipeline.sae.model import PipelineSae

    sig = "llamaforcausallm_model_layers_2_post_attention_layernorm"
    verdicts = {}
    for name, folder in (("random", tiny_model), ("trained", trained_tiny_model)):
        lm = load_language_model(str(folder), tmp_path / name, torch.device("cpu"), torch.float32)
        engine = PipelineSae(128, 64, 4).sae_engine.eval()
        splice = make_splice(sig, "output", engine, torch.zeros(64))
        lm.layers.register_hook(sig, splice)
        batches = token_batches(lm.tokenizer, load_sample_texts()[120:200], 32, 8, False)
        result = downstream(lm.model, splice, batches, torch.device("cpu"))
        verdicts[name] = result.metrics()
    random, trained = verdicts["random"], verdicts["trained"]
    assert random["ce_loss_recovered"] is None and "zero ablation" in random["ce_loss_recovered_reason"]
    assert random["ablation_gap_zero"]["gap"] < 0.01 * random["ce_clean"]
    assert trained["ce_loss_recovered"] is not None and trained["ce_loss_recovered_reason"] is None
    assert trained["ablation_gap_zero"]["gap"] > 10 * trained["ablation_gap_zero"]["standard_error"]
