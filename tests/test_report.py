"""The feature browser's pieces: the latent scan, contexts from provenance, the HTML (also in a real Chromium)."""

from __future__ import annotations

import html
import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from sae_pipeline.plots import plot_firing_frequency
from sae_pipeline.report import ContextSource, LatentScan, browser_data, render_html, write_browser
from tests.eval_fixtures import artifacts_dir, chromium, console_errors, run_chromium  # noqa: F401  (fixture)

POLISH = "Zażółć gęślą jaźń. Źdźbło trawy </script><b>nie</b> & ćma"


def synthetic(n=300, L=20, docs_of=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.relu(torch.randn(n, L, generator=gen)) * (torch.rand(n, L, generator=gen) < 0.2)
    rows = torch.arange(n)
    prov = torch.stack([rows // docs_of, rows % docs_of, torch.full((n,), 5)], dim=1).int()
    return z, prov


@pytest.mark.parametrize("chunk", [300, 64, 7])
def test_scan_matches_brute_force_whatever_the_chunking(chunk):
    z, prov = synthetic()
    W, C = 3, 4
    scan = LatentScan(20, C, W)
    for s in range(0, 300, chunk):
        e = min(300, s + chunk)
        a, b = max(0, s - W), min(300, e + W)
        scan.update(z[a:b], prov[a:b], s - a, e - a)
    assert scan.n_tokens == 300
    assert torch.equal(scan.counts, (z > 0).sum(0))
    assert torch.allclose(scan.max, z.max(0).values)
    top = z.topk(C, dim=0)
    assert torch.allclose(scan.best.clamp_min(0), top.values)
    for lat in range(20):
        for c in range(C):
            if top.values[c, lat] <= 0:
                assert scan.doc[c, lat] == -1
                continue
            row = int(scan.doc[c, lat]) * 16 + int(scan.pos[c, lat])
            assert z[row, lat] == scan.best[c, lat]
            for off, (p, act) in enumerate(zip(scan.win_pos[c, lat], scan.win_act[c, lat])):
                r = row + off - W
                same_doc = 0 <= r < 300 and r // 16 == row // 16
                assert (p >= 0) == same_doc  # neighbours from another document are never shown
                if same_doc:
                    assert p == r % 16 and act == z[r, lat]
    hist = scan.histograms([0])[0]
    assert sum(hist["counts"]) == int((z[:, 0] > 0).sum()) and hist["edges"][-1] == pytest.approx(float(z[:, 0].max()))


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
    z, prov = synthetic(L=n_latents)
    scan = LatentScan(n_latents, 3, 4)
    scan.update(z, prov, 0, 300)
    texts = [POLISH] * 20
    prov_ids = tok(POLISH, truncation=True, max_length=16)["input_ids"]
    scan.tok.copy_(torch.where(scan.doc >= 0, torch.tensor(prov_ids)[scan.pos.clamp(0, len(prov_ids) - 1)], -1))
    src = ContextSource(None, {"max_length": 16}, tok, texts=texts)
    promoted = {0: {"promoted": [["ż", 1.5], ["</script>", 1.0]], "suppressed": [["ą", -1.0]]}}
    summary = {
        "sae_run_id": "sae_test",
        "downstream": {"ce_clean": 1.0, "ce_sae": 1.2, "ce_loss_recovered": None},
        "reconstruction": {"fvu": 0.3, "never_fired_fraction": 0.1},
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
    assert console_errors(res.stderr) == []
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
