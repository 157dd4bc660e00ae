"""Step 3: evaluate trained SAEs: downstream fidelity with each SAE spliced in, reconstruction, feature browser.

One SAE is a sweep of one: ``--sae_run_id`` (SAE_RUN_ID, else ``STORE_DIR/sae_run_id.txt``) names a training run or
a sweep (``store.training_runs``), and every SAE it names goes through the same code. Read top to bottom,
``evaluate_sae`` does:

1. resolve the SAEs (a sweep with a member lacking ``model.pt`` is refused, naming the members and the command that
   continues it) and their activation run; the layer, hook side, special-token rule and max length all come from
   them, so evaluation sees the tokens each SAE was trained on;
2. pick the held-out documents: rows ``[DATA_LIMIT, DATA_LIMIT + EVAL_LIMIT)`` of the run's dataset (capture used
   the first DATA_LIMIT rows, after the same seeded shuffle if any), or the first EVAL_LIMIT rows of EVAL_DATASET;
3. load the SAEs and the model (MODEL_ID defaults to the run's model) and check that every layer's width is its SAEs'
   d_in; only then remove the outputs of an earlier evaluation, so a failed one never leaves stale files behind;
4. per layer: the mean activation of up to EVAL_SCAN_TOKENS stored tokens (for mean ablation), then for every batch
   of held-out documents the clean, zero-ablated and mean-ablated forwards once and one forward per SAE of the layer
   with it spliced in. The splice is a lean mi_crow ``Controller`` on the layer's signature (the hook side of the
   capture: the module's output, or its input as a pre-forward hook) that runs the SAE on the batch tensor and
   replaces exactly the positions capture stored (real tokens; special tokens only with KEEP_SPECIAL_TOKENS).
   mi_crow's own ``Sae`` controller path builds a Python dict per token and is not used;
5. per SAE, one after the other (a scan holds every non-zero code it read): every latent's firing frequency,
   maximum, activation values and top contexts over the same stored tokens, and the reconstruction on the training
   run's held-out slice; then ``evaluation/`` in its training run's folder: firing_frequency.png,
   feature_browser.html and feature_browser.json (each atomically; metrics.json last, once every SAE is done);
6. for a sweep, ``evaluation/sweep.json`` and ``evaluation/frontier.png`` in the sweep's folder (``store.Sweep``):
   every SAE's L0, FVU, CE-loss recovered and KL, and each group of seeds' mean ± standard deviation; then a
   summary with the time per stage (``timing.StageClock``: load, scan, clean, ablate, splice, holdout, browser).

Definitions (every average is over real tokens only, padding never counts):

* CE_x = mean next-token cross-entropy over the predictions whose input and target are both real tokens;
* CE-loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean) (1 = as good as the model, 0 = as bad as zero
  ablation; also reported against mean ablation), or null with the reason when the ablation gap is within the
  noise of the evaluated documents (``metrics.recovered_or_reason``); Δ loss = CE_sae − CE_clean;
* KL = mean over the same predictions of KL(p_clean ‖ p_condition);
* FVU, MSE, L0 and the never-fired fraction: ``sae_pipeline.metrics`` on the activations the splice saw.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sae_pipeline.errors import PipelineError
from sae_pipeline.metrics import AblationGap, ReconstructionStats, recovered_or_reason
from sae_pipeline.settings import EvalSettings
from sae_pipeline.store import (
    SAE_RUN_ID_FILE,
    ActivationRun,
    Store,
    Sweep,
    TrainingRun,
    atomic_write_json,
    open_complete_run,
    package_versions,
    training_runs,
    validate_run_id,
)
from sae_pipeline.timing import StageClock

CONDITIONS = ("clean", "sae", "zero", "mean")
REFERENCES = ("clean", "zero", "mean")  # the passes every SAE of a layer shares
ABLATIONS = ("zero", "mean")
EVAL_DIR = "evaluation"
METRICS_FILE = "metrics.json"
SCAN_CHUNK_TOKENS = 4096
STAGES = ("load", "scan", "clean", "ablate", "splice", "holdout", "browser")  # where step 3's time goes
FRONTIER_METRICS = ("l0", "fvu", "ce_loss_recovered", "kl")  # per SAE in the sweep's evaluation, per group of seeds
FORMULAS = {
    "ce_loss_recovered": "(ce_zero - ce_sae) / (ce_zero - ce_clean)",
    "ce_loss_recovered_mean_ablation": "(ce_mean - ce_sae) / (ce_mean - ce_clean)",
    "ce_loss_recovered_reason": "why it is null: the ablation gap (ce_zero - ce_clean) is under "
    "3 standard errors (documents as the independent units) or under 1% of ce_clean",
    "delta_loss": "ce_sae - ce_clean",
    "kl_<condition>": "mean KL(p_clean || p_condition)",
    "averages": "over real tokens only; predictions whose input or target is padding excluded",
}


# -- batches ---------------------------------------------------------------------------------------------------------
@dataclass
class EvalBatch:
    ids: torch.Tensor  # [B, T] long
    mask: torch.Tensor  # [B, T] long, 1 = real token
    positions: torch.Tensor  # [B, T] position ids (left padding does not shift them), as in capture
    keep: torch.Tensor  # [B, T] bool, the positions the SAE replaces

    def to(self, device: torch.device) -> EvalBatch:
        return EvalBatch(*(t.to(device) for t in (self.ids, self.mask, self.positions, self.keep)))

    @property
    def n_real(self) -> int:
        return int(self.mask.sum())


def make_batches(
    tokenizer, texts: Iterable[str], max_length: int, batch_size: int, keep_special: bool
) -> list[EvalBatch]:
    """Tokenized like capture (truncation at the run's max length), sorted by length, padded on the tokenizer's side."""
    from sae_pipeline.capture import keep_mask, pad_batch

    encoded = (
        [
            e
            for e in tokenizer(
                [t for t in texts if isinstance(t, str) and t.strip()], truncation=True, max_length=max_length
            )["input_ids"]
        ]
        if texts
        else []
    )
    encoded = [e for e in encoded if e]
    encoded.sort(key=len, reverse=True)
    special = torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)
    left = tokenizer.padding_side == "left"
    batches = []
    for start in range(0, len(encoded), batch_size):
        ids, mask = pad_batch(encoded[start : start + batch_size], tokenizer.pad_token_id, left)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        batches.append(EvalBatch(ids, mask, positions, keep_mask(ids, mask, special, keep_special)))
    return batches


# -- the splice ------------------------------------------------------------------------------------------------------
def make_splice(
    signature: str,
    hook_side: str,
    saes: torch.nn.Module | dict[str, torch.nn.Module],
    mean: torch.Tensor | None = None,
):
    """A mi_crow Controller on ``signature`` that, per mode, replaces the ``keep`` positions of the batch tensor.

    Modes: ``off`` (clean; the hook returns at once), ``zero``, ``mean``, or the name of one of ``saes`` (a bare
    engine is named ``sae``): ``engine(x) -> (pre, z, x_hat)`` on the kept rows, one call per batch; the rows it saw
    and their reconstruction update ``stats[name]`` when set. Set ``keep`` before each forward. Outputs are replaced
    in place (as mi_crow does); inputs are replaced in a copy, because a module's input is often also the residual
    stream it is added back to.
    """
    from mi_crow.hooks import Controller
    from mi_crow.hooks.hook import HookType

    class SaeSplice(Controller):
        def __init__(self) -> None:
            side = HookType.PRE_FORWARD if hook_side == "input" else HookType.FORWARD
            super().__init__(hook_type=side, hook_id="sae_pipeline_splice", layer_signature=signature)
            self.saes = saes if isinstance(saes, dict) else {"sae": saes}
            self.mean = mean
            self.mode = "off"
            self.keep: torch.Tensor | None = None
            self.stats: dict[str, ReconstructionStats] = {}
            self.calls = 0
            self.width: int | None = None

        def modify_activations(self, module, inputs, output):
            tensor = inputs if self.hook_type == HookType.PRE_FORWARD else output
            self.calls += 1
            self.width = int(tensor.shape[-1])
            if self.mode == "off":
                return None
            keep = self.keep
            if self.mode == "zero":
                new = torch.zeros((), dtype=tensor.dtype, device=tensor.device)
            elif self.mode == "mean":
                new = self.mean.to(device=tensor.device, dtype=tensor.dtype)
            elif self.mode in self.saes:
                x = tensor[keep].float()
                _, z, x_hat = self.saes[self.mode](x)
                if self.mode in self.stats:
                    self.stats[self.mode].update(x, x_hat.float(), z.float())
                new = x_hat.to(tensor.dtype)
            else:
                raise ValueError(f"unknown splice mode {self.mode!r}")
            if self.hook_type == HookType.PRE_FORWARD:
                out = tensor.clone()
                out[keep] = new
                return out
            tensor[keep] = new
            return None

    return SaeSplice()


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
    batches: list[EvalBatch],
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
    nll = {c: torch.zeros((), dtype=torch.float64, device=device) for c in conditions}
    kl = {c: torch.zeros((), dtype=torch.float64, device=device) for c in conditions if c != "clean"}
    gaps = {c: AblationGap(device) for c in conditions if c in ABLATIONS and "clean" in conditions}
    seconds = dict.fromkeys(conditions, 0.0)
    n_pred = n_real = n_kept = 0
    for cpu_batch in batches:
        b = cpu_batch.to(device)
        valid = (b.mask[:, :-1] & b.mask[:, 1:]).bool()
        targets = b.ids[:, 1:][valid]
        doc = valid.nonzero()[:, 0]  # the batch row (document) of each prediction
        splice.keep = b.keep
        clean_lp = clean_nll = None
        for cond in conditions:
            _sync(device)
            t0 = time.perf_counter()
            with clock.gpu_busy() if clock is not None else _nothing():
                logits = _forward(model, splice, b, "off" if cond == "clean" else cond)
            lp = logits[:, :-1][valid].float().log_softmax(-1)
            token_nll = -lp.gather(1, targets[:, None]).squeeze(1)
            nll[cond] += token_nll.sum()
            if cond == "clean":
                clean_lp, clean_nll = lp, token_nll
            elif clean_lp is not None:
                kl[cond] += F.kl_div(lp, clean_lp, log_target=True, reduction="sum")
            if cond in gaps:
                gaps[cond].update(token_nll - clean_nll, doc)
            _sync(device)
            seconds[cond] += time.perf_counter() - t0
        n_pred += int(valid.sum())
        n_real += cpu_batch.n_real
        n_kept += int(cpu_batch.keep.sum())
        if progress is not None:
            progress.update(int(cpu_batch.ids.shape[0]))
    if n_pred == 0:
        raise PipelineError(
            "the evaluation documents have no next-token predictions (every document is a single "
            "token); raise EVAL_LIMIT or use another EVAL_DATASET"
        )
    return DownstreamResult(
        ce={c: float(v) / n_pred for c, v in nll.items()},
        kl={c: float(v) / n_pred for c, v in kl.items()},
        n_predictions=n_pred,
        n_real_tokens=n_real,
        n_spliced_tokens=n_kept,
        seconds=seconds,
        gaps={c: g.result() for c, g in gaps.items()},
    )


def _forward(model: torch.nn.Module, splice, b: EvalBatch, mode: str) -> torch.Tensor:
    """The logits of one forward with the splice in ``mode``; a hook that did not fire is an error."""
    splice.mode, calls = mode, splice.calls
    try:
        logits = model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False).logits
    finally:
        splice.mode = "off"
    if splice.calls == calls:
        raise PipelineError(f"the hook {splice.layer_signature!r} did not fire during the forward pass")
    return logits


@contextlib.contextmanager
def _nothing():
    yield


# -- the stored activations -------------------------------------------------------------------------------------------
def _chunks(run: ActivationRun, layer: str, d_in: int, max_tokens: int, window: int = 0):
    """(x, provenance, lo, hi) per chunk of the first ``max_tokens`` stored tokens (store order): rows lo..hi of x
    are the chunk, the others up to ``window`` neighbours on each side (for context windows)."""
    seen = 0
    for index in sorted(run.completed_shards()):
        if seen >= max_tokens:
            break
        acts, prov = run.read_shard(index, layer)
        if acts.shape[1] != d_in:
            raise PipelineError(
                f"{run.shard_dir(index)} holds activations of width {acts.shape[1]}, but the SAE "
                f"has d_in={d_in}; the SAE was not trained on this activation run"
            )
        n = min(acts.shape[0], max_tokens - seen)
        for s in range(0, n, SCAN_CHUNK_TOKENS):
            e = min(s + SCAN_CHUNK_TOKENS, n)
            a, b = max(0, s - window), min(acts.shape[0], e + window)
            yield acts[a:b], prov[a:b], s - a, e - a
        seen += n
    if seen == 0:
        raise PipelineError(f"activation run {run.run_id!r} has no stored tokens in {run.dir}")


@torch.no_grad()
def mean_activation(run: ActivationRun, layer: str, d_in: int, device: torch.device, max_tokens: int) -> torch.Tensor:
    """The mean of the first ``max_tokens`` stored tokens (what mean ablation puts in), once per layer."""
    total = torch.zeros(d_in, dtype=torch.float64, device=device)
    seen = 0
    for x, _, lo, hi in _chunks(run, layer, d_in, max_tokens):
        total += x[lo:hi].to(device).float().sum(0, dtype=torch.float64)
        seen += hi - lo
    return (total / seen).float()


@torch.no_grad()
def scan_latents(
    run: ActivationRun,
    layer: str,
    engine: torch.nn.Module,
    device: torch.device,
    max_tokens: int,
    contexts: int,
    window: int,
):
    """A ``report.LatentScan`` of one SAE over the first ``max_tokens`` stored tokens (store order)."""
    from sae_pipeline.report import LatentScan

    d_in, n_latents = engine.W_dec.shape[1], engine.W_dec.shape[0]
    scan = LatentScan(n_latents, contexts, window, device)
    for x, prov, lo, hi in _chunks(run, layer, d_in, max_tokens, window):
        scan.update(engine(x.to(device).float())[1].float(), prov.to(device), lo, hi)
    return scan


@torch.no_grad()
def training_holdout(
    run: ActivationRun, layer: str, engine: torch.nn.Module, device: torch.device, train_meta: dict[str, Any]
) -> dict[str, Any] | None:
    """Reconstruction on the training run's held-out slice of stored tokens (train_data's split), for comparison."""
    from sae_pipeline.train_data import TokenLoader

    fraction = (train_meta.get("settings") or {}).get("holdout_fraction")
    if fraction is None:
        return None
    d_in = int(engine.W_dec.shape[1])
    loader = TokenLoader(run, layer, d_in, SCAN_CHUNK_TOKENS, fraction, 0, SCAN_CHUNK_TOKENS)
    stats = ReconstructionStats(d_in, int(engine.W_dec.shape[0]), device)
    for batch in loader.iter_holdout(SCAN_CHUNK_TOKENS):
        x = batch.to(device).float()
        _, z, x_hat = engine(x)
        stats.update(x, x_hat.float(), z.float())
    return stats.result() if stats.n else None


def eval_texts(settings: EvalSettings, act_meta: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The held-out documents (module docstring, point 2) and where they came from."""
    from sae_pipeline.data import load_texts

    ds = act_meta["dataset"]
    if settings.eval_dataset is not None:
        split = settings.eval_split or "train"
        field_ = settings.eval_text_field or ds["text_field"]
        texts = load_texts(settings.eval_dataset, split, field_, settings.eval_limit, False, settings.seed)
        source = {"dataset": settings.eval_dataset, "split": split, "text_field": field_, "rows": [0, len(texts)]}
        return list(texts[field_]), source
    split = settings.eval_split or ds["split"]
    used = int(ds["limit"]) if split == ds["split"] else 0
    seed = ds.get("shuffle_seed") if ds.get("shuffle_seed") is not None else settings.seed
    texts = load_texts(ds["name"], split, ds["text_field"], used + settings.eval_limit, bool(ds.get("shuffle")), seed)
    if len(texts) <= used:
        raise PipelineError(
            f"HF_DATASET={ds['name']!r} split {split!r} has {len(texts)} rows and capture used the "
            f"first {used} (DATA_LIMIT): none is left for evaluation; set EVAL_DATASET to held-out "
            "texts"
        )
    rows = [used, len(texts)]
    source = {
        "dataset": ds["name"],
        "split": split,
        "text_field": ds["text_field"],
        "rows": rows,
        "shuffle": bool(ds.get("shuffle")),
    }
    return list(texts.select(range(*rows))[ds["text_field"]]), source


