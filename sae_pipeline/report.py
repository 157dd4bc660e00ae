"""What step 3 shows people: the firing-frequency histogram and the static feature browser (HTML and JSON).

* ``LatentScan`` accumulates, over SAE codes of stored tokens, every latent's firing count, maximum, mean, all of
  its non-zero activation values (k per token, for the histograms) and its top-activating tokens together with the
  latent's activations on the stored neighbours of each (same document, up to ``window`` rows either side).
* ``ContextSource`` turns a (document index, position) from step 1's provenance back into text: it tokenizes the
  run's document exactly as capture did and cuts the original characters per token (offset mapping), so Polish
  diacritics are shown as written even when a byte-level token holds half a character.
* ``promoted_tokens``: the tokens whose logits a latent's decoder direction raises most, (g ⊙ W_dec[i]) · W_Uᵀ
  with g the final norm's weight when there is one (a direct-logit view; exact only for a residual-stream hook).
* ``write_browser`` writes ``feature_browser.json`` and ``feature_browser.html``: one self-contained file (data
  inlined, no network, no server) with a sortable list of all latents and a card per detailed latent.
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


class LatentScan:
    """Streaming per-latent statistics and top-C contexts (see the module docstring)."""

    def __init__(self, n_latents: int, contexts: int, window: int, device: torch.device | str = "cpu"):
        C, L, W2 = contexts, n_latents, 2 * window + 1
        self.n_latents, self.contexts, self.window = n_latents, contexts, window
        self.n_tokens = 0
        self.counts = torch.zeros(L, dtype=torch.int64, device=device)
        self.max = torch.zeros(L, device=device)
        self.sum = torch.zeros(L, dtype=torch.float64, device=device)
        self.best = torch.full((C, L), -1.0, device=device)
        self.doc = torch.full((C, L), -1, dtype=torch.int32, device=device)
        self.pos = torch.full((C, L), -1, dtype=torch.int32, device=device)
        self.tok = torch.full((C, L), -1, dtype=torch.int32, device=device)
        self.win_act = torch.zeros((C, L, W2), device=device)
        self.win_pos = torch.full((C, L, W2), -1, dtype=torch.int32, device=device)
        self.offsets = torch.arange(-window, window + 1, device=device)
        self._lat: list[torch.Tensor] = []
        self._val: list[torch.Tensor] = []

    @torch.no_grad()
    def update(self, z: torch.Tensor, prov: torch.Tensor, lo: int, hi: int) -> None:
        """Codes ``z`` [m, L] of consecutive stored rows with provenance ``prov`` [m, 3]; rows lo..hi are counted,
        the rest only serve as neighbours of a context."""
        z, prov = z.float(), prov.to(z.device)
        core = z[lo:hi]
        if core.shape[0] == 0:
            return
        fired = core > 0
        self.counts += fired.sum(0)
        self.max = torch.maximum(self.max, core.max(0).values)
        self.sum += core.sum(0, dtype=torch.float64)
        rows, lats = fired.nonzero(as_tuple=True)
        self._lat.append(lats.to(torch.int32).cpu())
        self._val.append(core[rows, lats].cpu())
        self.n_tokens += core.shape[0]

        C = self.contexts
        vals, idx = torch.cat([self.best, core]).topk(min(C, C + core.shape[0]), dim=0)
        old = idx.clamp(max=C - 1)
        doc, pos, tok = (t.gather(0, old) for t in (self.doc, self.pos, self.tok))
        expand = old[..., None].expand(-1, -1, self.win_act.shape[-1])
        win_act, win_pos = self.win_act.gather(0, expand), self.win_pos.gather(0, expand)
        valid = vals > 0
        c, l = ((idx >= C) & valid).nonzero(as_tuple=True)
        if c.numel():
            r = idx[c, l] - C + lo  # row in z
            rr = r[:, None] + self.offsets
            inside = (rr >= 0) & (rr < z.shape[0])
            rr = rr.clamp(0, z.shape[0] - 1)
            same = inside & (prov[rr, 0] == prov[r, 0][:, None])
            win_act[c, l] = torch.where(same, z[rr, l[:, None]], torch.zeros((), device=z.device))
            win_pos[c, l] = torch.where(
                same, prov[rr, 1].to(torch.int32), torch.full((), -1, dtype=torch.int32, device=z.device)
            )
            doc[c, l], pos[c, l], tok[c, l] = (prov[r, j].to(torch.int32) for j in range(3))
        doc[~valid] = -1
        self.best, self.doc, self.pos, self.tok, self.win_act, self.win_pos = vals, doc, pos, tok, win_act, win_pos

    def frequency(self) -> torch.Tensor:
        return (self.counts.double() / max(self.n_tokens, 1)).cpu()

    def mean_when_active(self) -> torch.Tensor:
        return (self.sum / self.counts.clamp_min(1)).float().cpu()

    def detail_latents(self, n: int) -> list[int]:
        """The ``n`` most frequently firing latents (never-firing ones have nothing to show)."""
        counts = self.counts.cpu()
        order = torch.argsort(counts, descending=True, stable=True)
        return [int(i) for i in order[:n] if counts[i] > 0]

    def histograms(self, latents: list[int], bins: int = HIST_BINS) -> dict[int, dict[str, list[float]]]:
        """Histogram of each latent's non-zero activations, ``bins`` equal bins from 0 to its maximum."""
        if not self._lat:
            return {}
        lat, val = torch.cat(self._lat), torch.cat(self._val)
        out = {}
        for i in latents:
            v = val[lat == i]
            top = float(v.max()) if v.numel() else 0.0
            if top <= 0:
                continue
            counts = torch.histc(v, bins=bins, min=0.0, max=top)
            out[i] = {"edges": [top * b / bins for b in range(bins + 1)], "counts": [int(x) for x in counts]}
        return out


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
    best, doc, pos, tok = (t.cpu() for t in (scan.best, scan.doc, scan.pos, scan.tok))
    win_act, win_pos = scan.win_act.cpu(), scan.win_pos.cpu()
    cards = []
    for lat in detail:
        ctxs = []
        for c in range(scan.contexts):
            if best[c, lat] <= 0 or doc[c, lat] < 0:
                continue
            acts = {int(p): round(float(a), 4) for p, a in zip(win_pos[c, lat], win_act[c, lat]) if p >= 0}
            ctx = contexts.context(int(doc[c, lat]), int(pos[c, lat]), int(tok[c, lat]), scan.window, acts)
            ctx["activation"] = round(float(best[c, lat]), 4)
            ctxs.append(ctx)
        cards.append(
            {
                "latent": lat,
                "frequency": float(freq[lat]),
                "max": float(mx[lat]),
                "mean": float(mean[lat]),
                "histogram": hists.get(lat),
                **promoted.get(lat, {"promoted": [], "suppressed": []}),
                "contexts": ctxs,
            }
        )
    data = {
        "summary": summary,
        "scanned_tokens": scan.n_tokens,
        "n_latents": scan.n_latents,
        "latents": {
            "frequency": [float(f) for f in freq],
            "max": [round(float(m), 4) for m in mx],
            "mean": [round(float(m), 4) for m in mean],
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
