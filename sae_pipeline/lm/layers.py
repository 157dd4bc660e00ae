"""Layers: the hook names (mi_crow's layer signatures), a layer as one type (``LayerSpec``), its block number, and
resolving LAYER_NUM / LAYER_SIGNATURE to hook names."""

from __future__ import annotations

import re
import types
from dataclasses import dataclass
from typing import Any

from torch import nn

from sae_pipeline.infra.errors import PipelineError

SITE = "post_attention_layernorm"
BLOCK = re.compile(r"_(?:layers|layer|h|blocks|block)_(\d+)(?=_|$)")  # a numbered transformer block in a hook name


def block_index(signature: str) -> int | None:
    """The transformer block a hook name lies in (``..._layers_16_post_attention_layernorm`` -> 16), if any."""
    found = BLOCK.search(signature)
    return int(found.group(1)) if found else None


@dataclass(frozen=True)
class LayerSpec:
    """One hook point of an activation run: its mi_crow signature (the shard subfolder), the module's path in the
    Hugging Face model, its block index when it lies in a numbered block, and the width it produces."""

    signature: str
    d_model: int
    hf_module: str | None = None
    layer_num: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "signature": self.signature,
            "hf_module": self.hf_module,
            "layer_num": self.layer_num,
            "d_model": self.d_model,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> LayerSpec:
        return cls(str(obj["signature"]), int(obj["d_model"]), obj.get("hf_module"), obj.get("layer_num"))


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
    """The original specification's hook points, one per block, where the architecture has them (Llama, Qwen, ...)."""
    return [n for n in names if n.endswith("_" + SITE)]


def block_names(names: list[str]) -> list[str]:
    """Whole transformer blocks, the portable fallback for architectures without post_attention_layernorm."""
    return [n for n in names if (found := BLOCK.search(n)) and found.end() == len(n)]


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


def resolve_layers(names: list[str], settings, n_layers: int | None) -> list[str]:
    """LAYER_SIGNATURE's names if given, else LAYER_NUM's blocks, in the order listed."""
    if settings.layer_signature:
        return [resolve_signature(names, 0, sig, n_layers) for sig in settings.layer_signature]
    return [resolve_signature(names, num, None, n_layers) for num in settings.layer_num]