# -- the step ----------------------------------------------------------------------------------------------------------
@dataclass
class Member:
    """One SAE under evaluation: its training run, its engine and, once measured, what it measured."""

    run: TrainingRun
    meta: dict[str, Any]
    engine: torch.nn.Module | None = None
    result: DownstreamResult | None = None  # its layer's passes (shared with the layer's other SAEs)
    stats: ReconstructionStats | None = None  # what its splice saw
    metrics: dict[str, Any] = field(default_factory=dict)  # metrics.json but the timing, once the browser is written

    name = property(lambda self: self.run.run_id)
    condition = property(lambda self: f"sae:{self.run.run_id}")  # ':' is in no run id, so no clash with "clean"
    layer = property(lambda self: self.meta["layer_signature"])
    out = property(lambda self: self.run.dir / EVAL_DIR)
    d_in = property(lambda self: int(self.engine.W_dec.shape[1]))
    n_latents = property(lambda self: int(self.engine.W_dec.shape[0]))


@dataclass
class Evaluation:
    """What the SAEs of one evaluation share: the id, the activation run, the model, the documents, the clock."""

    settings: EvalSettings
    sae_run_id: str
    sweep: Sweep | None
    members: list[Member]
    run: ActivationRun
    act_meta: dict[str, Any]
    texts: list[str]
    source: dict[str, Any]
    clock: StageClock
    started: float = field(default_factory=time.time)
    model_id: str = ""
    lm: Any = None
    batches: list[EvalBatch] = field(default_factory=list)

    device = property(lambda self: self.clock.device)
    hook_side = property(lambda self: self.act_meta.get("hook_side", "output"))
    keep_special = property(lambda self: bool(self.act_meta.get("keep_special_tokens", False)))

    def layers(self) -> dict[str, list[Member]]:
        """The SAEs by layer, in grid order."""
        by_layer: dict[str, list[Member]] = {}
        for m in self.members:
            by_layer.setdefault(m.layer, []).append(m)
        return by_layer


