"""Training-curves PNG (loss and FVU, L0, dead fraction against tokens seen), drawn headless with Agg."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def plot_training_curves(history: dict[str, Any], path: Path, title: str = "") -> Path:
    """One row of three panels from ``history["steps"]``; held-out FVU drawn as a point when present."""
    steps = history.get("steps", [])
    tokens = [s["tokens"] for s in steps]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    ax = axes[0]
    ax.plot(tokens, [s["loss"] for s in steps], label="train loss")
    ax.plot(tokens, [s["fvu"] for s in steps], label="train FVU")
    holdout = history.get("holdout")
    if holdout and tokens:
        ax.scatter([tokens[-1]], [holdout["fvu"]], color="black", zorder=3, label="held-out FVU")
    ax.set_yscale("log")
    ax.set_title("loss and FVU")
    ax.legend()
    axes[1].plot(tokens, [s["l0"] for s in steps])
    axes[1].set_title("mean L0 (active latents per token)")
    axes[2].plot(tokens, [s["dead_fraction"] for s in steps])
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_title("dead fraction")
    for a in axes:
        a.set_xlabel("training tokens seen")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        Path(tmp).unlink(missing_ok=True)
    return path
