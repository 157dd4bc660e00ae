"""The first-letter task's activations: each word after the shared prefix, with the prefix's keys and values reused."""

from __future__ import annotations

import torch

from sae_pipeline.lm.loading import load_language_model
from sae_pipeline.lm.spelling import word_activations

MODULE = "model.layers.2.post_attention_layernorm"
SIGNATURE = "llamaforcausallm_model_layers_2_post_attention_layernorm"


def test_words_after_a_cached_prefix_see_what_a_full_forward_sees(tiny_model, tmp_path):
    lm = load_language_model(str(tiny_model), tmp_path / "store", torch.device("cpu"), torch.float32)
    prefix, words = [1, 40, 41, 42, 43, 44, 45], [50, 51, 52, 53, 54]
    got = word_activations(lm, SIGNATURE, "output", prefix, words, torch.device("cpu"), batch_size=2)

    seen = []
    module = dict(lm.model.named_modules())[MODULE]
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out[:, -1].detach()))
    with torch.inference_mode():
        lm.model(input_ids=torch.tensor([prefix + [w] for w in words]))
    handle.remove()
    assert got.shape == (len(words), seen[0].shape[1])
    torch.testing.assert_close(got, seen[0], rtol=1e-4, atol=1e-5)