def evaluate_sae(settings: EvalSettings, sae_run_id: str | None = None) -> Path:
    """Evaluate one training run, or every SAE of a sweep; returns the run's ``evaluation/`` folder, or the sweep's."""
    from sae_pipeline.model import resolve_device

    ev = open_evaluation(settings, sae_run_id, StageClock(STAGES, resolve_device(settings.device)))
    with ev.clock.stage("load"):
        load_models(ev)
    remove_stale_outputs(ev)
    for layer, members in ev.layers().items():
        evaluate_layer(ev, layer, members)
        for m in members:
            write_member_outputs(ev, m)
    return write_metrics(ev)


def open_evaluation(settings: EvalSettings, sae_run_id: str | None, clock: StageClock) -> Evaluation:
    """The SAEs the id names (module docstring, points 1 and 2), checked, before anything is loaded."""
    store = Store(settings.store_dir)
    what = "--sae_run_id" if sae_run_id else "SAE_RUN_ID"
    sae_run_id = validate_run_id(sae_run_id or settings.sae_run_id or store.read_pointer(SAE_RUN_ID_FILE), what)
    sweep = Sweep(store, sae_run_id)
    sweep = sweep if sweep.exists() else None
    runs = training_runs(store, sae_run_id)
    if sweep is not None:
        check_sweep_complete(sweep, runs)
    members = [Member(run, open_training_run(run)) for run in runs]
    run, act_meta = open_complete_run(store, members[0].meta["activation_run_id"])
    texts, source = eval_texts(settings, act_meta)
    store.ensure_writable()
    return Evaluation(settings, sae_run_id, sweep, members, run, act_meta, texts, source, clock)


