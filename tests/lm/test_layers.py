"""layers.py: mi_crow hook names without weights, LAYER_NUM / LAYER_SIGNATURE resolution, and discover_layers.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.layers import block_names, layer_names, resolve_signature, site_names
from sae_pipeline.lm.loading import hidden_size, load_config, num_layers
from sae_pipeline.steps.discover import meta_model
from tests.helpers import run_script

SITE = "post_attention_layernorm"
LLAMA_SITES = [f"llamaforcausallm_model_layers_{i}_{SITE}" for i in range(4)]
GPT2_BLOCKS = [f"gpt2lmheadmodel_transformer_h_{i}" for i in range(2)]


@pytest.fixture(scope="module")
def gpt2_model(tiny_model, tmp_path_factory) -> Path:
    """A non-Llama model: tiny random GPT-2 (no post_attention_layernorm), with the tiny model's tokenizer."""
    out = tmp_path_factory.mktemp("tiny_gpt2")
    tok = AutoTokenizer.from_pretrained(tiny_model)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=len(tok), n_positions=128, bos_token_id=1, eos_token_id=2
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        GPT2LMHeadModel(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def llama_names(tiny_model) -> list[str]:
    return layer_names(meta_model(AutoConfig.from_pretrained(tiny_model)))


@pytest.fixture(scope="module")
def gpt2_names(gpt2_model) -> list[str]:
    return layer_names(meta_model(AutoConfig.from_pretrained(gpt2_model)))


# ---------------------------------------------------------------------------------------------------- names


def test_meta_model_has_no_weights(tiny_model):
    model = meta_model(AutoConfig.from_pretrained(tiny_model))
    assert all(p.device.type == "meta" for p in model.parameters())


def test_llama_names(llama_names):
    assert len(llama_names) == 58  # mi_crow's count for a 4-layer Llama (notes/mi_crow.md section 2)
    assert site_names(llama_names) == LLAMA_SITES
    assert block_names(llama_names) == [f"llamaforcausallm_model_layers_{i}" for i in range(4)]
    assert "llamaforcausallm_lm_head" in llama_names and "llamaforcausallm_model_norm" in llama_names


def test_gpt2_names(gpt2_names):
    assert site_names(gpt2_names) == []
    assert block_names(gpt2_names) == GPT2_BLOCKS
    assert "gpt2lmheadmodel_transformer_h_0_mlp" in gpt2_names


@pytest.mark.parametrize("which", ["llama", "gpt2"])
def test_meta_names_match_the_loaded_language_model(which, tiny_model, gpt2_model, tmp_path):
    """What discover shows without weights is exactly what mi_crow's LanguageModel will accept."""
    from mi_crow.language_model.language_model import LanguageModel
    from mi_crow.store.local_store import LocalStore

    path = tiny_model if which == "llama" else gpt2_model
    lm = LanguageModel.from_huggingface(str(path), store=LocalStore(base_path=tmp_path / "store"), device="cpu")
    assert layer_names(meta_model(AutoConfig.from_pretrained(path))) == lm.layers.get_layer_names()


# ---------------------------------------------------------------------------------------------------- resolve


@pytest.mark.parametrize("num", [0, 1, 2, 3])
def test_layer_num_in_range(llama_names, num):
    assert resolve_signature(llama_names, num, None, 4) == LLAMA_SITES[num]


@pytest.mark.parametrize("num", [4, 99])
def test_layer_num_past_the_last_gives_the_range(llama_names, num):
    with pytest.raises(PipelineError) as info:
        resolve_signature(llama_names, num, None, 4)
    msg = str(info.value)
    assert msg.startswith(f"LAYER_NUM={num}") and "4 layers" in msg and "0..3" in msg and "\n" not in msg


def test_layer_num_without_a_layer_count_still_fails_cleanly(llama_names):
    with pytest.raises(PipelineError) as info:
        resolve_signature(llama_names, 7, None, None)
    assert "LAYER_NUM=7" in str(info.value) and LLAMA_SITES[0] in str(info.value)


def test_layer_signature_overrides_layer_num(llama_names):
    sig = "llamaforcausallm_model_layers_1_mlp_down_proj"
    assert resolve_signature(llama_names, 99, sig, 4) == sig  # LAYER_NUM is ignored, even out of range


def test_unknown_signature_lists_similar_names(llama_names):
    with pytest.raises(PipelineError) as info:
        resolve_signature(llama_names, 2, "mlp_down", 4)
    msg = str(info.value)
    assert msg.startswith("LAYER_SIGNATURE='mlp_down' is not a hook name")
    for i in range(4):
        assert f"llamaforcausallm_model_layers_{i}_mlp_down_proj" in msg
    assert "self_attn" not in msg


def test_unknown_signature_without_similar_names_lists_the_sites(llama_names):
    with pytest.raises(PipelineError) as info:
        resolve_signature(llama_names, 2, "nonsense_xyz", 4)
    assert all(s in str(info.value) for s in LLAMA_SITES)


def test_long_lists_are_shortened(llama_names):
    with pytest.raises(PipelineError) as info:
        resolve_signature(llama_names, 2, "layers", 4)  # matches ~50 names
    assert "in all)" in str(info.value) and len(str(info.value)) < 2000


def test_non_llama_layer_num_lists_block_names(gpt2_names):
    with pytest.raises(PipelineError) as info:
        resolve_signature(gpt2_names, 1, None, 2)
    msg = str(info.value)
    assert "LAYER_NUM=1" in msg and "LAYER_SIGNATURE" in msg
    assert all(b in msg for b in GPT2_BLOCKS)


def test_non_llama_block_signature_resolves(gpt2_names):
    assert resolve_signature(gpt2_names, 0, GPT2_BLOCKS[1], 2) == GPT2_BLOCKS[1]


def test_non_llama_unknown_signature_lists_block_names(gpt2_names):
    with pytest.raises(PipelineError) as info:
        resolve_signature(gpt2_names, 0, "zzz", 2)
    assert all(b in str(info.value) for b in GPT2_BLOCKS)


def test_config_sizes(tiny_model, gpt2_model):
    assert (num_layers(load_config(str(tiny_model))), hidden_size(load_config(str(tiny_model)))) == (4, 64)
    assert (num_layers(load_config(str(gpt2_model))), hidden_size(load_config(str(gpt2_model)))) == (2, 32)


# ------------------------------------------------------------------------------------------------ discover_layers.py


def _discover(env, model: Path, *args: str):
    env = {**env, "MODEL_ID": str(model)}
    res = run_script("discover_layers.py", env, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res.stdout


@pytest.mark.parametrize("load", [False, True], ids=["config", "load"])
def test_discover_llama(pipeline_env, tiny_model, load):
    out = _discover(pipeline_env, tiny_model, *(["--load"] if load else []))
    assert "LlamaForCausalLM" in out
    assert "layers:       4" in out
    assert "hidden size:  64" in out
    assert "LAYER_NUM=2" in out
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed == LLAMA_SITES
    assert ("(4, from the loaded model)" if load else "(4, from the config, no weights loaded)") in out
    assert not Path(pipeline_env["STORE_DIR"]).exists()  # discovering writes nothing to the store


@pytest.mark.parametrize("load", [False, True], ids=["config", "load"])
def test_discover_non_llama(pipeline_env, gpt2_model, load):
    out = _discover(pipeline_env, gpt2_model, *(["--load"] if load else []))
    assert "GPT2LMHeadModel" in out
    assert "layers:       2" in out
    assert "hidden size:  32" in out
    assert "no post_attention_layernorm" in out
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert listed == GPT2_BLOCKS
    assert f"LAYER_SIGNATURE={GPT2_BLOCKS[1]}" in out
    assert "LAYER_NUM=" not in out, "LAYER_NUM only selects post_attention_layernorm hooks, absent here"
    assert ("(2, from the loaded model)" if load else "(2, from the config, no weights loaded)") in out


def test_discover_all_lists_every_hook_name(pipeline_env, tiny_model):
    out = _discover(pipeline_env, tiny_model, "--all")
    listed = [line.strip() for line in out.splitlines() if line.startswith("  ")]
    assert set(LLAMA_SITES) < set(listed)
    assert "llamaforcausallm_model_layers_2_mlp_down_proj" in listed and "llamaforcausallm_lm_head" in listed


@pytest.mark.parametrize("model_id", ["/no/such/model/dir", "not a hub id!"])
def test_discover_bad_model_id(pipeline_env, model_id):
    res = run_script("discover_layers.py", {**pipeline_env, "MODEL_ID": model_id})
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: MODEL_ID={model_id!r}"), res.stderr[-2000:]
