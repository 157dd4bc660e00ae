"""One SAE's training (``Trainer``: its model, Adam, schedule, dead-latent counters, metrics and history; ``step``
is one optimisation step; ``state_dict`` / ``load_state_dict`` mirror each other), and the maths it uses.

``Trainer.step`` (one SAE, one batch): loss = FVU of the batch + AUXK_ALPHA x AuxK + L1_LAMBDA x mean|z|; Adam with
linear warm-up and final linear decay; the decoder-norm-changing part of its gradient removed, gradient clipping,
unit-norm decoder after every step; autocast on CUDA. AuxK (Gao et al. 2024): e = (x − x̂) detached;
ê = W_dec · TopK_{k_aux}(pre-activations of dead latents), without b_dec;
loss = Σ‖e − ê‖² / Σ‖e − mean e‖² x min(n_dead / k_aux, 1), k_aux = d_in / 2. A latent is dead when it
has not fired in the last DEAD_TOKENS_WINDOW training tokens. AuxK runs for every architecture (for JumpReLU the
dead latents' pre-activations are pushed towards their thresholds the same way). The architectures' own terms
(``sae/architectures.py``): Matryoshka adds the FVU of every inner prefix; JumpReLU adds JUMPRELU_L0_COEFFICIENT x
its L0 target penalty (target TOP_K) and keeps its thresholds non-negative after every step.

Several processes: per SAE and step one all-reduce makes gradients, dead-latent counters, logged loss and the
BatchTopK threshold global, so every rank steps identically (infra/distributed.py).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any

import torch

from sae_pipeline.infra.distributed import Dist
from sae_pipeline.sae.architectures import jumprelu_l0_loss, matryoshka_inner_loss
from sae_pipeline.sae.metrics import ReconstructionStats, dead_fraction, fvu, rounded
from sae_pipeline.sae.sweep import SaeSpec
from sae_pipeline.settings import TrainSettings

if TYPE_CHECKING:
    from sae_pipeline.sae.model import BiasedTopKEngine, PipelineSae

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoopState:
    """Where the training loop stands; the same for every SAE of the process, since they step together."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0

    def advance(self, n_tokens: int) -> None:
        self.step += 1
        self.step_in_epoch += 1
        self.tokens += n_tokens

    def next_epoch(self) -> None:
        self.epoch += 1
        self.step_in_epoch = 0