def check_sweep_complete(sweep: Sweep, runs: list[TrainingRun]) -> None:
    missing = [run.run_id for run in runs if not run.model_path.is_file()]
    if missing:
        raise PipelineError(
            f"sweep {sweep.sweep_id!r} is incomplete: {len(missing)} of its {len(runs)} SAEs have no model.pt "
            f"({', '.join(missing)}); finish it with `uv run python 02_train_sae.py --sae_run_id {sweep.sweep_id}` "
            "(it continues where it stopped), then evaluate it"
        )


def open_training_run(run: TrainingRun) -> dict[str, Any]:
    """The meta.json of a finished training run; anything else is refused with what to do."""
    sae_run_id, store = run.run_id, run.store
    if not run.dir.is_dir():
        raise PipelineError(
            f"training run {sae_run_id!r} not found: {run.dir} does not exist (run 02_train_sae.py first, "
            "or pass an existing --sae_run_id)"
        )
    if not run.meta_path.is_file():
        raise PipelineError(f"{run.dir} has no {run.meta_path.name}: it is not a training run")
    meta = run.read_meta()
    if meta.get("kind") != "sae":
        raise PipelineError(f"run {sae_run_id!r} in {store.runs_dir} is not an SAE training run")
    if meta.get("status") != "complete":
        raise PipelineError(
            f"training run {sae_run_id!r} is not finished (status {meta.get('status')!r}); "
            f"resume it with `uv run python 02_train_sae.py --sae_run_id {meta.get('sweep_id') or sae_run_id}`"
        )
    if not run.model_path.is_file():
        raise PipelineError(f"{run.model_path} is missing; the training run is incomplete or was modified")
    return meta


