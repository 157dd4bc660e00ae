"""The PNGs: training curves (loss and FVU, L0, dead fraction against tokens seen), a sweep's sparsity/reconstruction
frontier and the latents' firing-frequency histogram, drawn headless with Agg."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

from sae_pipeline.store import atomic_path  # noqa: E402


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
    return save_figure(fig, path)


def plot_sweep_frontier(members: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Held-out FVU against L0 for every SAE of a sweep, one line per (layer, expansion, architecture) through its
    k values, seeds as separate points: the trade-off the sweep measured."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    series: dict[str, list[dict[str, Any]]] = {}
    for m in members:
        layer = f"L{m['layer_num']}" if m.get("layer_num") is not None else m["layer_signature"]
        series.setdefault(f"{layer} x{m['n_latents_multiplier']} {m['architecture']}", []).append(m)
    for label, points in series.items():
        points.sort(key=lambda m: (m["top_k"], m["seed"]))
        ax.plot([m["holdout"]["l0"] for m in points], [m["holdout"]["fvu"] for m in points], "o-", label=label)
    ax.set_xscale("log")
    ax.set_xlabel("held-out L0 (active latents per token)")
    ax.set_ylabel("held-out FVU")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def plot_firing_frequency(freq: torch.Tensor, path: Path, title: str = "") -> Path:
    """Histogram of log10(firing frequency) over the latents that fired; the never-fired count in the legend."""
    freq = freq.double().cpu()
    alive = freq[freq > 0]
    fig, ax = plt.subplots(figsize=(7, 3.8))
    if alive.numel():
        logs = alive.log10().numpy()
        ax.hist(
            logs,
            bins=min(50, max(10, alive.numel() // 4)),
            color="#3b6ea8",
            label=f"{alive.numel()} latents that fired",
        )
    ax.set_xlabel("log10(firing frequency)  (fraction of tokens on which the latent is active)")
    ax.set_ylabel("latents")
    never = int((freq == 0).sum())
    ax.plot([], [], " ", label=f"never fired: {never} of {freq.numel()}")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    return save_figure(fig, path)


def save_figure(fig, path: Path) -> Path:
    """PNG written atomically like every other output; the figure is closed."""
    fig.tight_layout()
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=100, format="png")
    finally:
        plt.close(fig)
    return path
