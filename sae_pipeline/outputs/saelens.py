"""SAELens export: ``saelens/cfg.json`` + ``saelens/sae_weights.safetensors``, what SAELens itself writes for the
SAE we trained, in its v6 layout (``metadata`` with ``sae_lens_version``), so ``SAE.load_from_disk`` opens it as is.

* TopK: ``architecture="topk"``, ``k``; weights ``W_enc`` [d_in, d_sae], ``b_enc``, ``W_dec`` [d_sae, d_in] (unit
  rows), ``b_dec``. SAELens computes ``z = relu(topk((x - b_dec) @ W_enc + b_enc))``, ``x_hat = z @ W_dec + b_dec``:
  our forward (top-k then ReLU keeps the non-zeros of ReLU then top-k).
* BatchTopK: saved as **JumpReLU**, as SAELens saves its own BatchTopK SAEs for inference
  (``sae_lens.saes.batchtopk_sae``, ``process_state_dict_for_saving_inference``): ``architecture="jumprelu"`` and a
  ``threshold`` [d_sae] holding the learned global threshold in every entry; SAELens computes
  ``z = relu(pre) * (pre > threshold)``, our inference rule. One whose threshold was never estimated computes
  per-token top-k, and is exported as TopK.
* Matryoshka BatchTopK: the same (SAELens saves its ``MatryoshkaBatchTopKTrainingSAE`` as JumpReLU too); the
  nested widths are kept in ``metadata.training_architecture_details.matryoshka_widths``.
* JumpReLU: ``architecture="jumprelu"`` with the learned ``threshold`` [d_sae]; our inference rule
  ``z = pre * (pre > threshold)`` with thresholds >= 0 is SAELens' ``relu(pre) * (pre > threshold)``.
* ``metadata``: the keys SAELens' trainer writes and SAEBench reads (model_name, hook_name, hook_layer,
  context_size, prepend_bos, exclude_special_tokens, dataset_path, ...) from the activation run's manifest, plus
  how to hook the model (``hook_name`` is the Hugging Face module path, ``hook_side`` which side of it, and
  mi_crow's signature) and our run ids.

``load_saelens`` / ``saelens_forward`` read the folder with plain safetensors and compute SAELens' two formulas;
tests/saelens_env runs SAELens itself on the export.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.sae.architectures import BATCH_TOPK_FAMILY
from sae_pipeline.sae.model import THRESHOLD_EMA, PipelineSae
from sae_pipeline.store.files import atomic_save_tensors, atomic_write_json, load_tensors, read_json

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_VERSION = "6.54.12"  # the SAELens release whose layout is written; tests/saelens_env pins the same one


def saelens_architecture(sae: PipelineSae) -> str:
    """What SAELens calls the model that computes our inference codes."""
    if sae.architecture == "jumprelu":
        return "jumprelu"
    if sae.architecture in BATCH_TOPK_FAMILY and float(sae.sae_engine.threshold) >= 0:
        return "jumprelu"
    return "topk"


def saelens_weights(sae: PipelineSae) -> dict[str, torch.Tensor]:
    eng = sae.sae_engine
    w_dec = eng.W_dec.detach().float().cpu()
    weights = {
        "W_enc": eng.W_enc.detach().float().cpu().T.contiguous(),
        "b_enc": eng.b_enc.detach().float().cpu().clone(),
        "W_dec": (w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)).contiguous(),
        "b_dec": eng.b_dec.detach().float().cpu().clone(),
    }
    if sae.architecture == "jumprelu":
        weights["threshold"] = eng.jump_threshold.detach().float().cpu().clone()
    elif saelens_architecture(sae) == "jumprelu":
        weights["threshold"] = torch.full_like(weights["b_enc"], float(eng.threshold))
    return weights


def saelens_config(
    sae: PipelineSae, layer: LayerSpec, act_meta: dict[str, Any], extra: dict[str, Any] | None = None
) -> dict[str, Any]:
    """cfg.json: SAELens' inference config of the architecture, with the activation run's facts as metadata."""
    architecture = saelens_architecture(sae)
    eng = sae.sae_engine
    details: dict[str, Any] = {"k": sae.k}
    if sae.architecture in BATCH_TOPK_FAMILY:
        details.update(topk_threshold=float(eng.threshold), topk_threshold_lr=THRESHOLD_EMA)
    if sae.architecture == "matryoshka_batchtopk":
        details.update(matryoshka_widths=list(eng.matryoshka_widths))
    if sae.architecture == "jumprelu":
        details = {"target_l0": sae.k, "jumprelu_sparsity_loss_mode": "quadratic"}
        details.update(jumprelu_bandwidth=float(eng.bandwidth), jumprelu_ste_to_input=False)
    metadata = {
        "sae_lens_version": SAELENS_VERSION,
        "sae_lens_training_version": None,  # trained by this pipeline, not by SAELens
        "training_architecture": sae.architecture,
        "training_architecture_details": details,
        "model_name": act_meta.get("model_id"),
        "hook_name": layer.hf_module or layer.signature,
        "hook_side": act_meta.get("hook_side", "output"),
        "hook_layer": layer.layer_num,
        "hook_head_index": None,
        "mi_crow_layer_signature": layer.signature,
        "context_size": act_meta.get("max_length"),
        "prepend_bos": act_meta.get("prepend_bos"),
        "exclude_special_tokens": excluded_tokens(act_meta),
        "dataset_path": (act_meta.get("dataset") or {}).get("name"),
        "sae_pipeline": dict(extra or {}),
    }
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": layer.d_model,
        "d_sae": sae.context.n_latents,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
    }
    if architecture == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)  # decoder rows are unit norm: nothing to rescale
    return {**cfg, "metadata": metadata}


def excluded_tokens(act_meta: dict[str, Any]) -> list[int] | bool:
    """SAELens' ``exclude_special_tokens``: the ids the run left out (False: none). An SAEBench run that splices
    the SAE on them too would measure a CE loss the SAE was never trained for."""
    if act_meta.get("keep_special_tokens", False):
        return False
    return sorted(int(i) for i in act_meta.get("special_token_ids", []))


def export_saelens(
    sae: PipelineSae,
    folder: Path,
    layer: LayerSpec,
    act_meta: dict[str, Any],
    *,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the folder (weights first, cfg.json last: a folder with a cfg.json is complete)."""
    if layer.d_model != sae.context.n_inputs:
        raise PipelineError(
            f"the SAE reads {sae.context.n_inputs} dimensions but {layer.signature} has {layer.d_model}"
        )
    atomic_save_tensors(folder / WEIGHTS_FILE, saelens_weights(sae))
    atomic_write_json(folder / CFG_FILE, saelens_config(sae, layer, act_meta, extra))
    return folder


def load_saelens(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    cfg = read_json(Path(folder) / CFG_FILE)
    weights = load_tensors(Path(folder) / WEIGHTS_FILE)
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - weights.keys()
    if missing:
        raise PipelineError(f"{Path(folder) / WEIGHTS_FILE} lacks {sorted(missing)}; it is not a SAELens export")
    return cfg, weights


def saelens_forward(cfg: dict[str, Any], w: dict[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """SAELens' TopK and JumpReLU formulas, written out: (codes, reconstruction)."""
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    if cfg["architecture"] == "jumprelu":
        z = torch.relu(pre) * (pre > w["threshold"])
    else:
        top = pre.topk(int(cfg["k"]), dim=-1)
        z = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    return z, z @ w["W_dec"] + w["b_dec"]
