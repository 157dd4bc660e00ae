"""What the architectures beyond TopK compute: Matryoshka's nested prefixes and JumpReLU's thresholds, their losses.

* ``batchtopk``: the k x batch largest ReLU'd pre-activations of the whole batch (Bussmann et al. 2024); a global
  threshold replaces the selection at inference (``model.BiasedTopKEngine.select``).
* ``matryoshka_batchtopk`` (Bussmann et al. 2025): BatchTopK's selection over the whole dictionary, and a loss that
  adds, for every nested prefix of the dictionary (``MATRYOSHKA_WIDTHS``), the reconstruction error of decoding with
  that prefix's latents alone (+ b_dec). Fixed prefixes, as SAELens' ``MatryoshkaBatchTopKTrainingSAE`` and the
  paper's released SAEs use (not Nabeshima's random prefixes): the loss is deterministic, so resume stays exact and
  the widths are written into the SAE's metadata, where SAEBench-style analyses of the groups can read them.
* ``jumprelu`` (Rajamanoharan et al. 2024): ``z = pre * (pre > threshold)``, one learned threshold per latent.
  The step has no gradient, so a straight-through estimator with a rectangle kernel of width ``bandwidth`` gives
  the threshold one (only the threshold, as DeepMind's and SAELens' default ``jumprelu_ste_to_input=False``).
  Sparsity: the L0 target form of SAELens' ``"quadratic"`` mode (Gemma Scope 2):
  ``coefficient x mean over tokens of 2/k x (L0_token - k)^2``, k = TOP_K, L0 counted through the same estimator.
  The threshold is a plain parameter kept non-negative (SAELens 6: a log-parameterised one barely moves under Adam).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from sae_pipeline.sae.metrics import fvu

if TYPE_CHECKING:
    from sae_pipeline.sae.model import BiasedTopKEngine

ARCHITECTURES = ("topk", "batchtopk", "matryoshka_batchtopk", "jumprelu")
BATCH_TOPK_FAMILY = ("batchtopk", "matryoshka_batchtopk")  # a global threshold learned for inference
MATRYOSHKA_RATIO = 4  # default widths: n/64, n/16, n/4, n
MATRYOSHKA_LEVELS = 4
THRESHOLD_SAMPLE_TOKENS = 4096  # tokens whose pre-activations set JumpReLU's initial thresholds


def default_matryoshka_widths(n_latents: int) -> tuple[int, ...]:
    """A geometric progression ending at the full width: n/64, n/16, n/4, n (fewer levels for tiny dictionaries)."""
    widths = [max(1, round(n_latents / MATRYOSHKA_RATIO**j)) for j in range(MATRYOSHKA_LEVELS - 1, -1, -1)]
    return tuple(sorted(set(widths)))


def check_matryoshka_widths(widths: tuple[int, ...], n_latents: int) -> None:
    """Strictly increasing, positive, ending at the full width; a ValueError saying what would be valid."""
    if not widths or widths[-1] != n_latents:
        raise ValueError(f"the last width must be the SAE's n_latents = {n_latents}")
    if widths[0] < 1 or any(a >= b for a, b in zip(widths, widths[1:])):
        raise ValueError(f"widths must be positive and strictly increasing up to n_latents = {n_latents}")


def matryoshka_inner_loss(eng: BiasedTopKEngine, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Σ over the inner prefixes (all but the full width) of FVU(x, z[:, :w] W_dec[:w] + b_dec); one pass over the
    groups, the same cost as one full decode."""
    total = x.new_zeros(())
    decoded = eng.b_dec.to(z.dtype).expand_as(x)
    start = 0
    for width in eng.matryoshka_widths[:-1]:
        decoded = decoded + z[:, start:width] @ eng.W_dec[start:width].to(z.dtype)
        total = total + fvu(x, decoded.float())
        start = width
    return total


def rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u)


class JumpReLU(torch.autograd.Function):
    """``pre * (pre > threshold)``; the threshold's gradient by the straight-through estimator (module doc)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold, bandwidth)
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        pre, threshold, bandwidth = ctx.saved_tensors
        ste = threshold / bandwidth * rectangle((pre - threshold) / bandwidth) * grad
        return (pre > threshold) * grad, -ste.sum(dim=0), None


class Step(torch.autograd.Function):
    """``pre > threshold`` as 0/1; the threshold's gradient by the same estimator (for the L0 penalty)."""

    @staticmethod
    def forward(ctx: Any, pre: torch.Tensor, threshold: torch.Tensor, bandwidth: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(pre, threshold, bandwidth)
        return (pre > threshold).to(pre)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        pre, threshold, bandwidth = ctx.saved_tensors
        ste = rectangle((pre - threshold) / bandwidth) * grad / bandwidth
        return None, -ste.sum(dim=0), None


def jumprelu_l0_loss(eng: BiasedTopKEngine, pre: torch.Tensor, target_l0: int) -> torch.Tensor:
    """Mean over tokens of 2/k (L0_token − k)²: the quadratic L0 target penalty (module doc), before its
    coefficient."""
    l0 = Step.apply(pre.float(), eng.jump_threshold, eng.bandwidth).sum(dim=-1)
    return (2.0 / target_l0 * (l0 - target_l0).pow(2)).mean()


@torch.no_grad()
def initial_thresholds(pre: torch.Tensor, target_l0: int) -> torch.Tensor:
    """Per latent, the quantile of its pre-activations above which it fires on target_l0 / n_latents of the tokens,
    so training starts at L0 ≈ k (as BatchTopK does) rather than with half of the latents active."""
    n_tokens, n_latents = pre.shape
    keep = max(1, math.ceil(n_tokens * target_l0 / n_latents))
    return pre.float().topk(min(keep + 1, n_tokens), dim=0).values[-1].clamp_min(0)
