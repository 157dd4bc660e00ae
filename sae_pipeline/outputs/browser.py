"""The static feature browser (HTML and JSON) step 3 writes from a scan of stored tokens (``sae/scan.LatentScan``).

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

from sae_pipeline.sae.scan import LatentScan, band_label, frequency_bands
from sae_pipeline.store.files import atomic_write_json, atomic_write_text

TEMPLATE = Path(__file__).with_name("feature_browser.html")  # the page; __TITLE__, __IMG__, __DATA__ filled in
PROMOTED_TOP, PROMOTED_BOTTOM = 10, 5
LIST_CONTEXTS, LIST_WINDOW = 3, 6  # what every latent of the list opens to: its top contexts, a shorter window


class ContextSource:
    """Text of stored token positions: the activation run's documents, tokenized as step 1 did."""

    def __init__(self, run, act_meta: dict[str, Any], tokenizer, texts=None):
        self.run, self.meta, self.tokenizer = run, act_meta, tokenizer
        self._texts = texts
        self._cache: dict[int, tuple[str, list[int], list[tuple[int, int]] | None]] = {}
        self.mismatches = 0

    def _dataset(self):
        if self._texts is None:
            from sae_pipeline.lm.data import load_texts

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
def direct_logits(engine, model, latents: list[int]) -> torch.Tensor | None:
    """[latents, vocab]: (g ⊙ W_dec[i]) · W_Uᵀ per latent; None when the widths do not match W_U."""
    unembed = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if unembed is None or not latents:
        return None
    w_u = unembed.weight.detach().float()
    dirs = engine.W_dec.detach().float()[latents]
    if w_u.shape[1] != dirs.shape[1]:
        return None
    norm = getattr(getattr(model, "model", None), "norm", None)
    gain = getattr(norm, "weight", None)
    if isinstance(gain, torch.Tensor) and gain.shape == (dirs.shape[1],):
        dirs = dirs * gain.detach().float().to(dirs.device)
    return dirs.to(w_u.device) @ w_u.T


def token_name(tokenizer, t: int) -> str:
    text = tokenizer.decode([t])
    return text if "\ufffd" not in text else str(tokenizer.convert_ids_to_tokens(t))  # half a character


@torch.no_grad()
def promoted_tokens(
    engine, model, tokenizer, latents: list[int], top: int = PROMOTED_TOP, bottom: int = PROMOTED_BOTTOM
) -> dict[int, dict[str, list]]:
    """{latent: {"promoted": [[token, logit], ...], "suppressed": [...]}}; {} when the widths do not match W_U."""
    logits = direct_logits(engine, model, latents)
    if logits is None:
        return {}
    hi = logits.topk(min(top, logits.shape[1]), dim=1)
    lo = logits.topk(min(bottom, logits.shape[1]), dim=1, largest=False)

    def named(values, indices):
        return [[token_name(tokenizer, int(t)), round(float(v), 4)] for v, t in zip(values, indices)]

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
    freq, mean, mx = scan.frequency(), scan.mean_when_active(), scan.max.cpu()
    detail = scan.detail_latents(n_detail)
    hists = scan.histograms(detail)
    bands = frequency_bands(freq)
    decade_of = {i: b for b, members in bands.items() for i in members}
    cards = []
    for lat in detail:
        card = {"latent": lat, "band": band_label(decade_of[lat]), "frequency": float(freq[lat])}
        card |= {"max": float(mx[lat]), "mean": float(mean[lat]), "histogram": hists.get(lat)}
        cards.append(card | promoted.get(lat, {"promoted": [], "suppressed": []}) | examples(scan, contexts, lat))
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
            "contexts": [
                shown(scan, contexts, i, scan.top(i, LIST_CONTEXTS), LIST_WINDOW) for i in range(scan.n_latents)
            ],
        },
        "details": cards,
    }
    return _finite(data)


def examples(scan: LatentScan, contexts: ContextSource, lat: int) -> dict[str, Any]:
    """A detailed latent's top contexts and its samples from each quartile of its activations."""
    top = scan.top(lat, scan.contexts)
    samples = scan.quantile_samples(lat, {row for row, _ in top})
    for band in samples:
        band["contexts"] = shown(scan, contexts, lat, band.pop("examples"), scan.window)
    return {"contexts": shown(scan, contexts, lat, top, scan.window), "samples": samples}


def shown(
    scan: LatentScan, contexts: ContextSource, lat: int, rows: list[tuple[int, float]], window: int
) -> list[dict[str, Any]]:
    """The text around each (row, activation), with the latent's activation on every token of the window."""
    out = []
    for row, value in rows:
        doc, pos, tok = scan.provenance(row)
        ctx = contexts.context(doc, pos, tok, window, scan.window_acts(lat, row, window))
        ctx["activation"] = round(value, 4)
        out.append(ctx)
    return out


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
