"""model.py: DEVICE and dtype resolution, MODEL_ID checks, and loading the model through mi_crow."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig

from sae_pipeline.demo import smollm2
from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm import loading as model_mod
from sae_pipeline.lm.layers import layer_names
from sae_pipeline.lm.loading import (
    check_model_id,
    ensure_pad_token,
    hidden_size,
    is_out_of_memory,
    load_config,
    load_language_model,
    model_source,
    num_layers,
    resolve_device,
    resolve_dtype,
)
from sae_pipeline.steps.discover import meta_model


@pytest.fixture
def no_cuda(monkeypatch):
    """Whatever this machine has, behave as a machine without CUDA."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


# ---------------------------------------------------------------------------------------------------- device


@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_names_device(no_cuda, name):
    with pytest.raises(PipelineError) as info:
        resolve_device(name)
    msg = str(info.value)
    assert msg.startswith(f"DEVICE={name!r}") and "CUDA is not available" in msg and "DEVICE=cpu" in msg


def test_cuda_index_past_the_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(PipelineError, match=r"DEVICE='cuda:1' but only 1 CUDA device"):
        resolve_device("cuda:1")


def test_auto_picks_cuda_only_when_present(monkeypatch, no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"


def test_cpu_and_missing_mps(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(PipelineError, match=r"DEVICE='mps'"):
        resolve_device("mps")


# ---------------------------------------------------------------------------------------------------- dtype


def _config(dtype=None) -> LlamaConfig:
    cfg = LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    cfg.dtype = dtype
    return cfg


@pytest.mark.parametrize(
    "setting, expected", [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.float32)]
)
def test_explicit_dtype_wins(setting, expected):
    for device in (torch.device("cpu"), torch.device("cuda")):
        assert resolve_dtype(setting, device, _config(torch.bfloat16)) is expected


def test_auto_is_float32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu"), _config(torch.bfloat16)) is torch.float32


@pytest.mark.parametrize(
    "stored, expected",
    [
        (torch.bfloat16, torch.bfloat16),
        ("bfloat16", torch.bfloat16),
        ("float16", torch.float16),
        (None, torch.float32),
        ("int8", torch.float32),
    ],
)
def test_auto_on_gpu_is_the_checkpoint_dtype(stored, expected):
    assert resolve_dtype("auto", torch.device("cuda", 0), _config(stored)) is expected


# ---------------------------------------------------------------------------------------------------- MODEL_ID


@pytest.mark.parametrize(
    "model_id",
    ["/no/such/model", "./missing/model/dir", "../x/y/z", "bad id with spaces", "org/name/extra", "a--b/c", "org/"],
)
def test_model_id_neither_dir_nor_hub_id(model_id):
    with pytest.raises(PipelineError) as info:
        check_model_id(model_id)
    msg = str(info.value)
    assert msg.startswith(f"MODEL_ID={model_id!r}") and "hub id" in msg and "\n" not in msg


@pytest.mark.parametrize("model_id", ["speakleash/Bielik-1.5B-v3.0-Instruct", "gpt2", "org/model.v2_x-y"])
def test_valid_hub_ids_pass_the_check(model_id):
    check_model_id(model_id)  # no network needed: only the form is checked


def test_existing_folder_without_config(tmp_path):
    with pytest.raises(PipelineError, match=r"MODEL_ID=.*without config.json"):
        check_model_id(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(PipelineError, match=r"MODEL_ID=.*without config.json"):
        check_model_id(str(f))


def test_local_model_dir_passes(tiny_model):
    check_model_id(str(tiny_model))
    cfg = load_config(str(tiny_model))
    assert (num_layers(cfg), hidden_size(cfg)) == (4, 64)


def test_sizes_of_other_config_spellings():
    assert num_layers(types.SimpleNamespace(n_layer=3)) == 3
    assert num_layers(types.SimpleNamespace(num_layers=5)) == 5
    assert hidden_size(types.SimpleNamespace(d_model=7)) == 7
    assert num_layers(types.SimpleNamespace()) is None and hidden_size(types.SimpleNamespace()) is None


# ---------------------------------------------------------------------------------------------------- loading


def test_load_language_model_on_cpu(tiny_model, tmp_path):
    lm = load_language_model(str(tiny_model), tmp_path / "store", torch.device("cpu"), torch.float32)
    assert not lm.model.training
    assert next(lm.model.parameters()).dtype is torch.float32
    assert lm.layers.get_layer_names() == layer_names(meta_model(load_config(str(tiny_model))))
    tok = lm.tokenizer
    assert (tok.bos_token_id, tok.pad_token_id, tok.padding_side) == (1, 2, "left")


def test_load_language_model_in_bf16(tiny_model, tmp_path):
    lm = load_language_model(str(tiny_model), tmp_path / "store", torch.device("cpu"), torch.bfloat16)
    assert next(lm.model.parameters()).dtype is torch.bfloat16


def test_load_error_is_one_line_naming_model_id(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')  # no weights, no tokenizer
    with pytest.raises(PipelineError) as info:
        load_language_model(str(folder), tmp_path / "store", torch.device("cpu"), torch.float32)
    assert str(info.value).startswith(f"MODEL_ID={str(folder)!r} could not be loaded")
    assert "\n" not in str(info.value)


def test_ensure_pad_token(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.pad_token = None
    ensure_pad_token(tok)
    assert tok.pad_token_id == tok.eos_token_id == 2
    bare = types.SimpleNamespace(pad_token_id=None, eos_token=None)
    with pytest.raises(PipelineError, match="neither a pad nor an EOS"):
        ensure_pad_token(bare)


def test_load_error_helper_uses_the_cause():
    inner = OSError("401 gated repo\nmore detail")
    outer = RuntimeError("wrapper")
    outer.__cause__ = inner
    err = model_mod._load_error("org/x", outer)
    assert "401 gated repo" in str(err) and "more detail" not in str(err) and "HF_TOKEN" in str(err)


def test_out_of_memory_is_recognised_through_mi_crow_hook_wrappers():
    """mi_crow re-raises an error in a detector as RuntimeError, then as its HookError: the OOM is still found."""
    from mi_crow.hooks.hook import HookError

    def detector():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        try:
            try:
                detector()
            except Exception as exc:
                raise RuntimeError("Error in detector x process_activations") from exc
        except Exception as exc:
            raise HookError("x", "forward", exc) from exc
    except HookError as wrapped:
        assert is_out_of_memory(wrapped)
    assert not is_out_of_memory(RuntimeError("shape mismatch")) and not is_out_of_memory(None)


# ---------------------------------------------------------------------------------------------------- GGUF files


def test_gguf_file_is_a_valid_model_id_and_a_missing_one_is_named():
    gguf = smollm2.gguf_path()
    check_model_id(str(gguf))
    assert model_source(str(gguf)) == (str(gguf.parent), {"gguf_file": gguf.name})
    assert model_source("org/name") == ("org/name", {})
    with pytest.raises(
        PipelineError, match=r"^MODEL_ID='/no/such/model\.gguf' names a \.gguf file that does not exist$"
    ):
        check_model_id("/no/such/model.gguf")


def test_gguf_without_the_gguf_package_says_what_to_install(monkeypatch):
    gguf = str(smollm2.gguf_path())
    monkeypatch.setitem(sys.modules, "gguf", None)  # what Python does for a package that is not installed
    for call in (check_model_id, load_config):
        with pytest.raises(PipelineError) as info:
            call(gguf)
        msg = str(info.value)
        assert msg.startswith(f"MODEL_ID={gguf!r} is a GGUF file") and "pip install gguf" in msg and "\n" not in msg


def test_gguf_loads_dequantised_like_its_converted_folder(smollm2_model, tmp_path):
    """MODEL_ID=<file>.gguf through the real loader, against the model folder converted from it (bf16 weights)."""
    gguf = str(smollm2.gguf_path())
    cfg = load_config(gguf)
    assert (num_layers(cfg), hidden_size(cfg), cfg.num_key_value_heads, cfg.vocab_size) == (30, 576, 3, 49152)
    from_gguf = load_language_model(gguf, tmp_path / "store", torch.device("cpu"), torch.float32)
    from_folder = load_language_model(str(smollm2_model), tmp_path / "store", torch.device("cpu"), torch.float32)
    assert from_gguf.layers.get_layer_names() == from_folder.layers.get_layer_names()
    text = "The quick brown fox jumps over the lazy dog near the river."
    ids = from_gguf.tokenizer(text, return_tensors="pt")["input_ids"]
    assert torch.equal(ids, from_folder.tokenizer(text, return_tensors="pt")["input_ids"])
    tok = from_folder.tokenizer
    assert (tok.padding_side, tok.pad_token, tok.eos_token, tok.bos_token_id in ids[0].tolist()) == (
        "right",
        "<|im_end|>",
        "<|im_end|>",
        False,
    )
    with torch.inference_mode():
        ce = [float(m.model(input_ids=ids, labels=ids).loss) for m in (from_gguf, from_folder)]
    assert 3.0 < ce[0] < 5.0  # a trained model: log(49152) = 10.8 would be chance
    assert ce[1] == pytest.approx(ce[0], abs=0.02)  # bf16 rounding of the dequantised weights only


def test_converted_folder_is_an_ordinary_model_written_once(smollm2_model):
    from safetensors import safe_open
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(smollm2_model)
    assert getattr(cfg, "quantization_config", None) is None and cfg.tie_word_embeddings
    with safe_open(smollm2_model / "model.safetensors", "pt") as f:
        assert "lm_head.weight" not in f.keys()  # tied to the embedding, stored once
        assert f.get_tensor("model.embed_tokens.weight").dtype is torch.bfloat16
    stamp = (smollm2_model / "model.safetensors").stat().st_mtime_ns
    assert smollm2.model_folder(smollm2_model.parent) == smollm2_model  # the cached folder, not a new conversion
    assert (smollm2_model / "model.safetensors").stat().st_mtime_ns == stamp
    assert not [p for p in smollm2_model.parent.iterdir() if p.name.startswith(".")]  # no temporary left


def test_missing_smollm2_package_is_named(monkeypatch):
    monkeypatch.setattr(smollm2, "PACKAGE", "llm-no-such-package")
    with pytest.raises(PipelineError, match=r"pip install llm-no-such-package"):
        smollm2.gguf_path()
