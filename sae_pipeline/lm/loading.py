"""Loading the language model through mi_crow: device, dtype, and the tokenizer facts capture relies on.

MODEL_ID is a hub id, a model folder, or a ``.gguf`` file (how llama.cpp users keep models): transformers reads a
GGUF file (with the ``gguf`` package) and dequantises it into an ordinary model, so every step works the same on
it. ``save_dequantized`` writes such a file once as a model folder, which later loads in seconds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm import hub

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GGUF_SUFFIX = ".gguf"


def resolve_device(name: str) -> torch.device:
    """DEVICE=auto picks CUDA when present; an explicit device that is missing is a user error, not a fallback."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise PipelineError(f"DEVICE={name!r} but CUDA is not available on this machine; use DEVICE=cpu or auto")
        index = int(name.split(":")[1]) if ":" in name else 0
        if index >= torch.cuda.device_count():
            raise PipelineError(f"DEVICE={name!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if name == "mps" and not torch.backends.mps.is_available():
        raise PipelineError("DEVICE='mps' but MPS is not available on this machine; use DEVICE=cpu or auto")
    return torch.device(name)


def resolve_dtype(setting: str, device: torch.device, config: PretrainedConfig) -> torch.dtype:
    """``auto``: the checkpoint's dtype (bf16 for Bielik) on accelerators, float32 on CPU where bf16 is slow."""
    if setting != "auto":
        return DTYPES[setting]
    if device.type == "cpu":
        return torch.float32
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(stored, str):
        stored = DTYPES.get(stored)
    return stored if isinstance(stored, torch.dtype) else torch.float32


def check_model_id(model_id: str) -> None:
    """A path that exists must be a model folder or a .gguf file; anything else must at least look like a hub id."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    path = Path(model_id).expanduser()
    if path.is_file() and path.suffix.lower() == GGUF_SUFFIX:
        _require_gguf(model_id)
        return
    if path.exists():
        if not (path / "config.json").is_file():
            raise PipelineError(
                f"MODEL_ID={model_id!r} is a path without config.json; give a folder written by save_pretrained, "
                f"a {GGUF_SUFFIX} file or a hub id like org/name"
            )
        return
    if path.suffix.lower() == GGUF_SUFFIX:
        raise PipelineError(f"MODEL_ID={model_id!r} names a {GGUF_SUFFIX} file that does not exist")
    try:
        validate_repo_id(model_id)
    except HFValidationError:
        raise PipelineError(
            f"MODEL_ID={model_id!r} is neither an existing directory, a {GGUF_SUFFIX} file nor a valid hub id "
            "(org/name)"
        ) from None


def _require_gguf(model_id: str) -> None:
    try:
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError:
        raise PipelineError(
            f"MODEL_ID={model_id!r} is a GGUF file, and reading one needs the Python package `gguf`, which is not "
            "installed: run `uv sync` (it is a dependency of this project) or `pip install gguf`"
        ) from None


def model_source(model_id: str) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` takes: a .gguf file is its folder plus ``gguf_file=<name>``; anything else as is."""
    path = Path(model_id).expanduser()
    if path.suffix.lower() == GGUF_SUFFIX and path.is_file():
        return str(path.parent), {"gguf_file": path.name}
    return model_id, {}


def _load_error(model_id: str, exc: BaseException) -> PipelineError:
    cause = exc.__cause__ or exc
    first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
    if Path(model_id).expanduser().exists():
        return PipelineError(f"MODEL_ID={model_id!r} could not be loaded: {first_line}")
    if hub.is_offline():
        return PipelineError(hub.not_cached("MODEL_ID", model_id, "model", "a local model folder or .gguf file"))
    return PipelineError(
        f"MODEL_ID={model_id!r} could not be loaded: not a local directory, and the hub did not "
        f"provide it (offline, a typo, or a gated model needing HF_TOKEN): {first_line}"
    )


def load_config(model_id: str) -> PretrainedConfig:
    check_model_id(model_id)
    source, extra = model_source(model_id)
    try:
        return AutoConfig.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        raise _load_error(model_id, exc) from None


def load_language_model(model_id: str, store_dir: Path, device: torch.device, dtype: torch.dtype):
    """The model straight onto ``device`` in ``dtype`` (mi_crow alone would load on the CPU first)."""
    from mi_crow.language_model.language_model import LanguageModel
    from mi_crow.store.local_store import LocalStore

    source, extra = model_source(model_id)
    model_params = {"dtype": dtype, **extra}
    if device.type == "cuda":
        model_params["device_map"] = str(device)
    try:
        lm = LanguageModel.from_huggingface(
            source,
            store=LocalStore(base_path=store_dir),
            tokenizer_params=dict(extra),
            model_params=model_params,
            device=str(device),
        )
    except (RuntimeError, OSError, ValueError) as exc:
        raise _load_error(model_id, exc) from None
    lm.model.eval()
    ensure_pad_token(lm.tokenizer)
    return lm


def save_dequantized(gguf_file: Path, out_dir: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The model of a .gguf file as an ordinary model folder (weights in ``dtype``, tokenizer, config); kept if done.

    transformers refuses to save a model it loaded from GGUF, so the dequantised weights are copied into a fresh
    model built from the same config (without the GGUF marker) and that is saved. The folder appears complete or
    not at all (written beside it, then renamed).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    check_model_id(str(gguf_file))
    source, extra = model_source(str(gguf_file))
    tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **extra)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config = type(loaded.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from the other users of a shared store
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if not (out_dir / "config.json").is_file():  # another process may have finished first
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> None:
    """Batches need a pad id; which one does not matter because padding is found from the attention mask."""
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise PipelineError("the tokenizer has neither a pad nor an EOS token; cannot batch documents")
        tokenizer.pad_token = tokenizer.eos_token


def is_out_of_memory(exc: BaseException | None) -> bool:
    """A GPU out-of-memory error, also when a hook wrapped it (mi_crow re-raises errors in hooks as its own)."""
    while exc is not None:
        if isinstance(exc, torch.OutOfMemoryError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def num_layers(config: PretrainedConfig) -> int | None:
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None


def hidden_size(config: PretrainedConfig) -> int | None:
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    return None
