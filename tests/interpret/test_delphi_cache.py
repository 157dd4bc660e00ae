"""delphi's latent cache written from stored activations: its format (names, keys, dtypes, shapes, every code of a
full reading at its document and position), then delphi's own loader on it.

eai-delphi cannot be installed beside this project (its vLLM pins another torch), so delphi runs in its own
environment, tests/delphi_env, without vLLM, which its loader does not import."""

from __future__ import annotations

import pytest
import torch
from safetensors.numpy import load_file

from sae_pipeline.demo.tiny_model import load_sample_texts
from sae_pipeline.interpret.delphi_cache import config_of, read_range, split_edges, write_delphi_cache
from sae_pipeline.sae.model import BiasedTopKEngine
from tests.helpers import SAMPLE, run_delphi
from tests.sae_fixtures import LAYER, make_run


def test_the_cache_holds_every_code_of_every_latent_at_its_document_and_position(tmp_path):
    run = make_run(tmp_path / "store")
    torch.manual_seed(0)
    engine = BiasedTopKEngine(32, 64, 4).eval()
    folder = write_delphi_cache(run, run.read_meta(), LAYER, engine, torch.device("cpu"), 10_000, tmp_path / "raw", 0)
    assert folder == tmp_path / "raw" / LAYER
    edges = split_edges(64, 5)
    assert edges[0][0] == 0 and edges[-1][1] == 63 and all(b[0] == a[1] + 1 for a, b in zip(edges, edges[1:]))
    assert sorted(p.name for p in folder.glob("*.safetensors")) == sorted(f"{a}_{b}.safetensors" for a, b in edges)
    shards = [run.read_shard(i, LAYER) for i in sorted(run.completed_shards())]
    codes = torch.cat([engine(x.float())[1] for x, _ in shards]).detach()
    prov = torch.cat([p for _, p in shards]).long()
    rows, lats = codes.nonzero(as_tuple=True)
    expected = {(int(prov[r, 0]), int(prov[r, 1]), int(lat)): float(codes[r, lat]) for r, lat in zip(rows, lats)}
    found = {}
    for start, end in edges:
        raw = load_file(str(folder / f"{start}_{end}.safetensors"))
        assert raw["locations"].dtype.kind == "u" and raw["activations"].dtype.name == "float16"
        assert raw["locations"][:, 2].max() <= end - start  # latents relative to the range's first
        data = read_range(folder / f"{start}_{end}.safetensors")
        for (doc, pos, lat), value in zip(data["locations"].tolist(), data["activations"].tolist()):
            assert start <= lat <= end
            found[(doc, pos, lat)] = value
    assert found.keys() == expected.keys()
    assert all(abs(found[k] - expected[k]) <= 2e-3 * max(1.0, abs(expected[k])) for k in expected)  # float16
    tokens = data["tokens"]
    assert tokens.shape == (int(prov[:, 0].max()) + 1, 16)
    assert torch.equal(tokens[prov[:, 0], prov[:, 1]], prov[:, 2])
    config = config_of(folder)
    assert config["ctx_len"] == 16 and config["model_name"] == "tiny/test-model" and config["n_tokens"] == 2500


def test_delphis_own_loader_yields_our_codes_and_builds_its_examples_from_our_tokens(tmp_path, tiny_model):
    """delphi itself (tests/delphi_env) on the cache: every latent's locations and activations as written, the
    cache's tokens, and its examples: windows of our tokens with our codes, decoded by the model's tokenizer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    text = " ".join(load_sample_texts(SAMPLE))
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:2500])
    run = make_run(tmp_path / "store", token_ids=ids)
    torch.manual_seed(0)
    engine = BiasedTopKEngine(32, 64, 4).eval()
    raw = tmp_path / "raw"
    folder = write_delphi_cache(run, run.read_meta(), LAYER, engine, torch.device("cpu"), 10_000, raw, 2)

    result = run_delphi(raw, tiny_model)

    assert result["delphi_version"] == "0.1.3" and result["modules"] == [LAYER] and result["n_buffers"] == 5
    assert result["cache_config"] == config_of(folder)
    written = [read_range(p) for p in sorted(folder.glob("*.safetensors"))]
    tokens = written[0]["tokens"]
    assert torch.equal(torch.tensor(result["tokens"]), tokens)
    locations = torch.cat([w["locations"] for w in written])
    activations = torch.cat([w["activations"] for w in written]).float()
    firing = sorted(set(locations[:, 2].tolist()))
    assert sorted(int(k.split("/")[1]) for k in result["latents"]) == firing
    windows = tokens.reshape(-1, 8)
    for latent in firing:
        mine = locations[:, 2] == latent
        theirs = result["latents"][f"{LAYER}/{latent}"]
        assert theirs["locations"] == locations[mine].tolist()
        assert theirs["activations"] == activations[mine].tolist()
        # delphi's examples: each 8-token window where the latent fires, its codes at their positions, strongest first
        expected = {}
        for (doc, pos, _), value in zip(locations[mine].tolist(), activations[mine].tolist()):
            window = (doc * 16 + pos) // 8
            expected.setdefault(window, [0.0] * 8)[(doc * 16 + pos) % 8] = value
        record = result["records"][f"{LAYER}/{latent}"]
        examples = sorted((tuple(t), tuple(a)) for t, a in record["examples"])
        assert examples == sorted((tuple(windows[w].tolist()), tuple(a)) for w, a in expected.items())
        assert [max(a) for _, a in record["examples"]] == sorted((max(a) for a in expected.values()), reverse=True)
        top = record["examples"][0][0]
        assert record["train_str_tokens"][0] == tokenizer.batch_decode(top)
        assert record["per_token_frequency"] == pytest.approx(int(mine.sum()) / tokens.numel())
    assert "".join(result["records"][f"{LAYER}/{firing[0]}"]["train_str_tokens"][0]).strip()