def load_models(ev: Evaluation) -> None:
    """The SAEs and the language model, every width checked (module docstring, point 3), and the batches."""
    from sae_pipeline.model import load_config, load_language_model, resolve_dtype
    from sae_pipeline.sae import PipelineSae

    widths = {spec.signature: spec.d_model for spec in ActivationRun.layer_specs(ev.act_meta)}
    for m in ev.members:
        m.engine = PipelineSae.load(m.run.model_path, ev.device).sae_engine.eval()
        if m.d_in != widths.get(m.layer):
            raise PipelineError(
                f"{m.run.model_path} has d_in={m.d_in}, but activation run {ev.run.run_id!r} stores "
                f"width {widths.get(m.layer)} at {m.layer}; the SAE file does not belong to this run"
            )
    settings = ev.settings
    ev.model_id = settings.model_id if "model_id" in settings.model_fields_set else ev.act_meta["model_id"]
    dtype = resolve_dtype(settings.model_dtype, ev.device, load_config(ev.model_id))
    ev.lm = load_language_model(ev.model_id, settings.store_dir, ev.device, dtype)
    for layer, members in ev.layers().items():
        check_layer(ev, layer, members[0])
    ev.batches = make_batches(
        ev.lm.tokenizer, ev.texts, int(ev.act_meta["max_length"]), settings.batch_size_eval, ev.keep_special
    )
    if not ev.batches:
        raise PipelineError(f"the {len(ev.texts)} evaluation documents of {ev.source['dataset']!r} are all empty")


