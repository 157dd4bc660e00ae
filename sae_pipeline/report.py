"""What step 3 shows people: the firing-frequency histogram and the static feature browser (HTML and JSON).

* ``LatentScan`` keeps, over the SAE codes of stored tokens, every non-zero activation (latent, value, row; k per
  token) and each row's provenance. From them: every latent's firing count, maximum and mean, its top-activating
  rows, samples from lower quantiles of its activations (what it does most of the time, not only its extremes),
  and its activations on the neighbours of any row (same document).
* ``detail_latents`` picks the latents shown in detail across the frequency range, a few from every decade of
  firing frequency (the most frequent latents are the densest and least interpretable ones).
* ``ContextSource`` turns a (document index, position) from step 1's provenance back into text: it tokenizes the
  run's document exactly as capture did and cuts the original characters per token (offset mapping), so Polish
  diacritics are shown as written even when a byte-level token holds half a character.
* ``promoted_tokens``: the tokens whose logits a latent's decoder direction raises most, (g ⊙ W_dec[i]) · W_Uᵀ
  with g the final norm's weight when there is one (a direct-logit view; exact only for a residual-stream hook).
* ``write_browser`` writes ``feature_browser.json`` and ``feature_browser.html``: one self-contained file (data
  inlined, no network, no server) with a sortable list of all latents, each of which opens (its top contexts),
  and a card per detailed latent.
"""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.store import atomic_write_json, atomic_write_text

HIST_BINS = 30
TEMPLATE = Path(__file__).with_name("feature_browser.html")  # the page; __TITLE__, __IMG__, __DATA__ filled in
PROMOTED_TOP, PROMOTED_BOTTOM = 10, 5
QUANTILE_BANDS = 4  # lower-activation samples: one group per quartile of the latent's activations
SAMPLES_PER_BAND = 3
LIST_CONTEXTS, LIST_WINDOW = 3, 6  # what every latent of the list opens to: its top contexts, a shorter window


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
        """``n`` latents spread over the frequency range: the firing latents are grouped by decade of frequency
        (< 1e-5, 1e-5..1e-4, ..., >= 0.1) and every decade gets an equal share (a decade with fewer latents gives
        its rest to the others); within a decade the picks are evenly spaced in frequency order. Most frequent
        decade first."""
        bands = frequency_bands(self.frequency())
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


class ContextSource:
    """Text of stored token positions: the activation run's documents, tokenized as step 1 did."""

    def __init__(self, run, act_meta: dict[str, Any], tokenizer, texts=None):
        self.run, self.meta, self.tokenizer = run, act_meta, tokenizer
        self._texts = texts
        self._cache: dict[int, tuple[str, list[int], list[tuple[int, int]] | None]] = {}
        self.mismatches = 0

    def _dataset(self):
        if self._texts is None:
            from sae_pipeline.data import load_texts

            ds = self.meta["dataset"]
            seed = ds.get("shuffle_seed") if ds.get("shuffle_seed") is not None else 0
            rows = load_texts(
                ds["name"], ds["split"], ds["text_field"], int(ds["limit"]), bool(ds.get("shuffle")), seed
            )
            self._texts = rows[ds["text_field"]]
        return self._texts

    def document(self, doc: int) -> tuple[str, list[int], list[tuple[int, int]] | None]:
        if doc not in self._cache:
            text = self._dataset()[doc]
            kwargs = {"truncation": True, "max_length": int(self.meta["max_length"])}
            if getattr(self.tokenizer, "is_fast", False):
                enc = self.tokenizer(text, return_offsets_mapping=True, **kwargs)
                self._cache[doc] = (text, list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])
            else:
                self._cache[doc] = (text, list(self.tokenizer(text, **kwargs)["input_ids"]), None)
        return self._cache[doc]

    def context(self, doc: int, pos: int, token_id: int, window: int, acts: dict[int, float]) -> dict[str, Any]:
        """Tokens pos-window..pos+window of document ``doc`` as [text, activation or None, is_special]."""
        text, ids, offsets = self.document(doc)
        mismatch = not (0 <= pos < len(ids)) or ids[pos] != token_id
        self.mismatches += int(mismatch)
        lo, hi = max(0, pos - window), min(len(ids), pos + window + 1)
        special = set(self.tokenizer.all_special_ids)
        tokens = []
        prev_end = None
        for p in range(lo, hi):
            if ids[p] in special:
                piece, is_special = self.tokenizer.convert_ids_to_tokens(ids[p]), True
            elif offsets is not None:
                s, e = offsets[p]
                start = s if prev_end is None else min(prev_end, e)  # the gap before it (spaces) belongs to it
                piece, is_special = text[start:e], False
                prev_end = max(e, prev_end or 0)
            else:
                piece, is_special = self.tokenizer.decode([ids[p]]), False
            tokens.append([piece, acts.get(p), is_special])
        return {"doc": doc, "pos": pos, "center": pos - lo, "tokens": tokens, "mismatch": mismatch}


