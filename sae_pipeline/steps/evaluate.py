"""Step 3: evaluate trained SAEs: downstream fidelity with each SAE spliced in, reconstruction, feature browser.

One SAE is a sweep of one: ``--sae_run_id`` (SAE_RUN_ID, else ``STORE_DIR/sae_run_id.txt``) names a training run or
a sweep (``store/training.training_runs``), and every SAE it names goes through the same code. Read top to bottom,
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
   maximum, activation values and top contexts over up to EVAL_SCAN_TOKENS stored tokens (``sae/scan.py``; the
   one never-fired figure of step 3 is counted there), and the reconstruction on the training run's held-out
   slice; then ``evaluation/`` in its training run's folder: firing_frequency.png, feature_browser.html and
   feature_browser.json (each atomically; metrics.json last, once every SAE is done);
6. for a sweep, ``evaluation/sweep.json`` and ``evaluation/frontier.png`` in the sweep's folder
   (``store/training.Sweep``): every SAE's L0, FVU, CE-loss recovered and KL, and each group of seeds' mean ±
   standard deviation; then a summary with the time per stage (load, scan, clean, ablate, splice, holdout, absorption,
   browser).

With EVAL_ABSORPTION, per layer the words' activations and letter probes once, then per SAE its first-letter
absorption (``sae/absorption.py``), in metrics.json, the summary and the sweep's report.

Definitions (every average is over real tokens only, padding never counts):

* CE_x = mean next-token cross-entropy over the predictions whose input and target are both real tokens;
* CE-loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean) (1 = as good as the model, 0 = as bad as zero
  ablation; also reported against mean ablation), or null with the reason when the ablation gap is within the
  noise of the evaluated documents (``sae/metrics.recovered_or_reason``); Δ loss = CE_sae − CE_clean;
* KL = mean over the same predictions of KL(p_clean ‖ p_condition);
* FVU, MSE and L0: ``sae/metrics.py`` on the activations the splice saw.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.progress import ProgressMeter
from sae_pipeline.infra.timing import StageClock
from sae_pipeline.lm.data import load_texts
from sae_pipeline.lm.splice import make_splice, probe_width
from sae_pipeline.lm.tokens import TokenBatch, token_batches
from sae_pipeline.outputs import evaluation as records
from sae_pipeline.sae.downstream import ABLATIONS, REFERENCES, DownstreamResult, downstream
from sae_pipeline.sae.metrics import ReconstructionStats
from sae_pipeline.sae.scan import LatentScan, mean_activation, scan_latents, training_holdout
from sae_pipeline.settings import EvalSettings
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import SAE_RUN_ID_FILE, Store, validate_run_id
from sae_pipeline.store.training import Sweep, TrainingRun, training_runs

STAGES = ("load", "scan", "clean", "ablate", "splice", "holdout", "absorption", "browser")  # where step 3's time goes


@dataclass(frozen=True)
class Member:
    """One SAE under evaluation: its training run, its meta.json and its engine (on the evaluation device)."""

    run: TrainingRun
    meta: dict[str, Any]
    engine: torch.nn.Module

    name = property(lambda self: self.run.run_id)
    condition = property(lambda self: f"sae:{self.run.run_id}")  # ':' is in no run id, so no clash with "clean"
    layer = property(lambda self: self.meta["layer_signature"])
    out = property(lambda self: self.run.evaluation_dir)
    d_in = property(lambda self: int(self.engine.W_dec.shape[1]))
    n_latents = property(lambda self: int(self.engine.W_dec.shape[0]))


@dataclass(frozen=True)
class Measured:
    """What one SAE's evaluation measured: its layer's passes (shared with the layer's other SAEs), what its splice
    saw, the scan of stored tokens and the reconstruction on the training run's held-out slice."""

    downstream: DownstreamResult
    splice_stats: ReconstructionStats
    scan: LatentScan
    holdout: dict[str, Any] | None
    scan_seconds: float
    absorption: dict[str, Any] | None = None  # EVAL_ABSORPTION's result (sae/absorption.py)


@dataclass(frozen=True)
class EvalJob:
    """What the SAEs of one evaluation share, resolved, loaded and checked once before any pass: the id, the SAEs,
    their activation run, the held-out documents and their batches, the model, the clock."""

    settings: EvalSettings
    sae_run_id: str
    sweep: Sweep | None
    members: list[Member]
    run: ActivationRun
    act_meta: dict[str, Any]
    texts: list[str]
    source: dict[str, Any]
    model_id: str
    lm: Any
    batches: list[TokenBatch]
    clock: StageClock
    started: float = field(default_factory=time.time)

    device = property(lambda self: self.clock.device)
    hook_side = property(lambda self: self.act_meta.get("hook_side", "output"))
    keep_special = property(lambda self: bool(self.act_meta.get("keep_special_tokens", False)))

    @classmethod
    def open(cls, settings: EvalSettings, sae_run_id: str | None, clock: StageClock) -> EvalJob:
        """The SAEs the id names and their activation run (module docstring, points 1 to 3)."""
        store = Store(settings.store_dir)
        what = "--sae_run_id" if sae_run_id else "SAE_RUN_ID"
        sae_run_id = validate_run_id(sae_run_id or settings.sae_run_id or store.read_pointer(SAE_RUN_ID_FILE), what)
        sweep = Sweep(store, sae_run_id) if Sweep(store, sae_run_id).exists() else None
        runs = training_runs(store, sae_run_id)
        if sweep is not None:
            sweep.check_trained(runs)
        metas = [run.open() for run in runs]
        act_run = ActivationRun(store, activation_run_of(settings, metas[0], sae_run_id))
        act_meta = act_run.open()
        texts, source = eval_texts(settings, {**act_meta, **documents_of(metas[0])})
        store.ensure_writable()
        members = load_members(runs, metas, act_run, act_meta, clock.device)
        model_id = settings.model_id if "model_id" in settings.model_fields_set else act_meta["model_id"]
        lm = load_model(settings, model_id, clock.device)
        max_length, keep_special = int(act_meta["max_length"]), bool(act_meta.get("keep_special_tokens", False))
        batches = token_batches(lm.tokenizer, texts, max_length, settings.batch_size_eval, keep_special)
        if not batches:
            raise PipelineError(f"the {len(texts)} evaluation documents of {source['dataset']!r} are all empty")
        job = cls(settings, sae_run_id, sweep, members, act_run, act_meta, texts, source, model_id, lm, batches, clock)
        for layer, layer_members in job.layers().items():
            check_layer(job, layer, layer_members[0])
        return job

    def layers(self) -> dict[str, list[Member]]:
        """The SAEs by layer, in grid order."""
        by_layer: dict[str, list[Member]] = {}
        for m in self.members:
            by_layer.setdefault(m.layer, []).append(m)
        return by_layer


def activation_run_of(settings: EvalSettings, meta: dict[str, Any], sae_run_id: str) -> str:
    """The activation run the SAEs trained on; for SAEs streamed without one (STREAM=1), the capture RUN_ID names:
    step 3 reads stored activations (mean ablation, feature browser, held-out slice), a small capture of the same
    model and layers is enough."""
    if meta.get("activation_run_id") is not None:
        return meta["activation_run_id"]
    if settings.run_id is None:
        raise PipelineError(
            f"{sae_run_id!r} was trained by streaming (STREAM=1), without an activation run, but step 3 reads stored "
            "activations (mean ablation, feature browser): capture a small run of the same MODEL_ID and LAYER_NUM "
            "with 01_save_activations.py (e.g. DATA_LIMIT=2000) and rerun with RUN_ID=<its run id>"
        )
    return settings.run_id


def documents_of(meta: dict[str, Any]) -> dict[str, Any]:
    """A streamed SAE's dataset (its held-out documents come after the rows it streamed, not after those of the
    small capture step 3 reads); nothing for an SAE trained on its activation run."""
    streamed = meta.get("streamed")
    return {"dataset": streamed["dataset"]} if streamed else {}


def evaluate_sae(settings: EvalSettings, sae_run_id: str | None = None) -> Path:
    """Evaluate one training run, or every SAE of a sweep; returns the run's ``evaluation/`` folder, or the sweep's."""
    from sae_pipeline.lm.loading import resolve_device

    clock = StageClock(STAGES, resolve_device(settings.device))
    with clock.stage("load"):
        job = EvalJob.open(settings, sae_run_id, clock)
    remove_stale_outputs(job)
    metrics = {}
    for layer, members in job.layers().items():
        passes = evaluate_layer(job, layer, members)
        spelling = spelling_probe(job, layer) if job.settings.eval_absorption else None
        for m in members:
            measured = measure_member(job, m, *passes[m.name], spelling)
            metrics[m.name] = write_member_outputs(job, m, measured)
    return records.write_metrics(job, metrics)


def eval_texts(settings: EvalSettings, act_meta: dict[str, Any]) -> tuple[list[str], dict[str, Any]]:
    """The held-out documents (module docstring, point 2) and where they came from."""
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
            f"first {used} (DATA_LIMIT): none is left for evaluation; set EVAL_DATASET to held-out texts"
        )
    rows = [used, len(texts)]
    source = {"dataset": ds["name"], "split": split, "text_field": ds["text_field"], "rows": rows}
    return list(texts.select(range(*rows))[ds["text_field"]]), {**source, "shuffle": bool(ds.get("shuffle"))}


