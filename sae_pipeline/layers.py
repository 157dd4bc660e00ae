"""Hook names (mi_crow's layer signatures), resolving LAYER_NUM / LAYER_SIGNATURE, and layer discovery."""

from __future__ import annotations

import re
import types

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from sae_pipeline.errors import PipelineError
from sae_pipeline.model import hidden_size, load_config, num_layers

SITE = "post_attention_layernorm"
BLOCK_PATTERN = re.compile(r"_(layers|layer|h|blocks|block)_(\d+)$")


def layer_names(model: nn.Module) -> list[str]:
    """mi_crow's names for every submodule (class name lowercased, dots as underscores), in its own order."""
    from mi_crow.language_model.layers import LanguageModelLayers

    return LanguageModelLayers(types.SimpleNamespace(model=model)).get_layer_names()


def hf_module_path(model: nn.Module, signature: str) -> str | None:
    """The dotted path of the module a hook name stands for (``model.layers.16.post_attention_layernorm``): the
    name Hugging Face, SAELens and TransformerLens users know it by."""
    prefix = type(model).__name__.lower()
    for path, _ in model.named_modules():
        if path and f"{prefix}_{path}".replace(".", "_") == signature:
            return path
    return None


def site_names(names: list[str]) -> list[str]:
    """The seed's hook points, one per block, when the architecture has them (Llama, Mistral, Qwen, ...)."""
    return [n for n in names if n.endswith("_" + SITE)]


def block_names(names: list[str]) -> list[str]:
    """Whole transformer blocks, the portable fallback for architectures without post_attention_layernorm."""
    return [n for n in names if BLOCK_PATTERN.search(n)]


def resolve_signature(names: list[str], layer_num: int, layer_signature: str | None, n_layers: int | None) -> str:
    """LAYER_SIGNATURE if given, else block LAYER_NUM's post_attention_layernorm; misses list what exists."""
    if layer_signature is not None:
        if layer_signature in names:
            return layer_signature
        close = [n for n in names if layer_signature.lower() in n.lower()] or site_names(names) or block_names(names)
        raise PipelineError(
            f"LAYER_SIGNATURE={layer_signature!r} is not a hook name of this model; "
            f"valid names include: {_shorten(close)}"
        )
    if n_layers is not None and layer_num >= n_layers:
        raise PipelineError(
            f"LAYER_NUM={layer_num} is past the last layer: this model has {n_layers} layers, "
            f"so LAYER_NUM must be 0..{n_layers - 1} (middle: {n_layers // 2})"
        )
    wanted = [n for n in site_names(names) if n.endswith(f"_{layer_num}_{SITE}")]
    if len(wanted) == 1:
        return wanted[0]
    available = site_names(names) or block_names(names)
    raise PipelineError(
        f"no {SITE} hook for LAYER_NUM={layer_num} in this model; set LAYER_SIGNATURE to one of: {_shorten(available)}"
    )


def _shorten(names: list[str], limit: int = 12) -> str:
    if not names:
        return "(none; run discover_layers.py --load to list every hook name)"
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def meta_model(config: PretrainedConfig) -> nn.Module:
    """The model's module tree without weights or memory, for naming hooks before a download."""
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def discover(settings, load: bool = False, show_all: bool = False) -> None:
    """Print what a user needs to choose LAYER_NUM / LAYER_SIGNATURE."""
    config = load_config(settings.model_id)
    n_layers, d_model = num_layers(config), hidden_size(config)
    print(f"model:        {settings.model_id}")
    print(f"architecture: {', '.join(getattr(config, 'architectures', None) or [type(config).__name__])}")
    print(f"layers:       {n_layers if n_layers is not None else 'unknown'}")
    print(f"hidden size:  {d_model if d_model is not None else 'unknown'} (d_model of the stored activations)")
    if load:
        from sae_pipeline.model import load_language_model, resolve_device, resolve_dtype

        device = resolve_device(settings.device)
        lm = load_language_model(
            settings.model_id, settings.store_dir, device, resolve_dtype(settings.model_dtype, device, config)
        )
        names, source = lm.layers.get_layer_names(), "the loaded model"
    else:
        names, source = layer_names(meta_model(config)), "the config, no weights loaded"
    sites, blocks = site_names(names), block_names(names)
    middle = n_layers // 2 if n_layers else None
    if show_all:
        print(f"\nall {len(names)} hook names (from {source}):")
        for name in names:
            print(f"  {name}")
    elif sites:
        print(f"\n{SITE} hook names ({len(sites)}, from {source}):")
        for name in sites:
            print(f"  {name}")
    else:
        print(f"\nno {SITE} here; block hook names ({len(blocks)}, from {source}):")
        for name in blocks:
            print(f"  {name}")
    if middle is not None and sites:
        print(f"\nsuggested: LAYER_NUM={middle} (the middle layer)")
    elif middle is not None:
        wanted = [n for n in blocks if BLOCK_PATTERN.search(n) and BLOCK_PATTERN.search(n).group(2) == str(middle)]
        if wanted:
            print(f"\nsuggested: LAYER_SIGNATURE={wanted[0]} (the middle block; LAYER_NUM only names {SITE} hooks)")
    if not show_all:
        print(f"\nany of the {len(names)} hook names can be given as LAYER_SIGNATURE; --all lists them")
