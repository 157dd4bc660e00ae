"""delphi itself on the pipeline's latent cache: its ``LatentDataset`` opens the cache folder, its ``TensorBuffer``
yields every latent's locations and activations, and iterating the dataset builds each latent's examples (windows
of the cache's tokens, decoded by the tokenizer) as delphi's pipeline does before explaining. Prints one JSON
object; the tests judge.

Runs in this folder's environment, not the project's (delphi needs another torch through vLLM):
    uv run --project tests/delphi_env python tests/delphi_env/check_cache.py RAW_DIR [TOKENIZER]
RAW_DIR holds one folder per hookpoint; TOKENIZER (a model folder) defaults to the cache config's ``model_name``,
which delphi loads itself.
"""

from __future__ import annotations

import json
import sys

import delphi
from delphi.config import ConstructorConfig, SamplerConfig
from delphi.latents import LatentDataset
from transformers import AutoTokenizer

EXAMPLE_CTX_LEN = 8  # windows of delphi's examples; must divide the cache's ctx_len


def check(raw_dir: str, tokenizer: str | None) -> dict:
    constructor_cfg = ConstructorConfig(
        example_ctx_len=EXAMPLE_CTX_LEN, min_examples=1, n_non_activating=2, non_activating_source="random"
    )
    sampler_cfg = SamplerConfig(n_examples_train=4, n_examples_test=4, n_quantiles=2, train_type="top")
    tok = AutoTokenizer.from_pretrained(tokenizer) if tokenizer else None
    dataset = LatentDataset(raw_dir, sampler_cfg, constructor_cfg, tokenizer=tok)
    latents = {}
    for buffer in dataset.buffers:
        for data in buffer:
            latents[f"{data.module}/{data.latent.latent_index}"] = {
                "locations": data.activation_data.locations.tolist(),
                "activations": data.activation_data.activations.float().tolist(),
            }
    records = {}
    for record in dataset:
        records[f"{record.latent.module_name}/{record.latent.latent_index}"] = {
            "examples": [[e.tokens.tolist(), e.activations.float().tolist()] for e in record.examples],
            "train_str_tokens": [e.str_tokens for e in record.train],
            "n_test": len(record.test),
            "n_not_active": len(record.not_active),
            "per_token_frequency": record.per_token_frequency,
        }
    return {
        "delphi_version": delphi.__version__,
        "modules": dataset.modules,
        "n_buffers": len(dataset.buffers),
        "cache_config": dataset.cache_config,
        "tokens": dataset.tokens.tolist(),
        "latents": latents,
        "records": records,
    }


if __name__ == "__main__":
    print(json.dumps(check(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else None)), flush=True)
