"""SAELens export: ``saelens/cfg.json`` + ``saelens/sae_weights.safetensors`` beside model.pt.

Weights in SAELens' layout: ``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in], ``b_dec`` [d_in].
SAELens' TopK SAE computes ``z = relu(topk(( x - b_dec) @ W_enc + b_enc))`` (``apply_b_dec_to_input=True``) and
``x_hat = z @ W_dec + b_dec``, which is exactly our forward: topk then ReLU keeps the same non-zeros as ReLU then
topk. BatchTopK SAEs are exported the same way (``architecture="topk"``, ``k``) as SAELens does for inference, with
the learned threshold recorded in ``cfg.json`` for readers that want the batch-level rule.
``load_saelens`` / ``saelens_forward`` read the folder with plain safetensors and compute SAELens' formula; the
tests compare them with our model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_pipeline.errors import PipelineError
from sae_pipeline.sae import PipelineSae
from sae_pipeline.store import atomic_save_tensors, atomic_write_json, load_tensors, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"


def saelens_weights(sae: PipelineSae) -> dict[str, torch.Tensor]:
    eng = sae.sae_engine
    w_dec = eng.W_dec.detach().float().cpu()
    return {
        "W_enc": eng.W_enc.detach().float().cpu().T.contiguous(),
        "b_enc": eng.b_enc.detach().float().cpu().clone(),
        "W_dec": (w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)).contiguous(),
        "b_dec": eng.b_dec.detach().float().cpu().clone(),
    }


def export_saelens(
    sae: PipelineSae,
    folder: Path,
    *,
    hook_name: str,
    model_name: str,
    hook_layer: int | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the folder (weights first, cfg.json last: a folder with a cfg.json is complete)."""
    weights = saelens_weights(sae)
    d_sae, d_in = weights["W_dec"].shape
    cfg = {
        "architecture": "topk",
        "d_in": int(d_in),
        "d_sae": int(d_sae),
        "k": sae.k,
        "activation_fn": "topk",
        "activation_fn_kwargs": {"k": sae.k},
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "dtype": "float32",
        "device": "cpu",
        "model_name": model_name,
        "hook_name": hook_name,
        "hook_layer": hook_layer if hook_layer is not None else -1,
        "hook_head_index": None,
        "prepend_bos": True,
        "context_size": None,
        "dataset_path": None,
        "sae_lens_training_version": None,
        "pipeline_architecture": sae.architecture,
        "batchtopk_threshold": float(sae.sae_engine.threshold) if sae.architecture == "batchtopk" else None,
        **(extra or {}),
    }
    folder.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(folder / WEIGHTS_FILE, weights)
    atomic_write_json(folder / CFG_FILE, cfg)
    return folder


def load_saelens(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = read_json(Path(folder) / CFG_FILE)
    weights = load_tensors(Path(folder) / WEIGHTS_FILE)
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - weights.keys()
    if missing:
        raise PipelineError(f"{Path(folder) / WEIGHTS_FILE} lacks {sorted(missing)}; it is not a SAELens export")
    return cfg, weights


def saelens_forward(cfg: dict[str, Any], w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SAELens' TopK formula, written out: (codes, reconstruction)."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    top = pre.topk(int(cfg["k"]), dim=-1)
    z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return z, z @ w["W_dec"] + w["b_dec"]