def load_members(
    runs: list[TrainingRun], metas: list[dict], act_run: ActivationRun, act_meta: dict, device: torch.device
) -> list[Member]:
    """Every SAE's engine, its width checked against what the activation run stores at its layer."""
    from sae_pipeline.sae.model import PipelineSae

    widths = {spec.signature: spec.d_model for spec in ActivationRun.layer_specs(act_meta)}
    members = []
    for run, meta in zip(runs, metas):
        m = Member(run, meta, PipelineSae.load(run.model_path, device).sae_engine.eval())
        if m.d_in != widths.get(m.layer):
            raise PipelineError(
                f"{run.model_path} has d_in={m.d_in}, but activation run {act_run.run_id!r} stores "
                f"width {widths.get(m.layer)} at {m.layer}; the SAE file does not belong to this run"
            )
        members.append(m)
    return members


def load_model(settings: EvalSettings, model_id: str, device: torch.device):
    from sae_pipeline.lm.loading import load_config, load_language_model, resolve_dtype

    dtype = resolve_dtype(settings.model_dtype, device, load_config(model_id))
    return load_language_model(model_id, settings.store_dir, device, dtype)


def check_layer(job: EvalJob, layer: str, member: Member) -> None:
    """The model has the SAE's layer, and the width the hook sees there is the SAE's d_in."""
    trained_on = job.act_meta["model_id"]
    if layer not in job.lm.layers.get_layer_names():
        raise PipelineError(
            f"MODEL_ID={job.model_id!r} has no layer {layer!r} (the SAE's layer); evaluate with the model "
            f"the SAE was trained on ({trained_on!r})"
        )
    splice = make_splice(layer, job.hook_side, {})
    job.lm.layers.register_hook(layer, splice)
    try:
        width = probe_width(job.lm.model, job.lm.tokenizer, splice, job.device)
    finally:
        job.lm.layers.unregister_hook(splice.id)
    if width != member.d_in:
        raise PipelineError(
            f"the SAE of run {member.name!r} has d_in={member.d_in}, but layer {layer} of MODEL_ID={job.model_id!r} "
            f"has width {width}; use the model the SAE was trained on ({trained_on!r})"
        )


