"""The feature browser's pieces: the latent scan, contexts from provenance, the HTML (also in a real Chromium)."""

from __future__ import annotations

import html
import json
import math
import re

import pytest
import torch
from transformers import AutoTokenizer

from sae_pipeline.outputs.browser import ContextSource, browser_data, render_html, write_browser
from sae_pipeline.outputs.plots import plot_firing_frequency
from sae_pipeline.sae.scan import LatentScan
from tests.eval_fixtures import artifacts_dir, chromium, console_errors, open_page, run_chromium  # noqa: F401

POLISH = "Zażółć gęślą jaźń. Źdźbło trawy </script><b>nie</b> & ćma"
WHITESPACE_TOKENS = [[" ", 1.4], ["\n", 1.3], ["        ", 1.2], [" the", 1.1], ["\u200b", 0.9], ["\t", 0.8]]


def synthetic(n=300, L=20, docs_of=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, L, generator=gen)) * (torch.rand(n, L, generator=gen) < 0.2)
    rows = torch.arange(n)
    prov = torch.stack([rows // docs_of, rows % docs_of, torch.full((n,), 5)], dim=1).int()
    return z, prov


def scanned(z, prov, chunk, window=3, contexts=4):
    """A scan fed the way step 3 feeds it: chunks with ``window`` neighbour rows either side."""
    n = z.shape[0]
    scan = LatentScan(z.shape[1], contexts, window)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        a, b = max(0, s - window), min(n, e + window)
        scan.update(z[a:b], prov[a:b], s - a, e - a)
    return scan


@pytest.mark.parametrize("chunk", [300, 64, 7])
def test_scan_matches_brute_force_whatever_the_chunking(chunk):
    z, prov = synthetic()
    W, C = 3, 4
    scan = scanned(z, prov, chunk, W, C)
    assert scan.n_tokens == 300
    assert torch.equal(scan.counts, (z > 0).sum(0))
    assert torch.allclose(scan.max, z.max(0).values)
    for lat in range(20):
        col = z[:, lat]
        expected = sorted(((-float(v), r) for r, v in enumerate(col) if v > 0))[:C]
        assert scan.top(lat, C) == [(r, -v) for v, r in expected]  # largest first, ties by row
        for row, value in scan.top(lat, C):
            assert scan.provenance(row) == tuple(prov[row].tolist()) and col[row] == value
            acts = scan.window_acts(lat, row, W)
            same_doc = [r for r in range(row - W, row + W + 1) if 0 <= r < 300 and r // 16 == row // 16]
            assert acts == {r % 16: round(float(col[r]), 4) for r in same_doc}  # never another document's tokens
    hist = scan.histograms([0])[0]
    assert sum(hist["counts"]) == int((z[:, 0] > 0).sum()) and hist["edges"][-1] == pytest.approx(float(z[:, 0].max()))


def test_quantile_samples_come_from_each_quartile_and_skip_the_top():
    z, prov = synthetic(n=2000, L=3, seed=1)
    scan = scanned(z, prov, 512)
    col = z[:, 0]
    values = col[col > 0].sort().values
    top = {row for row, _ in scan.top(0, 10)}
    bands = scan.quantile_samples(0, top)
    assert [b["quantiles"] for b in bands] == [[0.0, 0.25], [0.25, 0.5], [0.5, 0.75], [0.75, 1.0]]
    n = len(values)
    for q, band in enumerate(bands):
        lo, hi = values[q * n // 4], values[(q + 1) * n // 4 - 1]
        assert band["range"] == [float(lo), float(hi)]
        assert len(band["examples"]) == 3
        for row, value in band["examples"]:
            assert lo <= value <= hi and col[row] == value and row not in top
    assert bands == scan.quantile_samples(0, top)  # seeded: the same page every time
    assert bands[0]["range"][1] < 0.5 * float(values[-1])  # the lower quartiles really are low activations


def test_detail_latents_spread_over_the_frequency_decades():
    n_tokens, n_latents = 100_000, 60
    # latent i fires on `fires[i]` of the 1e5 tokens: ten latents in each decade 1e-5 .. >= 0.1, ten never
    fires = [0] * 10 + [10**d * (1 + i % 9) for d in range(5) for i in range(10)]
    z = torch.zeros(n_tokens, n_latents)
    for lat, k in enumerate(fires):
        z[torch.arange(k) * (n_tokens // max(k, 1)), lat] = 1.0 + lat  # k evenly spaced tokens
    prov = torch.stack([torch.arange(n_tokens) // 50, torch.arange(n_tokens) % 50, torch.zeros(n_tokens)], 1).int()
    scan = scanned(z, prov, 8192)
    freq = scan.frequency()
    picked = scan.detail_latents(10)
    decades = [math.floor(math.log10(float(freq[i]))) for i in picked]
    assert sorted(set(decades)) == [-5, -4, -3, -2, -1] and all(decades.count(d) == 2 for d in set(decades))
    assert decades == sorted(decades, reverse=True)  # most frequent decade first
    assert all(fires[i] > 0 for i in picked)
    assert sorted(scan.detail_latents(1000)) == [i for i in range(n_latents) if fires[i] > 0]
    assert scan.detail_latents(3) != sorted(range(n_latents), key=lambda i: -fires[i])[:3]  # not the most frequent


def test_contexts_keep_polish_text_exactly(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    texts = ["Pierwszy dokument.", POLISH]
    ids = tok(POLISH, truncation=True, max_length=64)["input_ids"]
    src = ContextSource(None, {"max_length": 64}, tok, texts=texts)
    ctx = src.context(1, 5, ids[5], window=100, acts={5: 2.0})
    pieces = [t for t, _, special in ctx["tokens"] if not special]
    assert "".join(pieces) == POLISH  # every character once, diacritics intact, nothing lost between tokens
    assert ctx["tokens"][0][2] and ctx["tokens"][0][0] == "<s>"  # BOS shown as a special token
    assert ctx["tokens"][5][1] == 2.0 and ctx["center"] == 5 and not ctx["mismatch"]
    assert src.context(1, 5, ids[5] + 1, 3, {})["mismatch"] and src.mismatches == 1


def fake_browser(tok, n_latents=20, detail=6):
    """Browser data of a synthetic scan whose provenance points at real tokens of the Polish text."""
    ids = tok(POLISH, truncation=True, max_length=16)["input_ids"]
    z, prov = synthetic(L=n_latents)
    prov[:, 1] = prov[:, 1] % len(ids)
    prov[:, 2] = torch.tensor(ids)[prov[:, 1].long()]
    scan = LatentScan(n_latents, 3, 4)
    scan.update(z, prov, 0, 300)
    src = ContextSource(None, {"max_length": 16}, tok, texts=[POLISH] * 20)
    promoted = {
        i: {"promoted": [["ż", 1.5], ["</script>", 1.0], *WHITESPACE_TOKENS], "suppressed": [["ą", -1.0]]}
        for i in range(n_latents)
    }
    summary = {
        "sae_run_id": "sae_test",
        "downstream": {
            "ce_clean": 1.0,
            "ce_sae": 1.2,
            "ce_loss_recovered": None,
            "ce_loss_recovered_reason": "zero ablation changes CE by +0.0001 ± 0.0002: within the noise",
        },
        "reconstruction": {"fvu": 0.3, "l0": 15.98, "n_tokens": 3064},
        "never_fired": {"fraction": 0.06, "latents": 1, "n_latents": n_latents, "tokens": 36831},
        "top_k": 16,
    }
    return browser_data(scan, src, promoted, detail, summary)


def test_html_embeds_the_data_safely(tiny_model, tmp_path):
    data = fake_browser(AutoTokenizer.from_pretrained(tiny_model))
    assert len(data["details"]) == 6 and len(data["latents"]["frequency"]) == 20
    page = render_html(data)
    assert page.count("</script>") == 2  # the text's "</script>" cannot close the data block
    blob = re.search(r'<script id="browser-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(blob) == json.loads(json.dumps(data))
    assert "http://" not in page and "https://" not in page  # nothing fetched from the network
    png = plot_firing_frequency(torch.tensor([0.0, 0.1, 0.01, 0.001]), tmp_path / "f.png")
    html_path, js_path = write_browser(data, tmp_path, png)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in html_path.read_text(encoding="utf-8")
    assert json.loads(js_path.read_text(encoding="utf-8"))["details"][0]["latent"] == data["details"][0]["latent"]


def test_the_page_renders_in_chromium(tiny_model, chromium, tmp_path, tmp_path_factory):
    """The real browser runs the page's script: every latent listed, cards drawn, Polish shown, no console error."""
    data = fake_browser(AutoTokenizer.from_pretrained(tiny_model))
    html_path, _ = write_browser(data, tmp_path)
    res = run_chromium(
        chromium, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", html_path.as_uri()
    )
    assert res.returncode == 0, res.stderr[-2000:]
    dom = res.stdout
    assert len(re.findall(r'<tr class="latent-row" data-latent="\d+"', dom)) == 20
    assert len(re.findall(r'<div class="latent-card" id="latent-\d+"', dom)) == 6
    assert 'data-rendered="20"' in dom
    shown = html.unescape(re.sub(r"<[^>]+>", "", dom.split('id="cards"', 1)[1]))
    texts = ["".join(t for t, _, special in c["tokens"] if not special) for d in data["details"] for c in d["contexts"]]
    polish = [t for t in texts if re.search("[ąćęłńóśźż]", t, re.I)]
    assert polish and all(t in shown for t in polish)  # diacritics rendered, contexts in one piece
    assert "</script>" in shown  # escaped text shows literally, never as markup
    n_samples = sum(len(b["contexts"]) for d in data["details"] for b in d["samples"])
    cards = dom.split('id="cards"', 1)[1].split("<script", 1)[0]
    assert n_samples > 0 and cards.count('<div class="ctx">') == n_samples + sum(
        len(d["contexts"]) for d in data["details"]
    )
    assert cards.count("random activations from quantiles") == sum(len(d["samples"]) for d in data["details"])
    assert re.search(r'id="recovered-note">No CE-loss recovered: zero ablation changes CE by \+0\.0001', dom)
    assert console_errors(res.stderr) == []
    # any latent of the list opens, also one without a card
    other = next(
        i for i in range(20) if i not in {d["latent"] for d in data["details"]} and data["latents"]["contexts"][i]
    )
    opened = run_chromium(chromium, tmp_path / "profile", "--dump-dom", html_path.as_uri() + f"#open-{other}").stdout
    card = opened.split('id="opened-latent"', 1)[1].split("<h2>", 1)[0]
    assert f'data-latent="{other}"' in card and card.count('<div class="ctx">') == len(
        data["latents"]["contexts"][other]
    )
    # the check above can fail: the same page with a broken script is caught
    broken = tmp_path / "broken.html"
    broken.write_text(html_path.read_text(encoding="utf-8").replace("renderCards();", "renderCardz();"), "utf-8")
    bad = run_chromium(
        chromium, tmp_path / "profile", "--enable-logging=stderr", "--v=0", "--dump-dom", broken.as_uri()
    )
    assert console_errors(bad.stderr), bad.stderr[-2000:]
    shot = artifacts_dir(tmp_path_factory) / "feature_browser_synthetic.png"
    run_chromium(chromium, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1280,2000", html_path.as_uri())
    assert shot.is_file() and shot.stat().st_size > 10_000


def test_the_page_is_usable_in_chromium(tiny_model, chromium, tmp_path):
    """Driven as a user would: invisible tokens are visible symbols that stay inside their card, a click anywhere on
    a row of the list opens that latent's full card, the page says it is English, and L0 and the never-fired figure
    read as the terminal prints them."""
    data = fake_browser(AutoTokenizer.from_pretrained(tiny_model))
    html_path, _ = write_browser(data, tmp_path)
    with open_page(chromium, tmp_path / "profile", html_path.as_uri()) as page:
        assert page.evaluate("document.documentElement.lang") == "en"
        chips = page.evaluate("[...document.querySelectorAll('#cards .tokens code')].map((c) => c.textContent)")
        assert len(chips) == 6 * (2 + len(WHITESPACE_TOKENS) + 1)
        assert all(chip.strip() for chip in chips), chips  # no empty box
        assert {"\u2423", "\u21b5", "\u2423" * 8, "\u2423the", "\\u200b", "\u21e5"} <= set(chips)
        overflow = page.evaluate(
            "[...document.querySelectorAll('#cards .latent-card')].flatMap((card) => {"
            " const edge = card.getBoundingClientRect().right;"
            " return [...card.querySelectorAll('.tokens code')].filter((c) => c.getBoundingClientRect().right > edge)"
            "   .map((c) => c.textContent); })"
        )
        assert overflow == []
        summary = page.evaluate("document.getElementById('summary').textContent")
        assert "15.98" in summary and "never fired (on 36,831 stored tokens)6.0% of 20 latents" in summary
        detailed = {d["latent"] for d in data["details"]}
        other = next(i for i in range(20) if i not in detailed and data["latents"]["contexts"][i])
        page.evaluate(f"document.querySelector('tr[data-latent=\\'{other}\\'] td:nth-child(3)').click()")
        page.wait_for(f"document.querySelector('#opened-latent[data-latent=\\'{other}\\']') !== null")
        opened = page.evaluate("document.getElementById('opened-latent').querySelectorAll('.ctx').length")
        assert opened == len(data["latents"]["contexts"][other])
        first = data["details"][0]["latent"]
        page.evaluate(f"document.querySelector('tr[data-latent=\\'{first}\\'] td:nth-child(2)').click()")
        page.wait_for(f"location.hash === '#latent-{first}'")
        assert page.errors == []
