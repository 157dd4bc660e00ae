"""Each chosen latent's examples, read from the stored activations in streaming passes (never all codes at once).

delphi builds a latent's record from a cache that holds every non-zero code in memory; here the SAE runs on the
stored activations chunk by chunk (``sae/scan.stored_chunks``) and keeps, per chosen latent, only what its record
needs:

1. ``firing_counts``: every latent's firing count (which latents fire, their frequency: the choice of latents);
2. ``ExampleCollector.collect``: per chosen latent its ``top_examples`` largest activations and a uniform sample of
   its activations (the smallest random keys, a reservoir), from which ``test_examples`` are taken evenly across
   its quantiles (what it does most of the time, not only its extremes); a fixed pool of random rows serves as
   contexts where a latent does not fire anywhere in the window;
3. the windows around the chosen rows: the latent's activation on every token of each window, turned into text by
   step 3's ``ContextSource`` (the run's documents, tokenized as capture did).

Memory: O(latents x (top + reservoir)) numbers plus one chunk of codes, whatever the number of stored tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from sae_pipeline.sae.scan import SCAN_CHUNK_TOKENS, stored_chunks

RESERVOIR_FACTOR = 4  # activations sampled per latent, per test example wanted
TOP_CANDIDATES = 3  # top rows kept per top example wanted: neighbours of a chosen row are skipped
POOL_FACTOR = 4  # random rows in the non-firing pool, per non-firing example wanted


@dataclass(frozen=True)
class ExampleBudget:
    """How many examples of each kind a latent gets, and how wide a context is."""

    top: int
    test: int
    non_activating: int
    window: int
    max_tokens: int
    seed: int


@dataclass
class Context:
    """A window of stored tokens: the text of each token and the latent's activation on it (0 where it is silent)."""

    doc: int
    pos: int
    center: int
    pieces: list[str]
    activations: list[float]
    quantile: float | None = None  # for a test example: where its activation lies among the latent's

    @property
    def max_activation(self) -> float:
        return max(self.activations, default=0.0)

    def text(self) -> str:
        return "".join(self.pieces)

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class LatentExamples:
    """What the explainer and the scorers see of one latent."""

    latent: int
    frequency: float
    top: list[Context]
    test: list[Context]
    non_activating: list[Context]
    sample_values: list[float] = field(default_factory=list)  # a uniform sample of its activations (histograms)

    def to_json(self) -> dict[str, Any]:
        return {
            "top": [c.to_json() for c in self.top],
            "test": [c.to_json() for c in self.test],
            "non_activating": [c.to_json() for c in self.non_activating],
        }


@torch.no_grad()
def firing_counts(run, layer: str, engine, device: torch.device, max_tokens: int) -> tuple[torch.Tensor, int]:
    """Every latent's firing count over the first ``max_tokens`` stored tokens, and the tokens read."""
    d_in, n_latents = engine.W_dec.shape[1], engine.W_dec.shape[0]
    counts = torch.zeros(n_latents, dtype=torch.int64)
    n = 0
    for x, _, lo, hi in stored_chunks(run, layer, d_in, max_tokens):
        z = engine(x[lo:hi].to(device).float())[1]
        counts += (z > 0).sum(0).cpu()
        n += hi - lo
    return counts, n


def estimate_bytes(n_latents: int, n_chosen: int, budget: ExampleBudget) -> int:
    """Peak memory of the collection: one chunk of codes for every latent, and per chosen latent its candidates."""
    chunk = (SCAN_CHUNK_TOKENS + 2 * budget.window) * n_latents * 4 * 3  # codes, their selection, random keys
    per_latent = (budget.top + RESERVOIR_FACTOR * budget.test) * 16 + POOL_FACTOR * budget.non_activating
    return chunk + n_chosen * per_latent