def remove_stale_outputs(job: EvalJob) -> None:
    """An earlier evaluation's metrics.json (and a sweep's report) go before any new one is computed, so a failed
    evaluation leaves none that passes for its result."""
    stale = [m.out / records.METRICS_FILE for m in job.members]
    if job.sweep is not None:
        stale += [job.sweep.evaluation_path, job.sweep.evaluation_frontier_path]
    for path in stale:
        path.unlink(missing_ok=True)


def evaluate_layer(
    job: EvalJob, layer: str, members: list[Member]
) -> dict[str, tuple[DownstreamResult, ReconstructionStats]]:
    """The clean and ablated passes once, one spliced pass per SAE (module docstring, point 4); per SAE its layer's
    result and what its splice saw."""
    with job.clock.stage("scan"):
        mean = mean_activation(job.run, layer, members[0].d_in, job.device, job.settings.eval_scan_tokens)
    splice = make_splice(layer, job.hook_side, {m.condition: m.engine for m in members}, mean)
    splice.stats = {m.condition: ReconstructionStats(m.d_in, m.n_latents, job.device) for m in members}
    conditions = (*REFERENCES, *(m.condition for m in members))
    first = members[0]
    what = (
        f"SAE {first.name} ({first.n_latents} latents, k={first.meta.get('top_k')})"
        if len(members) == 1
        else f"{len(members)} SAEs of sweep {job.sae_run_id} (clean and ablated passes once, one per SAE)"
    )
    print(
        f"evaluating {what} at {layer} ({job.hook_side}) of {job.model_id} on {len(job.texts)} held-out documents",
        file=sys.stderr,
    )
    n_docs = sum(int(b.ids.shape[0]) for b in job.batches)
    job.lm.layers.register_hook(layer, splice)
    try:
        name = f"evaluate ({len(conditions)} conditions)"
        with ProgressMeter(name, n_docs, "doc", every_s=job.settings.progress_every_seconds) as meter:
            result = downstream(job.lm.model, splice, job.batches, job.device, conditions, meter, job.clock)
    finally:
        job.lm.layers.unregister_hook(splice.id)
    job.clock.add("clean", result.seconds["clean"])
    job.clock.add("ablate", sum(result.seconds[a] for a in ABLATIONS))
    job.clock.add("splice", sum(result.seconds[m.condition] for m in members))
    return {m.name: (result, splice.stats[m.condition]) for m in members}


