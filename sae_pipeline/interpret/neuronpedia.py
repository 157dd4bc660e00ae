"""The interpreted latents as SAE-Dashboard's Neuronpedia batch JSON, the file a self-hosted Neuronpedia imports.

The schema is SAE-Dashboard's ``NeuronpediaDashboardBatch.to_dict``
(https://github.com/jbloomAus/SAEDashboard/blob/main/sae_dashboard/neuronpedia/neuronpedia_dashboard.py):
``model_id``, ``layer``, ``sae_set``, ``features``; per feature ``feature_index``,
``activations`` (``bin_min``, ``bin_max``, ``bin_contains``, ``tokens``, ``values``; the top activations as its
"TOP ACTIVATIONS" bin -1..max, each quantile sample as a bin of its own value), top positive and negative logits
(``pos_str``/``pos_values``, ``neg_str``/``neg_values``: the direct-logit view of the browser), ``frac_nonzero``,
the activation histogram (``freq_hist_data_*``, from a uniform sample of the latent's activations scaled to its
firing count) and the logit histogram over the vocabulary (``logits_hist_data_*``). Neuron alignment and
correlation fields, which need the model's neurons, are written empty.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sae_pipeline.interpret.examples import LatentExamples
from sae_pipeline.store.files import atomic_write_json

TOP_LOGITS = 10
HIST_BINS = 40
EMPTY_FIELDS = (
    "neuron_alignment_indices",
    "neuron_alignment_values",
    "neuron_alignment_l1",
    "correlated_neurons_indices",
    "correlated_neurons_l1",
    "correlated_neurons_pearson",
    "correlated_features_indices",
    "correlated_features_l1",
    "correlated_features_pearson",
    "decoder_weights_dist",
)


def _round(values) -> list[float]:
    return [round(float(v), 3) for v in values]


def _histogram(values: torch.Tensor, scale: float = 1.0) -> tuple[list[float], list[float]]:
    """(bar centres, bar heights) of ``HIST_BINS`` equal bins."""
    if values.numel() == 0:
        return [], []
    lo, hi = float(values.min()), float(values.max())
    hi = hi if hi > lo else lo + 1e-6
    heights = torch.histc(values.float(), bins=HIST_BINS, min=lo, max=hi) * scale
    width = (hi - lo) / HIST_BINS
    return _round(lo + (i + 0.5) * width for i in range(HIST_BINS)), _round(heights)


def feature(ex: LatentExamples, logits: torch.Tensor | None, tokenizer, n_tokens: int) -> dict[str, Any]:
    from sae_pipeline.outputs.browser import token_name

    top_max = max((c.max_activation for c in ex.top), default=0.0)
    activations = [
        {"bin_min": -1, "bin_max": round(top_max, 3), "bin_contains": -1, "tokens": c.pieces, "values": c.activations}
        for c in ex.top
    ]
    for c in ex.test:
        value = round(c.activations[c.center], 3)
        activations.append(
            {
                "bin_min": value,
                "bin_max": value,
                "bin_contains": c.quantile,
                "tokens": c.pieces,
                "values": c.activations,
            }
        )
    out: dict[str, Any] = {"feature_index": ex.latent, **{name: [] for name in EMPTY_FIELDS}}
    if logits is not None:
        hi, lo = logits.topk(TOP_LOGITS), logits.topk(TOP_LOGITS, largest=False)
        out["pos_str"] = [token_name(tokenizer, int(t)) for t in hi.indices]
        out["pos_values"], out["neg_values"] = _round(hi.values), _round(lo.values)
        out["neg_str"] = [token_name(tokenizer, int(t)) for t in lo.indices]
        out["logits_hist_data_bar_values"], out["logits_hist_data_bar_heights"] = _histogram(logits)
    else:
        out |= {k: [] for k in ("pos_str", "pos_values", "neg_str", "neg_values")}
        out |= {"logits_hist_data_bar_values": [], "logits_hist_data_bar_heights": []}
    sample = torch.tensor(ex.sample_values)
    fired = ex.frequency * n_tokens
    values, heights = _histogram(sample, fired / max(len(ex.sample_values), 1))
    out |= {"frac_nonzero": ex.frequency, "freq_hist_data_bar_values": values, "freq_hist_data_bar_heights": heights}
    return out | {"activations": activations}


def write_batch(
    examples: list[LatentExamples], engine, model, tokenizer, meta: dict[str, Any], path: Path
) -> dict[str, Any]:
    """``path`` (``batch-0.json``): every interpreted latent as one Neuronpedia feature."""
    from sae_pipeline.outputs.browser import direct_logits

    logits = direct_logits(engine, model, [ex.latent for ex in examples]) if model is not None else None
    features = []
    for j, ex in enumerate(examples):
        feat = feature(ex, None if logits is None else logits[j], tokenizer, meta["n_tokens"])
        features.append(feat | {"n_prompts_total": meta["n_documents"], "n_tokens_in_prompt": meta["ctx_len"]})
        features[-1]["dataset"] = meta["dataset"]
    batch = {"model_id": meta["model_id"], "layer": meta["layer"], "sae_set": meta["sae_set"], "features": features}
    atomic_write_json(path, batch)
    return batch
