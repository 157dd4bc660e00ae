"""Scans of stored activations: the mean a layer's mean ablation puts in, every latent's codes over stored tokens,
and the reconstruction on a training run's held-out slice.

``LatentScan`` keeps, over the SAE codes of stored tokens, every non-zero activation (latent, value, row; k per
token) and each row's provenance. From them: every latent's firing count, maximum and mean, its top-activating rows,
samples from lower quantiles of its activations (what it does most of the time, not only its extremes), and its
activations on the neighbours of any row (same document). ``detail_latents`` picks latents across the frequency
range, a few from every decade of firing frequency (the most frequent latents are the densest and least
interpretable ones).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.sae.loader import TokenLoader
from sae_pipeline.sae.metrics import ReconstructionStats
from sae_pipeline.store.activations import ActivationRun

SCAN_CHUNK_TOKENS = 4096
HIST_BINS = 30
QUANTILE_BANDS = 4  # lower-activation samples: one group per quartile of the latent's activations
SAMPLES_PER_BAND = 3


def stored_chunks(run: ActivationRun, layer: str, d_in: int, max_tokens: int, window: int = 0):
    """(x, provenance, lo, hi) per chunk of the first ``max_tokens`` stored tokens (store order): rows lo..hi of x
    are the chunk, the others up to ``window`` neighbours on each side (for context windows)."""
    seen = 0
    for index in sorted(run.completed_shards()):
        if seen >= max_tokens:
            break
        acts, prov = run.read_shard(index, layer)
        if acts.shape[1] != d_in:
            raise PipelineError(
                f"{run.shard_dir(index)} holds activations of width {acts.shape[1]}, but the SAE "
                f"has d_in={d_in}; the SAE was not trained on this activation run"
            )
        n = min(acts.shape[0], max_tokens - seen)
        for s in range(0, n, SCAN_CHUNK_TOKENS):
            e = min(s + SCAN_CHUNK_TOKENS, n)
            a, b = max(0, s - window), min(acts.shape[0], e + window)
            yield acts[a:b], prov[a:b], s - a, e - a
        seen += n
    if seen == 0:
        raise PipelineError(f"activation run {run.run_id!r} has no stored tokens in {run.dir}")


@torch.no_grad()
def mean_activation(run: ActivationRun, layer: str, d_in: int, device: torch.device, max_tokens: int) -> torch.Tensor:
    """The mean of the first ``max_tokens`` stored tokens (what mean ablation puts in), once per layer."""
    total = torch.zeros(d_in, dtype=torch.float64, device=device)
    seen = 0
    for x, _, lo, hi in stored_chunks(run, layer, d_in, max_tokens):
        total += x[lo:hi].to(device).float().sum(0, dtype=torch.float64)
        seen += hi - lo
    return (total / seen).float()


@torch.no_grad()
def scan_latents(
    run: ActivationRun,
    layer: str,
    engine: torch.nn.Module,
    device: torch.device,
    max_tokens: int,
    contexts: int,
    window: int,
):
    """A ``report.LatentScan`` of one SAE over the first ``max_tokens`` stored tokens (store order)."""
    d_in, n_latents = engine.W_dec.shape[1], engine.W_dec.shape[0]
    scan = LatentScan(n_latents, contexts, window, device)
    for x, prov, lo, hi in stored_chunks(run, layer, d_in, max_tokens, window):
        scan.update(engine(x.to(device).float())[1].float(), prov.to(device), lo, hi)
    return scan


@torch.no_grad()
def training_holdout(
    run: ActivationRun, layer: str, engine: torch.nn.Module, device: torch.device, train_meta: dict[str, Any]
) -> dict[str, Any] | None:
    """Reconstruction on the training run's held-out slice of stored tokens (train_data's split), for comparison."""
    fraction = (train_meta.get("settings") or {}).get("holdout_fraction")
    if fraction is None:
        return None
    d_in = int(engine.W_dec.shape[1])
    loader = TokenLoader(run, layer, d_in, SCAN_CHUNK_TOKENS, fraction, 0, SCAN_CHUNK_TOKENS)
    stats = ReconstructionStats(d_in, int(engine.W_dec.shape[0]), device)
    for batch in loader.iter_holdout(SCAN_CHUNK_TOKENS):
        x = batch.to(device).float()
        _, z, x_hat = engine(x)
        stats.update(x, x_hat.float(), z.float())
    return stats.result() if stats.n else None


class LatentScan:
    """Every non-zero code of the scanned rows and their provenance (see the module docstring)."""

    def __init__(self, n_latents: int, contexts: int, window: int, device: torch.device | str = "cpu"):
        self.n_latents, self.contexts, self.window = n_latents, contexts, window
        self.n_tokens = 0
        self.counts = torch.zeros(n_latents, dtype=torch.int64, device=device)
        self.max = torch.zeros(n_latents, device=device)
        self.sum = torch.zeros(n_latents, dtype=torch.float64, device=device)
        self._lat: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []
        self._row: list[torch.Tensor] = []
        self._prov: list[torch.Tensor] = []
        self._index: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @torch.no_grad()
    def update(self, z: torch.Tensor, prov: torch.Tensor, lo: int, hi: int) -> None:
        """Codes ``z`` [m, L] of consecutive stored rows with provenance ``prov`` [m, 3]; rows lo..hi are the new
        ones (the rest are neighbours the caller passes for context; consecutive calls cover them anyway)."""
        core = z[lo:hi].float()
        if core.shape[0] == 0:
            return
        fired = core > 0
        self.counts += fired.sum(0)
        self.max = torch.maximum(self.max, core.max(0).values)
        self.sum += core.sum(0, dtype=torch.float64)
        rows, lats = fired.nonzero(as_tuple=True)
        self._lat.append(lats.to(torch.int32).cpu())
        self._val.append(core[rows, lats].cpu())
        self._row.append(rows.cpu() + self.n_tokens)
        self._prov.append(prov[lo:hi].to(torch.int32).cpu())
        self.n_tokens += core.shape[0]
        self._index = None

    def _entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(rows, values, start offsets per latent, provenance): every activation sorted by (latent, row)."""
        if self._index is None:
            lat = torch.cat(self._lat).long() if self._lat else torch.zeros(0, dtype=torch.long)
            row = torch.cat(self._row) if self._row else torch.zeros(0, dtype=torch.long)
            val = torch.cat(self._val) if self._val else torch.zeros(0)
            order = torch.argsort(lat * max(self.n_tokens, 1) + row)
            starts = torch.zeros(self.n_latents + 1, dtype=torch.long)
            starts[1:] = torch.bincount(lat, minlength=self.n_latents).cumsum(0)
            prov = torch.cat(self._prov) if self._prov else torch.zeros(0, 3, dtype=torch.int32)
            self._index = (row[order], val[order], starts, prov)
        return self._index

    def activations(self, latent: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows in ascending order, values) of one latent's non-zero activations."""
        rows, vals, starts, _ = self._entries()
        a, b = int(starts[latent]), int(starts[latent + 1])
        return rows[a:b], vals[a:b]

    def top(self, latent: int, n: int) -> list[tuple[int, float]]:
        """The latent's ``n`` largest activations as (row, value), largest first (ties: earlier row first)."""
        rows, vals = self.activations(latent)
        order = torch.sort(vals, descending=True, stable=True).indices[:n]
        return [(int(rows[i]), float(vals[i])) for i in order]

    def quantile_samples(self, latent: int, exclude: set[int]) -> list[dict[str, Any]]:
        """A few activations from each quartile of the latent's activations (rows in ``exclude`` left out),
        chosen at random with a generator seeded by the latent, so a page is reproducible."""
        rows, vals = self.activations(latent)
        if vals.numel() == 0:
            return []
        order = torch.sort(vals, stable=True).indices
        excluded = torch.tensor(sorted(exclude), dtype=rows.dtype)
        gen = torch.Generator().manual_seed(latent)
        bands = []
        for q in range(QUANTILE_BANDS):
            lo, hi = q * len(order) // QUANTILE_BANDS, (q + 1) * len(order) // QUANTILE_BANDS
            members = order[lo:hi][~torch.isin(rows[order[lo:hi]], excluded)]
            if members.numel() == 0:
                continue
            chosen = members[torch.randperm(len(members), generator=gen)[:SAMPLES_PER_BAND].sort().values].tolist()
            bands.append(
                {
                    "quantiles": [q / QUANTILE_BANDS, (q + 1) / QUANTILE_BANDS],
                    "range": [float(vals[order[lo]]), float(vals[order[hi - 1]])],
                    "examples": [(int(rows[i]), float(vals[i])) for i in chosen],
                }
            )
        return bands

    def provenance(self, row: int) -> tuple[int, int, int]:
        doc, pos, tok = self._entries()[3][row].tolist()
        return doc, pos, tok

    def window_acts(self, latent: int, row: int, window: int) -> dict[int, float]:
        """{position: activation} of the latent on the stored rows of the same document within ``window`` rows."""
        rows, vals = self.activations(latent)
        a = int(torch.searchsorted(rows, row - window))
        b = int(torch.searchsorted(rows, row + window, right=True))
        active = dict(zip(rows[a:b].tolist(), vals[a:b].tolist()))
        lo, hi = max(0, row - window), min(self.n_tokens, row + window + 1)
        block = self._entries()[3][lo:hi, :2].tolist()
        doc = block[row - lo][0]
        return {pos: round(active.get(lo + j, 0.0), 4) for j, (d, pos) in enumerate(block) if d == doc}

    def frequency(self) -> torch.Tensor:
        return (self.counts.double() / max(self.n_tokens, 1)).cpu()

    def mean_when_active(self) -> torch.Tensor:
        return (self.sum / self.counts.clamp_min(1)).float().cpu()

    def detail_latents(self, n: int) -> list[int]:
        """``n`` latents spread over the frequency range (``spread_latents``)."""
        return spread_latents(self.frequency(), n)

    def histograms(self, latents: list[int], bins: int = HIST_BINS) -> dict[int, dict[str, list[float]]]:
        """Histogram of each latent's non-zero activations, ``bins`` equal bins from 0 to its maximum."""
        out = {}
        for i in latents:
            v = self.activations(i)[1]
            top = float(v.max()) if v.numel() else 0.0
            if top <= 0:
                continue
            counts = torch.histc(v, bins=bins, min=0.0, max=top)
            out[i] = {"edges": [top * b / bins for b in range(bins + 1)], "counts": [int(x) for x in counts]}
        return out


