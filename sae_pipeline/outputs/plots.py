"""The PNGs: training curves (loss and FVU, L0, dead fraction against tokens seen), a sweep's frontier (L0 against
FVU, and against CE-loss recovered once evaluated) and the latents' firing-frequency histogram, drawn headless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
from matplotlib.ticker import NullFormatter  # noqa: E402

from sae_pipeline.store.files import atomic_path  # noqa: E402


def plot_training_curves(history: dict[str, Any], path: Path, title: str = "") -> Path:
    """One row of three panels from ``history["steps"]``; held-out FVU drawn as a point when present."""
    return save_figure(training_curves(history, title), path)


def training_curves(history: dict[str, Any], title: str = ""):
    """The figure of ``plot_training_curves``. Every axis is scaled so that noise does not look like a trend: L0
    and the dead fraction from 0, loss and FVU over at least a decade."""
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
    at_least_a_decade(ax)
    ax.set_title("loss and FVU")
    ax.legend()
    l0 = [s["l0"] for s in steps]
    axes[1].plot(tokens, l0)
    axes[1].set_ylim(0, 1.1 * max(l0, default=1.0) or 1.0)
    axes[1].set_title("mean L0 (active latents per token)")
    axes[2].plot(tokens, [s["dead_fraction"] for s in steps])
    axes[2].set_ylim(-0.02, 1.02)
    axes[2].set_title("dead fraction")
    for a in axes:
        a.set_xlabel("training tokens seen")
        a.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    return fig


def at_least_a_decade(ax) -> None:
    """Widen a log axis that spans less than a factor of ten to one that does, around the same centre."""
    lo, hi = ax.get_ylim()
    if lo > 0 and hi / lo < 10:
        centre = (lo * hi) ** 0.5
        ax.set_ylim(centre / 10**0.5, centre * 10**0.5)


FVU_PANEL = ("fvu", "held-out FVU")
CE_PANEL = ("ce_loss_recovered", "CE-loss recovered")
ABSORPTION_PANEL = ("absorption", "first-letter absorption fraction")


def plot_sweep_frontier(
    groups: list[dict[str, Any]], path: Path, title: str = "", panels: tuple[tuple[str, str], ...] = (FVU_PANEL,)
) -> Path:
    """L0 against each panel's metric (training: held-out FVU; step 3: FVU and CE-loss recovered), one line per
    (layer, expansion, architecture; LR when the sweep has several) through its k values; each point a group of
    seeds (``sweep.seed_groups``), its mean with ± one standard deviation as error bars."""
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.4), squeeze=False)
    series: dict[str, list[dict[str, Any]]] = {}
    several_lr = len({g["lr"] for g in groups}) > 1
    for g in groups:
        layer = f"L{g['layer_num']}" if g.get("layer_num") is not None else g["layer_signature"]
        label = f"{layer} x{g['n_latents_multiplier']} {g['architecture']}" + (f" lr {g['lr']:g}" if several_lr else "")
        series.setdefault(label, []).append(g)
    for ax, (metric, name) in zip(axes[0], panels):
        drawn: list[float] = []
        for label, points in series.items():
            points = sorted((p for p in points if p[metric]["mean"] is not None), key=lambda p: p["top_k"])
            if points:
                drawn += [p["top_k"] for p in points]
                ax.errorbar(
                    [p["l0"]["mean"] for p in points],
                    [p[metric]["mean"] for p in points],
                    xerr=[p["l0"]["std"] or 0.0 for p in points],
                    yerr=[p[metric]["std"] or 0.0 for p in points],
                    fmt="o-",
                    capsize=3,
                    label=label,
                )
        if drawn:
            ax.legend(fontsize=8)
        else:  # e.g. CE-loss recovered where the ablation gap is noise: say so instead of an empty frame
            ax.text(0.5, 0.5, f"{name}: none measurable", ha="center", va="center", transform=ax.transAxes)
        ax.set_xscale("log")
        if drawn:  # plain numbers at the sweep's k values (L0's targets), not powers of ten nor overlapping L0s
            ax.set_xticks(sorted(set(drawn)), [f"{x:g}" for x in sorted(set(drawn))])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L0 (active latents per token; mean ± std over seeds)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
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
