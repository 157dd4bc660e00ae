"""The tiny offline model must look like Bielik to the pipeline: same special ids, left padding with EOS."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from sae_pipeline.demo.tiny_model import build_tiny_llama, load_sample_texts


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("tiny"), load_sample_texts(), num_layers=3, hidden_size=32)


def test_sample_corpus_has_text_and_blanks():
    texts = load_sample_texts()
    non_empty = [t for t in texts if t.strip()]
    assert len(non_empty) >= 300
    assert len(texts) - len(non_empty) >= 1
    assert any(ch in "".join(non_empty) for ch in "ąćęłńóśźż")


def test_tokenizer_left_pads_with_eos_and_prepends_bos(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 2)
    assert tok.padding_side == "left"
    enc = tok(["a", "dłuższy tekst po polsku"], padding=True)
    for ids, mask in zip(enc["input_ids"], enc["attention_mask"]):
        first = mask.index(1)
        assert all(i == 2 for i in ids[:first])
        assert mask[:first] == [0] * first and all(mask[first:])
        assert ids[first] == 1
    assert enc["attention_mask"][0][0] == 0  # the short text really was padded


def test_polish_diacritics_round_trip(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Zażółć gęślą jaźń, ŹRÓDŁO ŁĄKI."
    ids = tok(text)["input_ids"]
    assert 0 not in ids  # byte-level BPE never needs <unk>
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_model_loads_as_llama_with_requested_sizes(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert isinstance(model, LlamaForCausalLM)
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size) == (3, 32)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (1, 2, 2)
    assert cfg.vocab_size == len(tok)
    assert cfg.max_position_embeddings >= 2048 and not cfg.tie_word_embeddings
    batch = tok(["krótki", "trochę dłuższy tekst"], padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True)
    assert len(out.hidden_states) == 4 and out.hidden_states[-1].shape[-1] == 32


def test_same_seed_gives_identical_weights(tmp_path):
    texts = load_sample_texts()
    a = load_file(build_tiny_llama(tmp_path / "a", texts, seed=7) / "model.safetensors")
    b = load_file(build_tiny_llama(tmp_path / "b", texts, seed=7) / "model.safetensors")
    c = load_file(build_tiny_llama(tmp_path / "c", texts, seed=8) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
