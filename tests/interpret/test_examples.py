"""The streaming example collection against a brute-force reading of every code of a synthetic activation run."""

from __future__ import annotations

import torch

from sae_pipeline.interpret.examples import ExampleBudget, collect_examples, firing_counts
from sae_pipeline.sae.model import BiasedTopKEngine
from sae_pipeline.sae.scan import spread_latents
from tests.sae_fixtures import LAYER, make_run

WINDOW = 3


class PositionText:
    """Text of a position: the position itself (the real ContextSource is exercised end to end on SmolLM2)."""

    def context(self, doc, pos, token_id, window, acts):
        lo, hi = max(0, pos - window), min(16, pos + window + 1)  # the fixture's documents have 16 tokens
        return {"center": pos - lo, "tokens": [[f"{doc}:{p} ", acts.get(p), False] for p in range(lo, hi)]}


def setup(tmp_path, max_tokens=10_000):
    run = make_run(tmp_path / "store")
    torch.manual_seed(0)
    engine = BiasedTopKEngine(32, 64, 4).eval()
    counts, n = firing_counts(run, LAYER, engine, torch.device("cpu"), max_tokens)
    every = torch.cat([engine(run.read_shard(i, LAYER)[0].float())[1] for i in sorted(run.completed_shards())])
    prov = torch.cat([run.read_shard(i, LAYER)[1] for i in sorted(run.completed_shards())])
    return run, engine, counts, n, every[:max_tokens].detach(), prov[:max_tokens]


def test_counts_equal_a_full_reading_and_latents_spread_over_frequencies(tmp_path):
    run, engine, counts, n, every, _ = setup(tmp_path)
    assert n == every.shape[0] == 2500 and torch.equal(counts, (every > 0).sum(0))
    latents = spread_latents(counts / n, 8)
    assert len(set(latents)) == 8 and all(counts[i] > 0 for i in latents)


def test_examples_are_the_top_the_quantiles_and_silent_contexts(tmp_path):
    run, engine, counts, n, every, prov = setup(tmp_path, max_tokens=2000)
    budget = ExampleBudget(top=5, test=4, non_activating=3, window=WINDOW, max_tokens=2000, seed=0)
    latents = spread_latents(counts / n, 6)
    examples = collect_examples(run, LAYER, engine, torch.device("cpu"), latents, counts / n, n, budget, PositionText())
    assert any(ex.frequency < 0.05 for ex in examples) and any(ex.frequency > 0.2 for ex in examples)
    for ex in examples:
        col = every[:, ex.latent]
        # the first top example is the largest activation anywhere; all are activating and at least a window apart
        first = ex.top[0]
        assert first.activations[first.center] == round(float(col.max()), 4)
        rows = [int(((prov[:, 0] == c.doc) & (prov[:, 1] == c.pos)).nonzero()) for c in ex.top]
        assert all(col[r] > 0 for r in rows)
        assert all(abs(a - b) > WINDOW for a in rows for b in rows if a != b)
        assert len(ex.top) == min(5, len(ex.top)) and ex.top
        # test examples fire at their centre, are not top rows, and come from low to high quantiles
        assert all(c.activations[c.center] > 0 for c in ex.test)
        assert [c.quantile for c in ex.test] == sorted(c.quantile for c in ex.test)
        assert all((c.doc, c.pos) not in {(t.doc, t.pos) for t in ex.top} for c in ex.test)
        # the latent is silent on every token of a non-activating context, truly (the full reading says so)
        assert len(ex.non_activating) == 3 if ex.frequency < 0.05 else len(ex.non_activating) <= 3  # dense: fewer
        for c in ex.non_activating:
            assert all(a == 0 for a in c.activations)
            row = int(((prov[:, 0] == c.doc) & (prov[:, 1] == c.pos)).nonzero())
            same = prov[max(0, row - WINDOW) : row + WINDOW + 1, 0] == c.doc
            assert not (every[max(0, row - WINDOW) : row + WINDOW + 1, ex.latent][same] > 0).any()
    again = collect_examples(run, LAYER, engine, torch.device("cpu"), latents, counts / n, n, budget, PositionText())
    assert [e.to_json() for e in again] == [e.to_json() for e in examples]  # reproducible: a resume sees the same
