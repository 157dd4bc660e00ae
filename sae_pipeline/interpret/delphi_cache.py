"""The SAE's codes over the stored tokens as delphi's latent cache, so delphi's own pipeline can run on them.

delphi's loader (https://github.com/EleutherAI/delphi/blob/3c2e139/delphi/latents/loader.py) reads
``<raw_dir>/<hookpoint>/<start>_<end>.safetensors``, one file per range of latents (``end`` inclusive), each holding::

    locations    int [n, 3]   (sequence, position, latent - start) of every non-zero code of the range
    activations  float16 [n]  the codes
    tokens       int [n_seq, ctx_len]   the token ids of every sequence

and ``<raw_dir>/<hookpoint>/config.json`` (its cache config: ``model_name``, ``ctx_len``, the dataset's fields).
Here a sequence is a document of the activation run and a position its token position (step 1's provenance);
positions capture did not store (padding; special tokens unless KEEP_SPECIAL_TOKENS) hold the pad id and no code.
Each range is one pass over the stored activations, so memory holds one range's codes, never all of them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sae_pipeline.sae.scan import stored_chunks
from sae_pipeline.store.files import atomic_path, atomic_write_json

DEFAULT_SPLITS = 5  # delphi's default n_splits


def split_edges(n_latents: int, n_splits: int) -> list[tuple[int, int]]:
    """(start, end inclusive) of each range, delphi's ``torch.linspace`` boundaries."""
    bounds = torch.linspace(0, n_latents, n_splits + 1).long().tolist()
    return [(a, b - 1) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


@torch.no_grad()
def document_tokens(run, layer: str, d_in: int, max_tokens: int, ctx_len: int, pad_id: int):
    """[n_documents, ctx_len] token ids from the provenance of the stored tokens (the pad id elsewhere), and the
    number of stored tokens read."""
    provs = [prov[lo:hi] for _, prov, lo, hi in stored_chunks(run, layer, d_in, max_tokens)]
    prov = torch.cat(provs).long()
    tokens = torch.full((int(prov[:, 0].max()) + 1, ctx_len), pad_id, dtype=torch.int64)
    tokens[prov[:, 0], prov[:, 1]] = prov[:, 2]
    return tokens, prov.shape[0]


@torch.no_grad()
def write_delphi_cache(
    run, act_meta: dict[str, Any], layer: str, engine, device, max_tokens: int, out_dir: Path, pad_id: int
) -> Path:
    """``out_dir/<layer>/``: every range's safetensors file and config.json (module docstring)."""
    from safetensors.numpy import save_file

    d_in, n_latents = int(engine.W_dec.shape[1]), int(engine.W_dec.shape[0])
    ctx_len = int(act_meta["max_length"])
    folder = out_dir / layer
    tokens, n_tokens = document_tokens(run, layer, d_in, max_tokens, ctx_len, pad_id)
    tokens = tokens.numpy()
    token_dtype = np.uint32 if tokens.max() < 2**32 else np.int64
    for start, end in split_edges(n_latents, DEFAULT_SPLITS):
        locations, values = [], []
        for x, prov, lo, hi in stored_chunks(run, layer, d_in, max_tokens):
            z = engine(x[lo:hi].to(device).float())[1][:, start : end + 1].float().cpu()
            rows, lats = z.nonzero(as_tuple=True)
            p = prov[lo:hi].long()[rows]
            locations.append(torch.stack([p[:, 0], p[:, 1], lats], dim=1))
            values.append(z[rows, lats])
        loc = torch.cat(locations).numpy()
        loc_dtype = np.uint16 if loc.max(initial=0) < 2**16 else np.uint32
        data = {
            "locations": loc.astype(loc_dtype),
            "activations": torch.cat(values).numpy().astype(np.float16),
            "tokens": tokens.astype(token_dtype),
        }
        with atomic_path(folder / f"{start}_{end}.safetensors") as tmp:
            save_file(data, str(tmp))
    ds = act_meta["dataset"]
    config = {
        "model_name": act_meta["model_id"],
        "ctx_len": ctx_len,
        "n_tokens": int(n_tokens),
        "n_splits": DEFAULT_SPLITS,
        "dataset_repo": ds["name"],
        "dataset_split": ds["split"],
        "dataset_name": "",
        "dataset_column": ds["text_field"],
        "hookpoint": layer,
        "note": "sequences are the activation run's documents; positions capture did not store hold the pad id",
    }
    atomic_write_json(folder / "config.json", config)
    return folder


def read_range(path: Path) -> dict[str, torch.Tensor]:
    """What delphi's ``TensorBuffer.load`` makes of one file: locations with absolute latent ids, activations,
    tokens (a reader for tests and users without delphi)."""
    from safetensors.numpy import load_file

    data = load_file(str(path))
    locations = torch.tensor(data["locations"].astype(np.int64))
    locations[:, 2] += int(path.stem.split("_")[0])
    return {
        "locations": locations,
        "activations": torch.tensor(data["activations"]),
        "tokens": torch.tensor(data["tokens"].astype(np.int64)),
    }


def config_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))