def spread_latents(freq: torch.Tensor, n: int) -> list[int]:
    """``n`` firing latents spread over the frequency range: the firing latents are grouped by decade of frequency
    (< 1e-5, 1e-5..1e-4, ..., >= 0.1) and every decade gets an equal share (a decade with fewer latents gives its
    rest to the others); within a decade the picks are evenly spaced in frequency order. Most frequent decade
    first. The feature browser's detailed latents and step 4's latents are chosen by this one rule."""
    bands = frequency_bands(freq)
    quota = {b: 0 for b in bands}
    left = n
    while left > 0 and any(quota[b] < len(bands[b]) for b in bands):
        for b in sorted(bands, reverse=True):
            if left > 0 and quota[b] < len(bands[b]):
                quota[b] += 1
                left -= 1
    picked = []
    for b in sorted(bands, reverse=True):
        members, q = bands[b], quota[b]
        picked += [members[int((i + 0.5) * len(members) / q)] for i in range(q)]
    return picked


FREQUENCY_DECADES = (-5, -1)  # decades below 1e-5 and at or above 0.1 are merged into the end bands


def frequency_bands(freq: torch.Tensor) -> dict[int, list[int]]:
    """{decade: firing latents with frequency in [10^decade, 10^(decade+1)), most frequent first}, decades clipped
    to FREQUENCY_DECADES."""
    lo, hi = FREQUENCY_DECADES
    bands: dict[int, list[int]] = {}
    for i in torch.argsort(freq, descending=True, stable=True).tolist():
        f = float(freq[i])
        if f > 0:
            bands.setdefault(min(max(math.floor(math.log10(f)), lo - 1), hi), []).append(i)
    return bands


def band_label(decade: int) -> str:
    lo, hi = FREQUENCY_DECADES
    if decade < lo:
        return f"< 1e{lo}"
    if decade >= hi:
        return f">= 1e{hi}"
    return f"1e{decade} to 1e{decade + 1}"