def check_layer(ev: Evaluation, layer: str, member: Member) -> None:
    """The model has the SAE's layer, and the width the hook sees there is the SAE's d_in."""
    if layer not in ev.lm.layers.get_layer_names():
        raise PipelineError(
            f"MODEL_ID={ev.model_id!r} has no layer {layer!r} (the SAE's layer); evaluate with the model "
            f"the SAE was trained on ({ev.act_meta['model_id']!r})"
        )
    splice = make_splice(layer, ev.hook_side, {})
    ev.lm.layers.register_hook(layer, splice)
    try:
        width = _probe_width(ev.lm.model, ev.lm.tokenizer, splice, ev.device)
    finally:
        ev.lm.layers.unregister_hook(splice.id)
    if width != member.d_in:
        raise PipelineError(
            f"the SAE of run {member.name!r} has d_in={member.d_in}, but layer {layer} of "
            f"MODEL_ID={ev.model_id!r} has width {width}; use the model the SAE was trained on "
            f"({ev.act_meta['model_id']!r})"
        )


def remove_stale_outputs(ev: Evaluation) -> None:
    """An earlier evaluation's metrics.json (and a sweep's report) go before any new one is computed, so a failed
    evaluation leaves none that passes for its result."""
    stale = [m.out / METRICS_FILE for m in ev.members]
    if ev.sweep is not None:
        stale += [ev.sweep.evaluation_path, ev.sweep.evaluation_frontier_path]
    for path in stale:
        path.unlink(missing_ok=True)


def evaluate_layer(ev: Evaluation, layer: str, members: list[Member]) -> None:
    """The clean and ablated passes once, one spliced pass per SAE (module docstring, point 4)."""
    from tqdm import tqdm

    with ev.clock.stage("scan"):
        mean = mean_activation(ev.run, layer, members[0].d_in, ev.device, ev.settings.eval_scan_tokens)
    splice = make_splice(layer, ev.hook_side, {m.condition: m.engine for m in members}, mean)
    splice.stats = {m.condition: ReconstructionStats(m.d_in, m.n_latents, ev.device) for m in members}
    conditions = (*REFERENCES, *(m.condition for m in members))
    what = (
        f"SAE {members[0].name} ({members[0].n_latents} latents, k={members[0].meta.get('k')})"
        if len(members) == 1
        else f"{len(members)} SAEs of sweep {ev.sae_run_id} (clean and ablated passes once, one per SAE)"
    )
    print(
        f"evaluating {what} at {layer} ({ev.hook_side}) of {ev.model_id} on {len(ev.texts)} held-out documents",
        file=sys.stderr,
    )
    ev.lm.layers.register_hook(layer, splice)
    try:
        with tqdm(
            total=sum(int(b.ids.shape[0]) for b in ev.batches),
            unit="doc",
            desc=f"evaluate ({len(conditions)} conditions)",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        ) as progress:
            result = downstream(ev.lm.model, splice, ev.batches, ev.device, conditions, progress, ev.clock)
    finally:
        ev.lm.layers.unregister_hook(splice.id)
    ev.clock.add("clean", result.seconds["clean"])
    ev.clock.add("ablate", sum(result.seconds[a] for a in ABLATIONS))
    ev.clock.add("splice", sum(result.seconds[m.condition] for m in members))
    for m in members:
        m.result, m.stats = result, splice.stats[m.condition]


