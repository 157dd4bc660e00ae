"""discover_layers.py: a model's layer count, width and hook names, and which layer to pick."""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoModelForCausalLM, PretrainedConfig

from sae_pipeline.lm.layers import SITE, block_index, block_names, layer_names, site_names
from sae_pipeline.lm.loading import (
    hidden_size,
    load_config,
    load_language_model,
    num_layers,
    resolve_device,
    resolve_dtype,
)


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
        wanted = [n for n in blocks if block_index(n) == middle]
        if wanted:
            print(f"\nsuggested: LAYER_SIGNATURE={wanted[0]} (the middle block; LAYER_NUM only names {SITE} hooks)")
    if not show_all:
        print(f"\nany of the {len(names)} hook names can be given as LAYER_SIGNATURE; --all lists them")
