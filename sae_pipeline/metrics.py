"""SAE quality metrics, one definition each, shared by training (issue 3) and evaluation (issue 5).

* FVU (fraction of variance unexplained) = Σ‖x − x̂‖² / Σ‖x − mean x‖², the mean taken per dimension over the
  tokens measured. 1 − FVU is the explained variance. (overcomplete's printed "R2" uses one global scalar mean
  and overstates quality whenever dimension means differ, as they do in LLM activations.)
* MSE = mean over tokens and dimensions of (x − x̂)².
* L0 = mean number of non-zero codes per token.
* dead fraction = share of latents that did not fire in the last ``window`` training tokens.
* never-fired fraction = share of latents that never fired on the tokens measured.

``fvu``/``mse``/``l0`` work on one batch (``fvu`` is differentiable: the trainer's loss uses it);
``ReconstructionStats`` accumulates the same quantities over any number of batches with exact merging
(Chan et al.'s parallel variance), so a streamed FVU equals the FVU of the concatenated tokens.
"""

from __future__ import annotations

import math

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
