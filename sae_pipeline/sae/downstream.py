"""Downstream fidelity: next-token CE and KL of the model with each SAE spliced in, against the clean model and the
zero- and mean-ablated layer, over the same documents; the clean and ablated passes are shared by every SAE of a
layer."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.timing import StageClock
from sae_pipeline.lm.tokens import TokenBatch
from sae_pipeline.sae.metrics import AblationGap, recovered_or_reason

CONDITIONS = ("clean", "sae", "zero", "mean")
REFERENCES = ("clean", "zero", "mean")  # the passes every SAE of a layer shares
ABLATIONS = ("zero", "mean")


@dataclass
class DownstreamResult:
    """CE and KL per condition: ``clean``, the ablations and one entry per spliced SAE (by its name)."""

    ce: dict[str, float]
    kl: dict[str, float]
    n_predictions: int
    n_real_tokens: int
    n_spliced_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)  # ablation -> AblationGap.result()

    def metrics(self, sae: str = "sae") -> dict[str, Any]:
        """One SAE's downstream metrics, its condition named ``sae`` as in metrics.json."""
        ce = {c: self.ce[c] for c in REFERENCES if c in self.ce} | ({"sae": self.ce[sae]} if sae in self.ce else {})
        out: dict[str, Any] = {f"ce_{c}": ce[c] for c in CONDITIONS if c in ce}
        if "sae" in ce:
            out["delta_loss"] = ce["sae"] - ce["clean"]
            for ablation, key in (("zero", "ce_loss_recovered"), ("mean", "ce_loss_recovered_mean_ablation")):
                if ablation in self.gaps:
                    value, reason = recovered_or_reason(
                        ce["clean"], ce["sae"], ce[ablation], self.gaps[ablation], ablation
                    )
                    out[key], out[key + "_reason"] = value, reason
        out.update({f"ablation_gap_{a}": g for a, g in self.gaps.items()})
        kl = {c: v for c, v in self.kl.items() if c in ABLATIONS} | ({"sae": self.kl[sae]} if sae in self.kl else {})
        out.update({f"kl_{c}": kl[c] for c in CONDITIONS if c in kl})
        out.update(
            n_predictions=self.n_predictions, n_real_tokens=self.n_real_tokens, n_spliced_tokens=self.n_spliced_tokens
        )
        return out

    def seconds_of(self, sae: str = "sae") -> dict[str, float]:
        """The shared passes' seconds and this SAE's, keyed as in metrics.json."""
        return {c: self.seconds[c] for c in REFERENCES if c in self.seconds} | {"sae": self.seconds.get(sae, 0.0)}

    def tokens_per_second(self, sae: str = "sae") -> dict[str, float]:
        return {c: self.n_real_tokens / s for c, s in self.seconds_of(sae).items() if s > 0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def downstream(
    model: torch.nn.Module,
    splice,
    batches: list[TokenBatch],
    device: torch.device,
    conditions: tuple[str, ...] = CONDITIONS,
    progress=None,
    clock: StageClock | None = None,
) -> DownstreamResult:
    """Next-token CE (and KL from clean) per condition, one full forward per condition and batch.

    ``conditions``: ``clean``, ``zero``, ``mean`` or a name of the splice's SAEs; they must start with ``clean`` when
    more than one is given (KL needs the clean distribution), and the clean and ablated passes serve every SAE.
    Sums stay on the device; padding and predictions of or from a pad never count. For each ablation the
    per-prediction difference from clean is also accumulated by document, for the gap's standard error. With a
    ``clock``, the GPU's busy time of each forward is counted.
    """
    if len(conditions) > 1 and conditions[0] != "clean":
        raise ValueError("the first condition must be 'clean'")
    sums = _Sums(conditions, device)
    for cpu_batch in batches:
        sums.add(model, splice, cpu_batch, clock)
        if progress is not None:
            progress.update(int(cpu_batch.ids.shape[0]), tokens=cpu_batch.n_real)
    return sums.result()


class _Sums:
    """What ``downstream`` accumulates over the batches, on the device."""

    def __init__(self, conditions: tuple[str, ...], device: torch.device) -> None:
        self.conditions, self.device = conditions, device
        self.nll = {c: torch.zeros((), dtype=torch.float64, device=device) for c in conditions}
        self.kl = {c: torch.zeros((), dtype=torch.float64, device=device) for c in conditions if c != "clean"}
        self.gaps = {c: AblationGap(device) for c in conditions if c in ABLATIONS and "clean" in conditions}
        self.seconds = dict.fromkeys(conditions, 0.0)
        self.n_pred = self.n_real = self.n_kept = 0

    def add(self, model: torch.nn.Module, splice, cpu_batch: TokenBatch, clock: StageClock | None) -> None:
        """One batch: a forward per condition, the clean one first."""
        b = cpu_batch.to(self.device)
        valid = (b.mask[:, :-1] & b.mask[:, 1:]).bool()
        targets = b.ids[:, 1:][valid]
        doc = valid.nonzero()[:, 0]  # the batch row (document) of each prediction
        splice.keep = b.keep
        clean = None
        for cond in self.conditions:
            _sync(self.device)
            t0 = time.perf_counter()
            with clock.gpu_busy() if clock is not None else contextlib.nullcontext():
                logits = _forward(model, splice, b, "off" if cond == "clean" else cond)
            lp = logits[:, :-1][valid].float().log_softmax(-1)
            token_nll = -lp.gather(1, targets[:, None]).squeeze(1)
            self.nll[cond] += token_nll.sum()
            if cond == "clean":
                clean = (lp, token_nll)
            elif clean is not None:
                self.kl[cond] += F.kl_div(lp, clean[0], log_target=True, reduction="sum")
            if cond in self.gaps:
                self.gaps[cond].update(token_nll - clean[1], doc)
            _sync(self.device)
            self.seconds[cond] += time.perf_counter() - t0
        self.n_pred += int(valid.sum())
        self.n_real += cpu_batch.n_real
        self.n_kept += int(cpu_batch.keep.sum())

    def result(self) -> DownstreamResult:
        if self.n_pred == 0:
            raise PipelineError(
                "the evaluation documents have no next-token predictions (every document is a single "
                "token); raise EVAL_LIMIT or use another EVAL_DATASET"
            )
        return DownstreamResult(
            ce={c: float(v) / self.n_pred for c, v in self.nll.items()},
            kl={c: float(v) / self.n_pred for c, v in self.kl.items()},
            n_predictions=self.n_pred,
            n_real_tokens=self.n_real,
            n_spliced_tokens=self.n_kept,
            seconds=self.seconds,
            gaps={c: g.result() for c, g in self.gaps.items()},
        )


def _forward(model: torch.nn.Module, splice, b: TokenBatch, mode: str) -> torch.Tensor:
    """The logits of one forward with the splice in ``mode``; a hook that did not fire is an error."""
    splice.mode, calls = mode, splice.calls
    try:
        logits = model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False).logits
    finally:
        splice.mode = "off"
    if splice.calls == calls:
        raise PipelineError(f"the hook {splice.layer_signature!r} did not fire during the forward pass")
    return logits
