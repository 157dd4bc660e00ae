"""SAELens itself on the pipeline's exports: ``SAE.load_from_disk``, then its encode, decode and forward on inputs
for which the pipeline wrote its own codes and reconstructions. Prints one JSON object per export; the tests judge.

Runs in this folder's environment, not the project's (SAELens pins its own dependencies):
    uv run --project tests/saelens_env python tests/saelens_env/check_export.py EXPORT_DIR=INPUTS.safetensors ...
INPUTS holds ``x`` [n, d_in] and the pipeline's ``z`` [n, d_sae] and ``x_hat`` [n, d_in] for it.
"""

from __future__ import annotations

import json
import sys

import sae_lens
import torch
from sae_lens import SAE
from safetensors.torch import load_file


def check(folder: str, inputs: str) -> dict:
    sae = SAE.load_from_disk(folder, device="cpu")
    ours = load_file(inputs)
    with torch.no_grad():
        z = sae.encode(ours["x"])
        x_hat = sae.decode(z)
        out = sae(ours["x"])
    return {
        "folder": folder,
        "sae_lens_version": sae_lens.__version__,
        "class": type(sae).__name__,
        "architecture": sae.cfg.architecture(),
        "metadata": sae.cfg.metadata.to_dict(),
        "codes_max_abs_diff": (z - ours["z"]).abs().max().item(),
        "reconstruction_max_abs_diff": (x_hat - ours["x_hat"]).abs().max().item(),
        "forward_max_abs_diff": (out - ours["x_hat"]).abs().max().item(),
        "same_active_latents": bool(torch.equal(z != 0, ours["z"] != 0)),
        "mean_l0": (z != 0).float().sum(-1).mean().item(),
        "distinct_thresholds": sae.threshold.unique().numel() if hasattr(sae, "threshold") else None,
    }


if __name__ == "__main__":
    for arg in sys.argv[1:]:
        folder, inputs = arg.split("=", 1)
        print(json.dumps(check(folder, inputs), default=str), flush=True)