class ExampleCollector:
    """The candidates of the chosen latents (module docstring, point 2), then their windows (point 3)."""

    def __init__(self, latents: list[int], budget: ExampleBudget, n_tokens: int):
        self.latents, self.budget = latents, budget
        self.index = torch.tensor(latents, dtype=torch.long)
        n = len(latents)
        self.top_val = torch.zeros(0, n)
        self.top_row = torch.zeros(0, n, dtype=torch.long)
        self.res_key = torch.zeros(0, n)
        self.res_row = torch.zeros(0, n, dtype=torch.long)
        self.res_val = torch.zeros(0, n)
        gen = torch.Generator().manual_seed(budget.seed)
        self.keys_gen = gen
        pool = max(POOL_FACTOR * budget.non_activating, budget.non_activating)
        self.pool = torch.randperm(n_tokens, generator=gen)[: min(pool, n_tokens)].sort().values

    @torch.no_grad()
    def collect(self, run, layer: str, engine, device: torch.device) -> None:
        d_in = engine.W_dec.shape[1]
        start = 0
        for x, _, lo, hi in stored_chunks(run, layer, d_in, self.budget.max_tokens):
            z = engine(x[lo:hi].to(device).float())[1][:, self.index.to(device)].float().cpu()
            rows = torch.arange(start, start + z.shape[0]).unsqueeze(1).expand_as(z)
            self._keep_top(z, rows)
            self._keep_sample(z, rows)
            start += hi - lo

    def _keep_top(self, z: torch.Tensor, rows: torch.Tensor) -> None:
        val, row = torch.cat([self.top_val, z]), torch.cat([self.top_row, rows])
        keep = val.topk(min(TOP_CANDIDATES * self.budget.top, val.shape[0]), dim=0)
        self.top_val, self.top_row = keep.values, row.gather(0, keep.indices)

    def _keep_sample(self, z: torch.Tensor, rows: torch.Tensor) -> None:
        """A reservoir: the activations with the smallest uniform random keys are a uniform sample of them."""
        keys = torch.rand(z.shape, generator=self.keys_gen).masked_fill(z <= 0, float("inf"))
        key, row = torch.cat([self.res_key, keys]), torch.cat([self.res_row, rows])
        val = torch.cat([self.res_val, z])
        keep = key.topk(min(RESERVOIR_FACTOR * self.budget.test, key.shape[0]), dim=0, largest=False)
        self.res_key, self.res_row, self.res_val = keep.values, row.gather(0, keep.indices), val.gather(0, keep.indices)

    def chosen_rows(self, j: int) -> tuple[list[int], list[tuple[int, float]]]:
        """The j-th latent's top rows (largest first) and its test rows with their quantile."""
        top: list[int] = []
        for r, v in zip(self.top_row[:, j].tolist(), self.top_val[:, j].tolist()):
            if v > 0 and len(top) < self.budget.top and all(abs(r - t) > self.budget.window for t in top):
                top.append(r)  # a context of its own, not a neighbour's window shifted by a token
        fired = torch.isfinite(self.res_key[:, j]) & ~torch.isin(
            self.res_row[:, j], torch.tensor(top, dtype=torch.long)
        )
        rows, vals = self.res_row[fired, j], self.res_val[fired, j]
        order = torch.sort(vals, stable=True).indices
        n = min(self.budget.test, len(order))
        picks = [int((i + 0.5) * len(order) / n) for i in range(n)]
        return top, [(int(rows[order[p]]), (p + 0.5) / len(order)) for p in picks]

    @torch.no_grad()
    def windows(self, run, layer: str, engine, device: torch.device, wanted: dict[int, list[int]]):
        """{(row, j): {pos: activation}} for the wanted (row -> chosen-latent indices), and for every pool row the
        chosen latents that fire anywhere in its window ([pool, chosen] bool)."""
        d_in, w = engine.W_dec.shape[1], self.budget.window
        acts: dict[tuple[int, int], dict[int, float]] = {}
        provenance: dict[int, tuple[int, int, int]] = {}
        pool_fires = torch.zeros(len(self.pool), len(self.latents), dtype=torch.bool)
        pool_at = {int(r): i for i, r in enumerate(self.pool)}
        needed = torch.tensor(sorted(set(wanted) | set(pool_at)), dtype=torch.long)
        start = 0
        for x, prov, lo, hi in stored_chunks(run, layer, d_in, self.budget.max_tokens, w):
            a_, b_ = torch.searchsorted(needed, torch.tensor([start, start + hi - lo])).tolist()
            rows = needed[a_:b_].tolist()
            if rows:
                z = engine(x.to(device).float())[1][:, self.index.to(device)].float().cpu()
                for r in rows:
                    local = lo + r - start
                    a, b = max(0, local - w), min(z.shape[0], local + w + 1)
                    same = prov[a:b, 0] == prov[local, 0]
                    provenance[r] = tuple(int(v) for v in prov[local])
                    if r in pool_at:
                        pool_fires[pool_at[r]] = (z[a:b][same] > 0).any(0)
                    positions = prov[a:b, 1][same].tolist()
                    for j in wanted.get(r, ()):
                        acts[(r, j)] = dict(zip(positions, z[a:b, j][same].tolist()))
            start += hi - lo
        return acts, provenance, pool_fires


def collect_examples(
    run,
    layer: str,
    engine,
    device,
    latents: list[int],
    freq: torch.Tensor,
    n_tokens: int,
    budget: ExampleBudget,
    contexts,
) -> list[LatentExamples]:
    """Every chosen latent's examples (module docstring); ``contexts`` is step 3's ``ContextSource``."""
    collector = ExampleCollector(latents, budget, n_tokens)
    collector.collect(run, layer, engine, device)
    chosen = [collector.chosen_rows(j) for j in range(len(latents))]
    wanted: dict[int, list[int]] = {}
    for j, (top, test) in enumerate(chosen):
        for r in [*top, *(r for r, _ in test)]:
            wanted.setdefault(r, []).append(j)
    acts, provenance, pool_fires = collector.windows(run, layer, engine, device, wanted)

    def context(r: int, j: int, quantile: float | None = None) -> Context:
        doc, pos, tok = provenance[r]
        shown = contexts.context(doc, pos, tok, budget.window, acts.get((r, j), {}))
        pieces = [p for p, _, _ in shown["tokens"]]
        values = [round(float(a or 0.0), 4) for _, a, _ in shown["tokens"]]
        return Context(doc, pos, shown["center"], pieces, values, quantile)

    out = []
    for j, lat in enumerate(latents):
        top, test = chosen[j]
        gen = torch.Generator().manual_seed(budget.seed + lat)
        silent = [int(i) for i in torch.randperm(len(collector.pool), generator=gen) if not pool_fires[i, j]]
        quiet = [collector.pool[i] for i in silent[: budget.non_activating]]
        non_act = [context(int(r), j) for r in quiet]
        out.append(
            LatentExamples(
                lat,
                float(freq[lat]),
                [context(r, j) for r in top],
                [context(r, j, round(q, 4)) for r, q in test],
                non_act,
                collector.res_val[torch.isfinite(collector.res_key[:, j]), j].tolist(),
            )
        )
    return out