def spelling_probe(job: EvalJob, layer: str):
    """EVAL_ABSORPTION: the words' activations at the layer and the letter probes, once for the layer's SAEs."""
    from sae_pipeline.sae.absorption import SpellingProbe

    s = job.settings
    with job.clock.stage("absorption"):
        return SpellingProbe.build(
            job.lm, layer, job.hook_side, job.device, s.absorption_letters, s.absorption_words, s.seed
        )


def measure_member(
    job: EvalJob, m: Member, result: DownstreamResult, stats: ReconstructionStats, spelling=None
) -> Measured:
    """One SAE's scan of stored tokens, its reconstruction on the training run's held-out slice and, with
    EVAL_ABSORPTION, its first-letter absorption."""
    settings, clock = job.settings, job.clock
    started = time.perf_counter()
    with clock.stage("scan"):
        scan = scan_latents(
            job.run,
            m.layer,
            m.engine,
            job.device,
            settings.eval_scan_tokens,
            settings.browser_contexts,
            settings.browser_window,
        )
    scan_s = time.perf_counter() - started
    with clock.stage("holdout"):
        holdout = training_holdout(job.run, m.layer, m.engine, job.device, m.meta)
    with clock.stage("absorption"):
        absorption = spelling.measure(m.engine) if spelling is not None else None
    return Measured(result, stats, scan, holdout, scan_s, absorption)


def write_member_outputs(job: EvalJob, m: Member, measured: Measured) -> dict[str, Any]:
    """One SAE's firing-frequency plot and feature browser; returns its metrics.json but the timing, which waits for
    the end (module docstring, point 5)."""
    from sae_pipeline.interpret.summary import interpretation_for_browser
    from sae_pipeline.outputs import browser
    from sae_pipeline.outputs.plots import plot_firing_frequency

    settings, scan = job.settings, measured.scan
    with job.clock.stage("browser"):
        ctx = browser.ContextSource(job.run, job.act_meta, job.lm.tokenizer)
        detail = scan.detail_latents(settings.browser_latents)
        promoted = browser.promoted_tokens(m.engine, job.lm.model, job.lm.tokenizer, detail)
        summary = records.browser_summary(job, m, measured)
        data = browser.browser_data(scan, ctx, promoted, settings.browser_latents, summary)
        data |= interpretation_for_browser(m.run)  # step 4's explanations and scores, when it ran
        png = plot_firing_frequency(
            scan.frequency(),
            m.out / "firing_frequency.png",
            title=f"{m.name}: latent firing frequency on {scan.n_tokens:,} stored tokens",
        )
        html, js = browser.write_browser(data, m.out, png)
    files = {"firing_frequency": png.name, "browser": html.name, "browser_json": js.name}
    browsed = {"detail_latents": len(data["details"]), "context_mismatches": ctx.mismatches}
    return records.member_metrics(job, m, measured, files, browsed)
