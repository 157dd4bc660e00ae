"""delphi's latent cache written from stored activations, read back the way delphi's loader reads it
(``TensorBuffer.load``: locations plus the file's first latent) and compared with every code of a full reading.

eai-delphi itself cannot be installed beside this project (its vLLM pins another torch; docs/interpretation.md), so
the files are checked against its documented format: names, keys, dtypes, shapes and values."""

from __future__ import annotations

import torch
from safetensors.numpy import load_file

from sae_pipeline.interpret.delphi_cache import config_of, read_range, split_edges, write_delphi_cache
from sae_pipeline.sae.model import BiasedTopKEngine
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