def write_member_outputs(ev: Evaluation, m: Member) -> None:
    """One SAE's scan, held-out reconstruction, firing-frequency plot and feature browser; its metrics.json waits
    for the end (module docstring, point 5). The engine is released afterwards."""
    from sae_pipeline import report
    from sae_pipeline.plots import plot_firing_frequency

    settings, clock = ev.settings, ev.clock
    scan_started = time.perf_counter()
    with clock.stage("scan"):
        scan = scan_latents(
            ev.run,
            m.layer,
            m.engine,
            ev.device,
            settings.eval_scan_tokens,
            settings.browser_contexts,
            settings.browser_window,
        )
    scan_s = time.perf_counter() - scan_started
    with clock.stage("holdout"):
        holdout = training_holdout(ev.run, m.layer, m.engine, ev.device, m.meta)
    with clock.stage("browser"):
        downstream_metrics, recon_metrics = m.result.metrics(m.condition), m.stats.result()
        fire_freq = (m.stats.fire_counts.double() / max(m.stats.n, 1)).cpu()
        ctx = report.ContextSource(ev.run, ev.act_meta, ev.lm.tokenizer)
        detail = scan.detail_latents(settings.browser_latents)
        promoted = report.promoted_tokens(m.engine, ev.lm.model, ev.lm.tokenizer, detail)
        browser = report.browser_data(scan, ctx, promoted, settings.browser_latents, _browser_summary(ev, m))
        png = plot_firing_frequency(
            fire_freq,
            m.out / "firing_frequency.png",
            title=f"{m.name}: latent firing frequency on {m.stats.n:,} held-out tokens",
        )
        html, js = report.write_browser(browser, m.out, png)
    m.metrics = {
        **_member_header(ev, m),
        "d_in": m.d_in,
        "eval_data": _eval_data(ev),
        "downstream": downstream_metrics,
        "formulas": FORMULAS,
        "reconstruction": {"eval_texts": recon_metrics, "training_holdout": holdout},
        "firing_frequency": {
            "never_fired": int((m.stats.fire_counts == 0).sum()),
            "median": float(fire_freq.median()),
            "max": float(fire_freq.max()),
        },
        "browser": {
            "scanned_tokens": scan.n_tokens,
            "detail_latents": len(browser["details"]),
            "context_mismatches": ctx.mismatches,
        },
        "speed": {
            "tokens_per_second": m.result.tokens_per_second(m.condition),
            "seconds": m.result.seconds_of(m.condition),
            "scan_seconds": round(scan_s, 3),
            "device": str(next(ev.lm.model.parameters()).device),
        },
        "files": {"metrics": METRICS_FILE, "firing_frequency": png.name, "browser": html.name, "browser_json": js.name},
        "settings": settings.model_dump(mode="json"),
        "versions": package_versions(),
    }
    m.engine = None


def _member_header(ev: Evaluation, m: Member) -> dict[str, Any]:
    return {
        "kind": "sae_evaluation",
        "sae_run_id": m.name,
        "sweep_id": ev.sweep.sweep_id if ev.sweep is not None else None,
        "activation_run_id": ev.run.run_id,
        "model_id": ev.model_id,
        "layer_signature": m.layer,
        "hook_side": ev.hook_side,
        "keep_special_tokens": ev.keep_special,
        "n_latents": m.n_latents,
        "k": m.meta.get("k"),
        "architecture": m.meta.get("architecture"),
    }


def _browser_summary(ev: Evaluation, m: Member) -> dict[str, Any]:
    """What the feature browser's header shows."""
    header = _member_header(ev, m)
    keys = ("sae_run_id", "activation_run_id", "model_id", "hook_side", "n_latents", "k", "architecture")
    return {
        **{k: header[k] for k in keys},
        "layer": m.layer,
        "downstream": m.result.metrics(m.condition),
        "reconstruction": m.stats.result(),
    }


def _eval_data(ev: Evaluation) -> dict[str, Any]:
    return {**ev.source, "n_documents": len(ev.texts), "max_length": ev.act_meta.get("max_length")}