@torch.no_grad()
def promoted_tokens(
    engine, model, tokenizer, latents: list[int], top: int = PROMOTED_TOP, bottom: int = PROMOTED_BOTTOM
) -> dict[int, dict[str, list]]:
    """{latent: {"promoted": [[token, logit], ...], "suppressed": [...]}}; {} when the widths do not match W_U."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None or not latents:
        return {}
    w_u = unembed.weight.detach().float()
    dirs = engine.W_dec.detach().float()[latents]
    if w_u.shape[1] != dirs.shape[1]:
        return {}
    norm = getattr(getattr(model, "model", None), "norm", None)
    gain = getattr(norm, "weight", None)
    if isinstance(gain, torch.Tensor) and gain.shape == (dirs.shape[1],):
        dirs = dirs * gain.detach().float().to(dirs.device)
    logits = dirs.to(w_u.device) @ w_u.T  # [n, vocab]
    hi = logits.topk(min(top, logits.shape[1]), dim=1)
    lo = logits.topk(min(bottom, logits.shape[1]), dim=1, largest=False)

    def name(t: int) -> str:
        text = tokenizer.decode([t])
        return text if "\ufffd" not in text else str(tokenizer.convert_ids_to_tokens(t))  # half a character

    def named(values, indices):
        return [[name(int(t)), round(float(v), 4)] for v, t in zip(values, indices)]

    return {
        lat: {"promoted": named(hi.values[j], hi.indices[j]), "suppressed": named(lo.values[j], lo.indices[j])}
        for j, lat in enumerate(latents)
    }


def browser_data(
    scan: LatentScan,
    contexts: ContextSource,
    promoted: dict[int, dict[str, list]],
    n_detail: int,
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Everything the HTML page shows, as plain JSON-able data (also written as feature_browser.json)."""
    freq, mean = scan.frequency(), scan.mean_when_active()
    mx = scan.max.cpu()
    detail = scan.detail_latents(n_detail)
    hists = scan.histograms(detail)
    decade_of = {i: b for b, members in frequency_bands(freq).items() for i in members}

    def shown(lat: int, examples: list[tuple[int, float]], window: int) -> list[dict[str, Any]]:
        out = []
        for row, value in examples:
            doc, pos, tok = scan.provenance(row)
            ctx = contexts.context(doc, pos, tok, window, scan.window_acts(lat, row, window))
            ctx["activation"] = round(value, 4)
            out.append(ctx)
        return out

    cards = []
    for lat in detail:
        top = scan.top(lat, scan.contexts)
        samples = scan.quantile_samples(lat, {row for row, _ in top})
        for band in samples:
            band["contexts"] = shown(lat, band.pop("examples"), scan.window)
        cards.append(
            {
                "latent": lat,
                "band": band_label(decade_of[lat]),
                "frequency": float(freq[lat]),
                "max": float(mx[lat]),
                "mean": float(mean[lat]),
                "histogram": hists.get(lat),
                **promoted.get(lat, {"promoted": [], "suppressed": []}),
                "contexts": shown(lat, top, scan.window),
                "samples": samples,
            }
        )
    bands = frequency_bands(freq)
    data = {
        "summary": summary,
        "scanned_tokens": scan.n_tokens,
        "n_latents": scan.n_latents,
        "bands": [
            {"label": band_label(b), "latents": len(bands[b]), "shown": sum(decade_of[i] == b for i in detail)}
            for b in sorted(bands, reverse=True)
        ],
        "latents": {
            "frequency": [float(f) for f in freq],
            "max": [round(float(m), 4) for m in mx],
            "mean": [round(float(m), 4) for m in mean],
            "contexts": [shown(i, scan.top(i, LIST_CONTEXTS), LIST_WINDOW) for i in range(scan.n_latents)],
        },
        "details": cards,
    }
    return _finite(data)


def _finite(obj: Any) -> Any:
    """NaN/inf become null: JSON has no such numbers and a browser's JSON.parse rejects them."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_browser(data: dict[str, Any], out_dir: Path, png: Path | None = None) -> tuple[Path, Path]:
    """feature_browser.json and the self-contained feature_browser.html (with the PNG inlined when given)."""
    js_path, html_path = out_dir / "feature_browser.json", out_dir / "feature_browser.html"
    atomic_write_json(js_path, data)
    atomic_write_text(html_path, render_html(data, png.read_bytes() if png is not None and png.is_file() else None))
    return html_path, js_path


def render_html(data: dict[str, Any], png: bytes | None = None) -> str:
    payload = json.dumps(data, ensure_ascii=False, allow_nan=False).replace("<", "\\u003c")
    s = data.get("summary", {})
    title = f"SAE feature browser: {s.get('sae_run_id', '')}"
    img = (
        (f'<img alt="latent firing frequency histogram" src="data:image/png;base64,{base64.b64encode(png).decode()}">')
        if png
        else ""
    )
    return (
        TEMPLATE.read_text(encoding="utf-8")
        .replace("__TITLE__", html.escape(title))
        .replace("__IMG__", img)
        .replace("__DATA__", payload)
    )