class Trainer:
    """One SAE's training: its model, Adam, learning-rate schedule, loss scaler, dead-latent counters, metrics and
    history. ``step`` is one optimisation step; ``state_dict`` / ``load_state_dict`` mirror each other."""

    def __init__(
        self,
        spec: SaeSpec,
        settings: TrainSettings,
        total_steps: int,
        window: int,
        device: torch.device,
        dist: Dist,
        model_id: str | None,
    ):
        from sae_pipeline.sae.model import (
            PipelineSae,  # mi_crow & co. take seconds to import: only once inputs are good
        )

        d_in, n_latents = spec.layer.d_model, spec.n_latents
        self.spec, self.settings, self.total_steps, self.window, self.dist = spec, settings, total_steps, window, dist
        self.sae: PipelineSae = PipelineSae(
            n_latents, d_in, spec.top_k, spec.architecture, matryoshka_widths=spec.matryoshka_widths
        )
        self.sae.context.lm_layer_signature, self.sae.context.model_id = spec.layer.signature, model_id
        self.eng: BiasedTopKEngine = self.sae.to_device(device).sae_engine
        self.opt = torch.optim.Adam(self.eng.parameters(), lr=spec.lr, fused=device.type == "cuda")
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt,
            partial(
                lr_factor,
                total=total_steps,
                warmup_fraction=settings.lr_warmup_fraction,
                decay_fraction=settings.lr_decay_fraction,
            ),
        )
        self.amp = AMP_DTYPES.get(settings.amp_dtype) if device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp is torch.float16)
        self.k_aux = max(d_in // 2, 1)
        self.since_fired = torch.zeros(n_latents, dtype=torch.int64, device=device)  # training tokens since it fired
        self.log_stats = ReconstructionStats(d_in, n_latents, device)  # since the last history line
        self.epoch_stats = ReconstructionStats(d_in, n_latents, device)
        self.loss_since_log = torch.zeros((), dtype=torch.float64, device=device)
        self.auxk_since_log = torch.zeros((), dtype=torch.float64, device=device)
        self.loss_this_epoch = torch.zeros((), dtype=torch.float64, device=device)
        self.steps_since_log = self.steps_this_epoch = 0
        self.history: dict[str, list] = {"steps": [], "epochs": []}

    def initialize(self, sample: torch.Tensor) -> None:
        """b_dec from rank 0's data sample, the rest from the SAE's seed; the same on every rank."""
        torch.manual_seed(self.spec.seed)
        self.eng.initialize(geometric_median(sample.float()), self.spec.seed)
        if self.spec.architecture == "jumprelu":
            self.eng.initialize_thresholds(sample, self.settings.jumprelu_bandwidth)
        self.dist.broadcast_module(self.eng)

    def step(self, x: torch.Tensor) -> int:
        """One optimisation step on this rank's tokens ``x``; returns the step's tokens over all ranks."""
        x = x.float()
        dead = self.since_fired >= self.window
        # 1. encode, select, decode (bf16 autocast on CUDA)
        with torch.autocast(x.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
            pre, z, x_hat = self.eng(x)
        pre, z, x_hat = pre.float(), z.float(), x_hat.float()
        # 2. loss: FVU + AuxK on the dead latents + L1 on the codes + the architecture's own term
        aux = auxk_loss(self.eng, pre, x, x_hat, dead, self.k_aux) if self.settings.auxk_alpha else x.new_zeros(())
        loss = fvu(x, x_hat) + self.settings.auxk_alpha * aux + self.settings.l1_lambda * z.abs().mean()
        loss = loss + self.architecture_loss(x, pre, z)
        # 3. backward
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # 4. several processes: one all-reduce (before unscale_, so every rank sees the same gradients)
        fired, loss_v, aux_v, n_tokens = self._all_reduce(x, z, loss, aux)
        # 5. unscale, drop the decoder-norm part of the gradient, clip, Adam, schedule
        self.scaler.unscale_(self.opt)
        self.eng.remove_parallel_gradient()
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.eng.parameters(), self.settings.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        # 6. unit-norm decoder rows, non-negative JumpReLU thresholds
        self.eng.normalize_decoder()
        self.eng.clamp_thresholds()
        # 7. counters and metrics
        self.since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.log_stats.update(x, x_hat.detach(), z.detach())
        self.loss_since_log += loss_v
        self.auxk_since_log += aux_v
        self.loss_this_epoch += loss_v
        self.steps_since_log += 1
        self.steps_this_epoch += 1
        return n_tokens

    def architecture_loss(self, x: torch.Tensor, pre: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Matryoshka: FVU of every inner prefix; JumpReLU: its L0 target penalty (module docstring)."""
        if self.spec.architecture == "matryoshka_batchtopk":
            return matryoshka_inner_loss(self.eng, x, z)
        if self.spec.architecture == "jumprelu":
            return self.settings.jumprelu_l0_coefficient * jumprelu_l0_loss(self.eng, pre, self.spec.top_k)
        return x.new_zeros(())

    def _all_reduce(self, x, z, loss, aux) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """(latents fired, loss, AuxK loss, tokens) of the step over all ranks; gradients and the BatchTopK
        threshold become their token-weighted means (distributed.py says why one explicit collective)."""
        if not self.dist.enabled:
            return (z != 0).any(dim=0), loss.detach(), aux.detach(), x.shape[0]
        n = float(x.shape[0])
        params = [p for p in self.eng.parameters() if p.grad is not None]
        scalars = torch.stack([loss.detach() * n, aux.detach() * n, self.eng.threshold.float() * n, loss.new_tensor(n)])
        flat = torch.cat([p.grad.flatten() * n for p in params] + [(z != 0).sum(dim=0).float(), scalars.float()])
        self.dist.all_reduce(flat)
        total = float(flat[-1])
        at = 0
        for p in params:
            p.grad.copy_(flat[at : at + p.numel()].view_as(p) / total)
            at += p.numel()
        with torch.no_grad():
            self.eng.threshold.copy_(flat[-2] / total)
        return flat[at : at + z.shape[1]] > 0, flat[-4] / total, flat[-3] / total, int(total)

    def log_line(self, state: LoopState) -> dict[str, Any]:
        """A history line for the steps since the last one (appended to the history and returned)."""
        stats = self.dist.gather_stats(self.log_stats)  # log_stats itself with one process
        n = max(self.steps_since_log, 1)
        line = {
            "step": state.step,
            "epoch": state.epoch,
            "tokens": state.tokens,
            "loss": float(self.loss_since_log) / n,
            "auxk_loss": float(self.auxk_since_log) / n,
            **rounded(stats.result()),
            "dead_fraction": dead_fraction(self.since_fired, self.window),
            "lr": self.sched.get_last_lr()[0],
        }
        self.epoch_stats.merge(stats)
        self.log_stats.reset()
        self.loss_since_log.zero_()
        self.auxk_since_log.zero_()
        self.steps_since_log = 0
        self.history["steps"].append(line)
        return line

    def end_epoch(self, state: LoopState) -> None:
        if self.steps_since_log:
            self.log_line(state)
        line = {
            "epoch": state.epoch,
            "step": state.step,
            "tokens": state.tokens,
            "loss": float(self.loss_this_epoch) / max(self.steps_this_epoch, 1),
            **rounded(self.epoch_stats.result()),
            "dead_fraction": dead_fraction(self.since_fired, self.window),
        }
        self.history["epochs"].append(line)
        self.epoch_stats.reset()
        self.loss_this_epoch.zero_()
        self.steps_this_epoch = 0

    def state_dict(self) -> dict[str, Any]:
        """Everything the next step depends on. With several processes every rank calls it: the metrics pending
        since the last history line are gathered from all of them (rank 0 keeps them on resume)."""
        return {
            "model": self.eng.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "scaler": self.scaler.state_dict(),
            "since_fired": self.since_fired,
            "log_stats": self.dist.gather_stats(self.log_stats).state_dict(),
            "epoch_stats": self.epoch_stats.state_dict(),
            "loss_since_log": self.loss_since_log,
            "auxk_since_log": self.auxk_since_log,
            "loss_this_epoch": self.loss_this_epoch,
            "steps_since_log": self.steps_since_log,
            "steps_this_epoch": self.steps_this_epoch,
            "history": self.history,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.eng.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled():
            self.scaler.load_state_dict(state["scaler"])
        self.since_fired.copy_(state["since_fired"])
        if self.dist.is_main:  # it holds every rank's tokens since the last log line; the other ranks start empty
            self.log_stats.load_state_dict(state["log_stats"])
        self.epoch_stats.load_state_dict(state["epoch_stats"])
        self.loss_since_log.copy_(state["loss_since_log"])
        self.auxk_since_log.copy_(state["auxk_since_log"])
        self.loss_this_epoch.copy_(state["loss_this_epoch"])
        self.steps_since_log, self.steps_this_epoch = state["steps_since_log"], state["steps_this_epoch"]
        self.history = state["history"]


def lr_factor(step: int, total: int, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up over the first steps, constant, then linear decay to 0 over the last steps."""
    warmup, decay = int(total * warmup_fraction), int(total * decay_fraction)
    if step < warmup:
        return (step + 1) / warmup
    if decay and step >= total - decay:
        return max(total - step, 0) / decay
    return 1.0


def auxk_loss(
    eng: BiasedTopKEngine, pre: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, k_aux: int
) -> torch.Tensor:
    """Gao et al.'s AuxK on dead latents (module docstring); exactly 0 when nothing is dead."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return pre.new_zeros(())
    e = (x - x_hat).detach()
    top = pre.masked_fill(~dead, float("-inf")).topk(min(k_aux, n_dead), dim=-1, sorted=False)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
    e_hat = codes @ eng.W_dec  # no decoder bias
    return fvu(e, e_hat) * min(n_dead / k_aux, 1.0)


@torch.no_grad()
def geometric_median(points: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm; a robust centre for b_dec (outlier tokens barely move it, unlike the mean)."""
    guess = points.mean(dim=0)
    for _ in range(iters):
        weights = 1 / (points - guess).norm(dim=1).clamp_min(eps)
        new = (weights[:, None] * points).sum(dim=0) / weights.sum()
        if (new - guess).norm() <= eps * max(float(guess.norm()), 1.0):
            return new
        guess = new
    return guess
