"""Step 3: evaluate a trained SAE: downstream fidelity with the SAE spliced in, reconstruction, feature browser.

Read top to bottom, ``evaluate_sae`` does:

1. resolve the training run (``--sae_run_id``, SAE_RUN_ID, else ``STORE_DIR/sae_run_id.txt``) and its activation run;
   the layer, hook side, special-token rule and max length all come from them, so evaluation sees the tokens the
   SAE was trained on;
2. pick the held-out documents: rows ``[DATA_LIMIT, DATA_LIMIT + EVAL_LIMIT)`` of the run's dataset (capture used
   the first DATA_LIMIT rows, after the same seeded shuffle if any), or the first EVAL_LIMIT rows of EVAL_DATASET;
3. load the SAE and the model (MODEL_ID defaults to the run's model) and check that the layer's width is the SAE's
   d_in;
4. scan up to EVAL_SCAN_TOKENS stored tokens of the activation run: the mean activation (for mean ablation) and,
   for the feature browser, every latent's firing frequency, maximum, activation values and top contexts;
5. for every batch of held-out documents run four full forwards (one batched pass per condition): clean, the SAE
   spliced in, zero-ablated and mean-ablated. The splice is a lean mi_crow ``Controller`` on the layer's signature
   (the hook side of the capture: the module's output, or its input as a pre-forward hook) that runs the SAE on the
   batch tensor and replaces exactly the positions capture stored (real tokens; special tokens only with
   KEEP_SPECIAL_TOKENS). mi_crow's own ``Sae`` controller path builds a Python dict per token and is not used;
6. write ``evaluation/`` in the training run's folder: metrics.json, firing_frequency.png, feature_browser.html
   and feature_browser.json (each atomically; metrics.json last), and print a summary.

Definitions (every average is over real tokens only, padding never counts):

* CE_x = mean next-token cross-entropy over the predictions whose input and target are both real tokens;
* CE-loss recovered = (CE_zero − CE_sae) / (CE_zero − CE_clean) (1 = as good as the model, 0 = as bad as zero
  ablation; also reported against mean ablation), or null with the reason when the ablation gap is within the
  noise of the evaluated documents (``metrics.recovered_or_reason``); Δ loss = CE_sae − CE_clean;
* KL = mean over the same predictions of KL(p_clean ‖ p_condition);
* FVU, MSE, L0 and the never-fired fraction: ``sae_pipeline.metrics`` on the activations the splice saw.
"""

from __future__ import annotations

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
    META_FILE,
    SAE_RUN_ID_FILE,
    ActivationRun,
    Store,
    atomic_write_json,
    open_complete_run,
    package_versions,
    read_json,
    validate_run_id,
)

CONDITIONS = ("clean", "sae", "zero", "mean")
ABLATIONS = ("zero", "mean")
EVAL_DIR = "evaluation"
MODEL_FILE = "model.pt"
SCAN_CHUNK_TOKENS = 4096


