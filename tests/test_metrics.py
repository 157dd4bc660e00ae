"""Metrics against hand-computed values, and streaming accumulation equal to the one-shot definition."""

import pytest
import torch

from sae_pipeline.metrics import ReconstructionStats, dead_fraction, fvu, l0, mse, never_fired_fraction

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
