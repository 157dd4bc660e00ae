"""SAE quality metrics, one definition each, shared by training and evaluation.

* FVU (fraction of variance unexplained) = Σ‖x − x̂‖² / Σ‖x − mean x‖², the mean taken per dimension
  over the tokens measured. 1 − FVU is the explained variance. (overcomplete's printed "R2" uses one global
  scalar mean and overstates quality whenever dimension means differ, as they do in LLM activations.)
* MSE = mean over tokens and dimensions of (x − x̂)².
* L0 = mean number of non-zero codes per token.
* dead latent: one that did not fire in the last ``window`` training tokens (DEAD_TOKENS_WINDOW); dead fraction =
  their share, known only during training.
* never-fired latent: one that fired on none of the tokens it was measured on; never-fired fraction = their share,
  always shown with those tokens (``describe_never_fired``), since the figure depends on how many there were.

* ablation gap = CE_ablated − CE_clean with its standard error (``AblationGap``); CE-loss recovered is reported
  only when that gap is real (``recovered_or_reason``).

``fvu``/``mse``/``l0`` work on one batch (``fvu`` is differentiable: the trainer's loss uses it);
``ReconstructionStats`` accumulates the same quantities over any number of batches with exact merging
(Chan et al.'s parallel variance), so a streamed FVU equals the FVU of the concatenated tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Σ‖x − x̂‖² / Σ‖x − mean x‖² over a batch [n, d] (per-dimension mean)."""
    total = (x - x.mean(dim=0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(torch.finfo(total.dtype).tiny)


def mse(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    return (x - x_hat).pow(2).mean()


def l0(z: torch.Tensor) -> torch.Tensor:
    return (z != 0).sum(dim=-1).float().mean()


def dead_fraction(tokens_since_fired: torch.Tensor, window: int) -> float:
    return float((tokens_since_fired >= window).float().mean())


def never_fired_fraction(fire_counts: torch.Tensor) -> float:
    return float((fire_counts == 0).float().mean())


def describe_never_fired(fraction: float, n_tokens: int, which: str, n_latents: int) -> str:
    """The never-fired figure as every output shows it: with the tokens it was counted on."""
    return f"never fired on {n_tokens:,} {which} tokens: {fraction:.1%} of {n_latents:,} latents"


def describe_l0(l0: float, top_k: int | None = None, architecture: str | None = None) -> str:
    """L0 as every output shows it (two decimals); a TopK L0 below k says why."""
    text = f"L0 {l0:.2f}"
    if architecture == "topk" and top_k and l0 < top_k - 0.005:
        text += f" (below k={top_k}: on some tokens fewer than k latents have a positive pre-activation)"
    return text


def rounded(metrics: dict[str, Any]) -> dict[str, Any]:
    """Floats to 6 decimals, for the JSON records."""
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


class ReconstructionStats:
    """Streaming FVU, MSE, L0 and per-latent fire counts; accumulators stay on the data's device (no syncs)."""

    def __init__(self, d_in: int, n_latents: int, device: torch.device | str = "cpu"):
        self.d_in, self.n_latents, self.device = d_in, n_latents, device
        self.reset()

    def reset(self) -> None:
        d_in, n_latents, device = self.d_in, self.n_latents, self.device
        self.n = 0
        self.mean = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(d_in, dtype=torch.float64, device=device)  # Σ (x − mean)² per dimension
        self.sse = torch.zeros((), dtype=torch.float64, device=device)
        self.nonzero = torch.zeros((), dtype=torch.float64, device=device)
        self.fire_counts = torch.zeros(n_latents, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, z: torch.Tensor) -> None:
        x, x_hat = x.double(), x_hat.double()
        nb = x.shape[0]
        if nb == 0:
            return
        mean_b = x.mean(dim=0)
        m2_b = (x - mean_b).pow(2).sum(dim=0)
        delta = mean_b - self.mean
        total = self.n + nb
        self.mean += delta * (nb / total)
        self.m2 += m2_b + delta.pow(2) * (self.n * nb / total)
        self.n = total
        self.sse += (x - x_hat).pow(2).sum()
        fired = z != 0
        self.nonzero += fired.sum()
        self.fire_counts += fired.sum(dim=0)

    @torch.no_grad()
    def merge(self, other: ReconstructionStats) -> None:
        """Add another accumulator's tokens (exact: the result equals one accumulator fed both streams)."""
        if other.n == 0:
            return
        delta = other.mean - self.mean
        total = self.n + other.n
        self.mean += delta * (other.n / total)
        self.m2 += other.m2 + delta.pow(2) * (self.n * other.n / total)
        self.n = total
        self.sse += other.sse
        self.nonzero += other.nonzero
        self.fire_counts += other.fire_counts

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "n": torch.tensor(self.n),
            "mean": self.mean,
            "m2": self.m2,
            "sse": self.sse,
            "nonzero": self.nonzero,
            "fire_counts": self.fire_counts,
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.n = int(state["n"])
        for name in ("mean", "m2", "sse", "nonzero", "fire_counts"):
            getattr(self, name).copy_(state[name])

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no tokens were measured")
        d = self.mean.numel()
        return {
            "fvu": float(self.sse / self.m2.sum().clamp_min(torch.finfo(torch.float64).tiny)),
            "mse": float(self.sse / (self.n * d)),
            "l0": float(self.nonzero / self.n),
            "never_fired_fraction": never_fired_fraction(self.fire_counts),
            "n_tokens": self.n,
        }


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_ablated: float) -> float | None:
    """(CE_ablated − CE_sae) / (CE_ablated − CE_clean); None when ablation does not change the loss at all."""
    denom = ce_ablated - ce_clean
    if not math.isfinite(denom) or abs(denom) < 1e-12:
        return None
    return (ce_ablated - ce_sae) / denom


# CE-loss recovered divides by the ablation gap. When the gap is noise (a random model, a layer the loss does not
# depend on), the ratio is noise divided by noise and can read like a result (2.02, -7.5, 0.50). It is reported only
# when the gap is at least this many standard errors above zero and at least this fraction of CE clean.
MIN_GAP_STANDARD_ERRORS = 3.0
MIN_GAP_FRACTION = 0.01


class AblationGap:
    """Mean per-prediction loss difference (ablated − clean) and its standard error, streamed over documents.

    The predictions of one document are correlated, so documents, not predictions, are the independent units: the
    standard error is that of a ratio of sums over documents (the cluster-robust, linearised estimator),
    sqrt(N/(N−1) · Σ_i (D_i − gap·n_i)²) / Σ_i n_i, with D_i the summed difference and n_i the predictions of
    document i. Counting predictions as independent would understate it.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        zero = lambda: torch.zeros((), dtype=torch.float64, device=device)  # noqa: E731
        self.docs, self.sum_d, self.sum_n, self.sum_dd, self.sum_dn, self.sum_nn = (zero() for _ in range(6))

    @torch.no_grad()
    def update(self, diff: torch.Tensor, doc: torch.Tensor) -> None:
        """``diff`` [n]: ablated − clean loss of each prediction; ``doc`` [n]: its document (any integer ids, each
        document's predictions all in one call)."""
        if diff.numel() == 0:
            return
        _, doc = torch.unique(doc, return_inverse=True)
        d = torch.zeros(int(doc.max()) + 1, dtype=torch.float64, device=diff.device).index_add_(0, doc, diff.double())
        n = torch.bincount(doc).double()
        self.docs += n.numel()
        self.sum_d += d.sum()
        self.sum_n += n.sum()
        self.sum_dd += (d * d).sum()
        self.sum_dn += (d * n).sum()
        self.sum_nn += (n * n).sum()

    def result(self) -> dict[str, float]:
        docs, n = float(self.docs), float(self.sum_n)
        if n == 0:
            raise ValueError("no predictions were measured")
        gap = float(self.sum_d) / n
        if docs < 2:
            return {"gap": gap, "standard_error": math.inf, "n_documents": int(docs), "n_predictions": int(n)}
        residual = float(self.sum_dd - 2 * gap * self.sum_dn + gap * gap * self.sum_nn)
        se = math.sqrt(max(residual, 0.0) * docs / (docs - 1)) / n
        return {"gap": gap, "standard_error": se, "n_documents": int(docs), "n_predictions": int(n)}


def ablation_gap_problem(gap: dict[str, float], ce_clean: float, ablation: str = "zero") -> str | None:
    """Why ``gap`` (an ``AblationGap.result()``) is too small for CE-loss recovered to mean anything; None if real."""
    value, se = gap["gap"], gap["standard_error"]
    sigmas = value / se if se > 0 else math.inf
    where = (
        f"{ablation} ablation changes CE by {value:+.4f} ± {se:.4f} ({sigmas:.1f} standard errors over "
        f"{gap['n_documents']} documents, {gap['n_predictions']:,} predictions; {value / ce_clean:.2%} of CE clean)"
    )
    if not (math.isfinite(value) and sigmas >= MIN_GAP_STANDARD_ERRORS):
        return f"{where}: within the noise, so the model's loss does not depend on this layer measurably"
    if value < MIN_GAP_FRACTION * ce_clean:
        return f"{where}: below {MIN_GAP_FRACTION:.0%} of CE clean, too small a change for a ratio to mean anything"
    return None


def recovered_or_reason(
    ce_clean: float, ce_sae: float, ce_ablated: float, gap: dict[str, float], ablation: str = "zero"
) -> tuple[float | None, str | None]:
    """CE-loss recovered against this ablation, or (None, why) when the ablation gap is not a real effect."""
    problem = ablation_gap_problem(gap, ce_clean, ablation)
    if problem is not None:
        return None, problem
    return ce_loss_recovered(ce_clean, ce_sae, ce_ablated), None