# -- definitions -------------------------------------------------------------------------------------------------------
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
def make_splice(signature: str, hook_side: str, engine: torch.nn.Module, mean: torch.Tensor | None = None):
    """A mi_crow Controller on ``signature`` that, per mode, replaces the ``keep`` positions of the batch tensor.

    Modes: ``off`` (clean; the hook returns at once), ``sae`` (``engine(x) -> (pre, z, x_hat)`` on the kept rows,
    one call per batch), ``zero``, ``mean``. Set ``keep`` before each forward. In ``sae`` mode the rows it saw and
    their reconstruction update ``stats`` when set. Outputs are replaced in place (as mi_crow does); inputs are
    replaced in a copy, because a module's input is often also the residual stream it is added back to.
    """
    from mi_crow.hooks import Controller
    from mi_crow.hooks.hook import HookType

    class SaeSplice(Controller):
        def __init__(self) -> None:
            side = HookType.PRE_FORWARD if hook_side == "input" else HookType.FORWARD
            super().__init__(hook_type=side, hook_id="sae_pipeline_splice", layer_signature=signature)
            self.engine, self.mean = engine, mean
            self.mode = "off"
            self.keep: torch.Tensor | None = None
            self.stats: ReconstructionStats | None = None
            self.calls = 0
            self.width: int | None = None

        def modify_activations(self, module, inputs, output):
            tensor = inputs if self.hook_type == HookType.PRE_FORWARD else output
            self.calls += 1
            self.width = int(tensor.shape[-1])
            if self.mode == "off":
                return None
            keep = self.keep
            if self.mode == "sae":
                x = tensor[keep].float()
                _, z, x_hat = self.engine(x)
                if self.stats is not None:
                    self.stats.update(x, x_hat.float(), z.float())
                new = x_hat.to(tensor.dtype)
            elif self.mode == "zero":
                new = torch.zeros((), dtype=tensor.dtype, device=tensor.device)
            elif self.mode == "mean":
                new = self.mean.to(device=tensor.device, dtype=tensor.dtype)
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
    ce: dict[str, float]
    kl: dict[str, float]
    n_predictions: int
    n_real_tokens: int
    n_spliced_tokens: int
    seconds: dict[str, float] = field(default_factory=dict)
    gaps: dict[str, dict[str, float]] = field(default_factory=dict)  # ablation -> AblationGap.result()

    def metrics(self) -> dict[str, Any]:
        ce = self.ce
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
        out.update({f"kl_{c}": v for c, v in self.kl.items()})
        out.update(
            n_predictions=self.n_predictions, n_real_tokens=self.n_real_tokens, n_spliced_tokens=self.n_spliced_tokens
        )
        return out

    def tokens_per_second(self) -> dict[str, float]:
        return {c: self.n_real_tokens / s for c, s in self.seconds.items() if s > 0}


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
) -> DownstreamResult:
    """Next-token CE (and KL from clean) per condition, one full forward per condition and batch.

    ``conditions`` must start with ``clean`` when more than one is given (KL needs the clean distribution).
    Sums stay on the device; padding and predictions of or from a pad never count. For each ablation the
    per-prediction difference from clean is also accumulated by document, for the gap's standard error.
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
            splice.mode = "off" if cond == "clean" else cond
            calls = splice.calls
            try:
                logits = model(input_ids=b.ids, attention_mask=b.mask, position_ids=b.positions, use_cache=False).logits
            finally:
                splice.mode = "off"
            if splice.calls == calls:
                raise PipelineError(f"the hook {splice.layer_signature!r} did not fire during the forward pass")
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


# -- scanning the stored activations ----------------------------------------------------------------------------------
@torch.no_grad()
def scan_activations(
    run: ActivationRun,
    layer: str,
    engine: torch.nn.Module,
    device: torch.device,
    max_tokens: int,
    contexts: int,
    window: int,
):
    """Mean activation and a ``report.LatentScan`` over the first ``max_tokens`` stored tokens (store order)."""
    from sae_pipeline.report import LatentScan

    d_in, n_latents = engine.W_dec.shape[1], engine.W_dec.shape[0]
    scan = LatentScan(n_latents, contexts, window, device)
    total = torch.zeros(d_in, dtype=torch.float64, device=device)
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
            a, b = max(0, s - window), min(acts.shape[0], e + window)  # neighbours for the context windows
            x = acts[a:b].to(device).float()
            z = engine(x)[1].float()
            total += x[s - a : e - a].sum(0, dtype=torch.float64)
            scan.update(z, prov[a:b].to(device), s - a, e - a)
        seen += n
    if seen == 0:
        raise PipelineError(f"activation run {run.run_id!r} has no stored tokens in {run.dir}")
    return (total / seen).float(), scan


# -- the step ----------------------------------------------------------------------------------------------------------
def open_training_run(store: Store, sae_run_id: str) -> tuple[Path, dict[str, Any]]:
    out = store.run_dir(sae_run_id)
    if not out.is_dir():
        raise PipelineError(
            f"training run {sae_run_id!r} not found: {out} does not exist (run 02_train_sae.py first, "
            "or pass an existing --sae_run_id)"
        )
    if not (out / META_FILE).is_file():
        raise PipelineError(f"{out} has no {META_FILE}: it is not a training run")
    meta = read_json(out / META_FILE)
    if meta.get("kind") != "sae":
        raise PipelineError(f"run {sae_run_id!r} in {store.runs_dir} is not an SAE training run")
    if meta.get("status") != "complete":
        raise PipelineError(
            f"training run {sae_run_id!r} is not finished (status {meta.get('status')!r}); "
            f"resume it with `uv run python 02_train_sae.py --sae_run_id {sae_run_id}`"
        )
    if not (out / MODEL_FILE).is_file():
        raise PipelineError(f"{out / MODEL_FILE} is missing; the training run is incomplete or was modified")
    return out, meta


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


def evaluate_sae(settings: EvalSettings, sae_run_id: str | None = None) -> Path:
    """Evaluate one training run; returns its ``evaluation/`` folder."""
    started = time.time()
    store = Store(settings.store_dir)
    what = "--sae_run_id" if sae_run_id else "SAE_RUN_ID"
    sae_run_id = validate_run_id(sae_run_id or settings.sae_run_id or store.read_pointer(SAE_RUN_ID_FILE), what)
    sae_dir, train_meta = open_training_run(store, sae_run_id)
    run, act_meta = open_complete_run(store, train_meta["activation_run_id"])
    layer = train_meta["layer_signature"]
    hook_side = act_meta.get("hook_side", "output")
    keep_special = bool(act_meta.get("keep_special_tokens", False))
    texts, source = eval_texts(settings, act_meta)
    store.ensure_writable()

    from sae_pipeline.model import load_config, load_language_model, resolve_device, resolve_dtype
    from sae_pipeline.sae import PipelineSae

    device = resolve_device(settings.device)
    sae = PipelineSae.load(sae_dir / MODEL_FILE, device)
    engine = sae.sae_engine.eval()
    d_in, n_latents = int(engine.W_dec.shape[1]), int(engine.W_dec.shape[0])
    width = {spec.signature: spec.d_model for spec in ActivationRun.layer_specs(act_meta)}.get(layer)
    if d_in != width:
        raise PipelineError(
            f"{sae_dir / MODEL_FILE} has d_in={d_in}, but activation run {run.run_id!r} stores "
            f"width {width} at {layer}; the SAE file does not belong to this run"
        )

    model_id = settings.model_id if "model_id" in settings.model_fields_set else act_meta["model_id"]
    config = load_config(model_id)
    dtype = resolve_dtype(settings.model_dtype, device, config)
    lm = load_language_model(model_id, settings.store_dir, device, dtype)
    names = lm.layers.get_layer_names()
    if layer not in names:
        raise PipelineError(
            f"MODEL_ID={model_id!r} has no layer {layer!r} (the SAE's layer); evaluate with the model "
            f"the SAE was trained on ({act_meta['model_id']!r})"
        )
    splice = make_splice(layer, hook_side, engine)
    lm.layers.register_hook(layer, splice)
    try:
        width = _probe_width(lm.model, lm.tokenizer, splice, device)
        if width != d_in:
            raise PipelineError(
                f"the SAE of run {sae_run_id!r} has d_in={d_in}, but layer {layer} of "
                f"MODEL_ID={model_id!r} has width {width}; use the model the SAE was trained on "
                f"({act_meta['model_id']!r})"
            )
        batches = make_batches(lm.tokenizer, texts, int(act_meta["max_length"]), settings.batch_size_eval, keep_special)
        if not batches:
            raise PipelineError(f"the {len(texts)} evaluation documents of {source['dataset']!r} are all empty")

        print(
            f"evaluating SAE {sae_run_id} ({n_latents} latents, k={train_meta.get('k')}) at {layer} "
            f"({hook_side}) of {model_id} on {len(texts)} held-out documents",
            file=sys.stderr,
        )
        t0 = time.time()
        mean, scan = scan_activations(
            run, layer, engine, device, settings.eval_scan_tokens, settings.browser_contexts, settings.browser_window
        )
        scan_s = time.time() - t0
        splice.mean = mean
        splice.stats = ReconstructionStats(d_in, n_latents, device)
        from tqdm import tqdm

        with tqdm(
            total=sum(int(b.ids.shape[0]) for b in batches),
            unit="doc",
            desc="evaluate (4 conditions)",
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        ) as progress:
            result = downstream(lm.model, splice, batches, device, CONDITIONS, progress)
        recon = splice.stats
    finally:
        lm.layers.unregister_hook(splice.id)

    holdout = _training_holdout(run, layer, d_in, engine, device, train_meta)
    out = sae_dir / EVAL_DIR
    return _write_outputs(
        out,
        settings,
        sae_run_id,
        train_meta,
        act_meta,
        model_id,
        layer,
        hook_side,
        keep_special,
        source,
        len(texts),
        result,
        recon,
        holdout,
        scan,
        scan_s,
        lm,
        engine,
        run,
        started,
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


@torch.no_grad()
def _training_holdout(
    run: ActivationRun, layer: str, d_in: int, engine, device: torch.device, train_meta: dict[str, Any]
) -> dict[str, Any] | None:
    """Reconstruction on the training run's held-out slice of stored tokens (train_data's split), for comparison."""
    from sae_pipeline.train_data import TokenLoader

    fraction = (train_meta.get("settings") or {}).get("holdout_fraction")
    if fraction is None:
        return None
    loader = TokenLoader(run, layer, d_in, SCAN_CHUNK_TOKENS, fraction, 0, SCAN_CHUNK_TOKENS)
    stats = ReconstructionStats(d_in, int(engine.W_dec.shape[0]), device)
    for batch in loader.iter_holdout(SCAN_CHUNK_TOKENS):
        x = batch.to(device).float()
        _, z, x_hat = engine(x)
        stats.update(x, x_hat.float(), z.float())
    return stats.result() if stats.n else None


def _write_outputs(
    out: Path,
    settings: EvalSettings,
    sae_run_id: str,
    train_meta: dict[str, Any],
    act_meta: dict[str, Any],
    model_id: str,
    layer: str,
    hook_side: str,
    keep_special: bool,
    source: dict[str, Any],
    n_docs: int,
    result: DownstreamResult,
    recon: ReconstructionStats,
    holdout: dict[str, Any] | None,
    scan,
    scan_s: float,
    lm,
    engine,
    run: ActivationRun,
    started: float,
) -> Path:
    from sae_pipeline import report
    from sae_pipeline.plots import plot_firing_frequency

    downstream_metrics = result.metrics()
    recon_metrics = recon.result()
    fire_freq = (recon.fire_counts.double() / max(recon.n, 1)).cpu()
    ctx = report.ContextSource(run, act_meta, lm.tokenizer)
    promoted = report.promoted_tokens(engine, lm.model, lm.tokenizer, scan.detail_latents(settings.browser_latents))
    summary = {
        "sae_run_id": sae_run_id,
        "activation_run_id": run.run_id,
        "model_id": model_id,
        "layer": layer,
        "hook_side": hook_side,
        "n_latents": int(engine.W_dec.shape[0]),
        "k": train_meta.get("k"),
        "architecture": train_meta.get("architecture"),
        "downstream": downstream_metrics,
        "reconstruction": recon_metrics,
    }
    browser = report.browser_data(scan, ctx, promoted, settings.browser_latents, summary)
    png = plot_firing_frequency(
        fire_freq,
        out / "firing_frequency.png",
        title=f"{sae_run_id}: latent firing frequency on {recon.n:,} held-out tokens",
    )
    html, js = report.write_browser(browser, out, png)
    metrics = {
        "kind": "sae_evaluation",
        "sae_run_id": sae_run_id,
        "activation_run_id": run.run_id,
        "model_id": model_id,
        "layer_signature": layer,
        "hook_side": hook_side,
        "keep_special_tokens": keep_special,
        "n_latents": int(engine.W_dec.shape[0]),
        "d_in": int(engine.W_dec.shape[1]),
        "k": train_meta.get("k"),
        "architecture": train_meta.get("architecture"),
        "eval_data": {**source, "n_documents": n_docs, "max_length": act_meta.get("max_length")},
        "downstream": downstream_metrics,
        "formulas": {
            "ce_loss_recovered": "(ce_zero - ce_sae) / (ce_zero - ce_clean)",
            "ce_loss_recovered_mean_ablation": "(ce_mean - ce_sae) / (ce_mean - ce_clean)",
            "ce_loss_recovered_reason": "why it is null: the ablation gap (ce_zero - ce_clean) is under "
            "3 standard errors (documents as the independent units) or under 1% of ce_clean",
            "delta_loss": "ce_sae - ce_clean",
            "kl_<condition>": "mean KL(p_clean || p_condition)",
            "averages": "over real tokens only; predictions whose input or target is padding excluded",
        },
        "reconstruction": {"eval_texts": recon_metrics, "training_holdout": holdout},
        "firing_frequency": {
            "never_fired": int((recon.fire_counts == 0).sum()),
            "median": float(fire_freq.median()),
            "max": float(fire_freq.max()),
        },
        "browser": {
            "scanned_tokens": scan.n_tokens,
            "detail_latents": len(browser["details"]),
            "context_mismatches": ctx.mismatches,
        },
        "speed": {
            "tokens_per_second": result.tokens_per_second(),
            "seconds": result.seconds,
            "scan_seconds": round(scan_s, 3),
            "device": str(next(lm.model.parameters()).device),
        },
        "files": {
            "metrics": "metrics.json",
            "firing_frequency": png.name,
            "browser": html.name,
            "browser_json": js.name,
        },
        "settings": settings.model_dump(mode="json"),
        "versions": package_versions(),
        "elapsed_s": round(time.time() - started, 1),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(out / "metrics.json", metrics)
    d = downstream_metrics

    print(
        f"Evaluated SAE {sae_run_id} on {n_docs} held-out documents ({result.n_real_tokens:,} tokens, "
        f"{result.n_predictions:,} predictions) of {source['dataset']!r}:\n"
        f"  CE clean {d['ce_clean']:.4f}, SAE {d['ce_sae']:.4f}, zero-ablated {d['ce_zero']:.4f}, "
        f"mean-ablated {d['ce_mean']:.4f}\n"
        f"{_recovered_lines(d)}\n"
        f"  reconstruction: FVU {recon_metrics['fvu']:.4f}, MSE {recon_metrics['mse']:.4g}, "
        f"L0 {recon_metrics['l0']:.1f}, never fired {recon_metrics['never_fired_fraction']:.1%} of "
        f"{int(engine.W_dec.shape[0])} latents\n"
        f"  outputs in {out}: metrics.json, {png.name}, {html.name} (open in a browser), {js.name}"
    )
    return out