def write_metrics(ev: Evaluation) -> Path:
    """Every SAE's metrics.json with the time per stage, then the sweep's report; the summary. Returns the folder of
    the one SAE's evaluation, or of the sweep's."""
    timing = ev.clock.report()
    finished = {
        "elapsed_s": round(time.time() - ev.started, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    for m in ev.members:
        atomic_write_json(m.out / METRICS_FILE, {**m.metrics, "timing": timing, **finished})
        print(_member_summary(ev, m))
    if ev.sweep is None:
        print(f"  time per stage: {StageClock.describe(timing)} (total {timing['wall_s']:.1f} s)")
        return ev.members[0].out
    record = sweep_evaluation(ev, timing, finished)
    from sae_pipeline.plots import CE_PANEL, FVU_PANEL, plot_sweep_frontier

    plot_sweep_frontier(
        record["groups"],
        ev.sweep.evaluation_frontier_path,
        title=f"sweep {ev.sweep.sweep_id} on {len(ev.texts)} held-out documents",
        panels=(FVU_PANEL, CE_PANEL),
    )
    atomic_write_json(ev.sweep.evaluation_path, record)
    out = ev.sweep.evaluation_path.parent
    print(
        f"Evaluated sweep {ev.sweep.sweep_id}: {len(ev.members)} SAEs at {len(ev.layers())} layer(s), the clean and "
        f"ablated passes once per layer; time per stage: {StageClock.describe(timing)} "
        f"(total {timing['wall_s']:.1f} s)\n"
        f"  outputs in {out}: {ev.sweep.evaluation_path.name} (every SAE and each group of seeds), "
        f"{ev.sweep.evaluation_frontier_path.name} (L0 against FVU and CE-loss recovered)"
    )
    return out


def sweep_evaluation(ev: Evaluation, timing: dict[str, Any], finished: dict[str, Any]) -> dict[str, Any]:
    """The sweep's evaluation file (``store.Sweep``): every SAE's frontier numbers and each group's over seeds."""
    from sae_pipeline.sweep import seed_groups

    members = [_frontier_entry(m) for m in ev.members]
    references = {}
    for layer, (m, *_) in ev.layers().items():
        d = m.metrics["downstream"]
        keys = ("ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean", "ablation_gap_zero", "ablation_gap_mean")
        references[layer] = {k: d[k] for k in keys} | {"n_predictions": d["n_predictions"]}
    return {
        "kind": "sweep_evaluation",
        "sweep_id": ev.sweep.sweep_id,
        "activation_run_id": ev.run.run_id,
        "model_id": ev.model_id,
        "eval_data": _eval_data(ev),
        "definitions": {
            "l0, fvu": "on the held-out documents' tokens the splice replaced (reconstruction.eval_texts)",
            "ce_loss_recovered": FORMULAS["ce_loss_recovered"] + "; null with the reason when the gap is noise",
            "kl": "mean KL(p_clean || p_sae)",
            "groups": "SAEs that differ only in SEED: mean and sample standard deviation over the seeds (std null "
            "with one seed; a metric null for any seed is null for the group)",
        },
        "references": references,
        "members": members,
        "groups": seed_groups(members, FRONTIER_METRICS),
        "timing": timing,
        "versions": package_versions(),
        **finished,
    }


def _frontier_entry(m: Member) -> dict[str, Any]:
    d, r = m.metrics["downstream"], m.metrics["reconstruction"]["eval_texts"]
    keys = ("layer_signature", "layer_num", "n_latents", "n_latents_multiplier", "architecture", "top_k", "lr", "seed")
    return {
        "sae_run_id": m.name,
        **{k: m.meta.get(k) for k in keys},
        "l0": r["l0"],
        "fvu": r["fvu"],
        "ce_loss_recovered": d["ce_loss_recovered"],
        "ce_loss_recovered_reason": d["ce_loss_recovered_reason"],
        "kl": d["kl_sae"],
        "delta_loss": d["delta_loss"],
        "never_fired_fraction": r["never_fired_fraction"],
        "metrics": str(Path(m.run.run_id) / EVAL_DIR / METRICS_FILE),
    }


def _member_summary(ev: Evaluation, m: Member) -> str:
    d, r, result = m.metrics["downstream"], m.metrics["reconstruction"]["eval_texts"], m.result
    files = m.metrics["files"]
    return (
        f"Evaluated SAE {m.name} on {len(ev.texts)} held-out documents ({result.n_real_tokens:,} tokens, "
        f"{result.n_predictions:,} predictions) of {ev.source['dataset']!r}:\n"
        f"  CE clean {d['ce_clean']:.4f}, SAE {d['ce_sae']:.4f}, zero-ablated {d['ce_zero']:.4f}, "
        f"mean-ablated {d['ce_mean']:.4f}\n"
        f"{_recovered_lines(d)}\n"
        f"  reconstruction: FVU {r['fvu']:.4f}, MSE {r['mse']:.4g}, L0 {r['l0']:.1f}, never fired "
        f"{r['never_fired_fraction']:.1%} of {m.metrics['n_latents']} latents\n"
        f"  outputs in {m.out}: metrics.json, {files['firing_frequency']}, {files['browser']} (open in a browser), "
        f"{files['browser_json']}"
    )


def _recovered_lines(d: dict[str, Any]) -> str:
    """CE-loss recovered as a number only when the ablation gap is real; otherwise why there is none."""
    gap = d["ablation_gap_zero"]
    fidelity = f"delta loss {d['delta_loss']:+.4f}, KL {d['kl_sae']:.4f}"
    if d["ce_loss_recovered"] is None:
        return f"  {fidelity}\n  CE-loss recovered: none, because {d['ce_loss_recovered_reason']}"
    mean = d["ce_loss_recovered_mean_ablation"]
    return (
        f"  CE-loss recovered {d['ce_loss_recovered']:.4f} (zero-ablation gap {gap['gap']:+.4f} ± "
        f"{gap['standard_error']:.4f}; vs mean ablation {'n/a' if mean is None else f'{mean:.4f}'}), {fidelity}"
    )


def _probe_width(model, tokenizer, splice, device: torch.device) -> int:
    """The width the hook actually sees (one short clean forward)."""
    from sae_pipeline.capture import pad_batch

    ids, mask = pad_batch([tokenizer("probe")["input_ids"]], tokenizer.pad_token_id, tokenizer.padding_side == "left")
    splice.mode, splice.width = "off", None
    with torch.inference_mode():
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    if splice.width is None:
        raise PipelineError(f"the hook {splice.layer_signature!r} did not fire during the forward pass")
    return splice.width
