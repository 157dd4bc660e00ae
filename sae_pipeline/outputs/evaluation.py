"""Step 3's records: each SAE's metrics.json, a sweep's evaluation/sweep.json, and the summaries printed."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sae_pipeline.infra.timing import StageClock
from sae_pipeline.sae.metrics import describe_l0, describe_never_fired
from sae_pipeline.store.files import atomic_write_json, now, package_versions
from sae_pipeline.store.training import EVALUATION_DIR

if TYPE_CHECKING:
    from sae_pipeline.steps.evaluate import EvalJob, Measured, Member

METRICS_FILE = "metrics.json"
FRONTIER_METRICS = (
    "l0",
    "fvu",
    "ce_loss_recovered",
    "kl",
    "absorption",
)  # per SAE in the sweep's evaluation, per group of seeds
NEVER_FIRED_ON = "stored tokens of the activation run scanned for the feature browser (EVAL_SCAN_TOKENS)"
FORMULAS = {
    "ce_loss_recovered": "(ce_zero - ce_sae) / (ce_zero - ce_clean)",
    "ce_loss_recovered_mean_ablation": "(ce_mean - ce_sae) / (ce_mean - ce_clean)",
    "ce_loss_recovered_reason": "why it is null: the ablation gap (ce_zero - ce_clean) is under "
    "3 standard errors (documents as the independent units) or under 1% of ce_clean",
    "delta_loss": "ce_sae - ce_clean",
    "kl_<condition>": "mean KL(p_clean || p_condition)",
    "averages": "over real tokens only; predictions whose input or target is padding excluded",
    "never_fired": "latents with no activation on the tokens counted (never_fired.tokens, " + NEVER_FIRED_ON + ")",
}


def member_header(job: EvalJob, m: Member) -> dict[str, Any]:
    return {
        "kind": "sae_evaluation",
        "sae_run_id": m.name,
        "sweep_id": job.sweep.run_id if job.sweep is not None else None,
        "activation_run_id": job.run.run_id,
        "model_id": job.model_id,
        "layer_signature": m.layer,
        "hook_side": job.hook_side,
        "keep_special_tokens": job.keep_special,
        "n_latents": m.n_latents,
        "top_k": m.meta.get("top_k"),
        "architecture": m.meta.get("architecture"),
    }


def reconstruction(measured: Measured) -> dict[str, Any]:
    """FVU, MSE and L0 on the held-out documents' tokens the splice replaced (never-fired is counted on the scan)."""
    return {k: v for k, v in measured.splice_stats.result().items() if k != "never_fired_fraction"}


def never_fired(measured: Measured) -> dict[str, Any]:
    """Step 3's one never-fired figure: on the stored tokens of the scan, the tokens the feature browser shows."""
    scan = measured.scan
    latents = int((scan.counts == 0).sum())
    return {
        "fraction": latents / scan.n_latents,
        "latents": latents,
        "n_latents": scan.n_latents,
        "tokens": scan.n_tokens,
        "counted_on": NEVER_FIRED_ON,
    }


def browser_summary(job: EvalJob, m: Member, measured: Measured) -> dict[str, Any]:
    """What the feature browser's header shows."""
    header = member_header(job, m)
    keys = ("sae_run_id", "activation_run_id", "model_id", "hook_side", "n_latents", "top_k", "architecture")
    return {
        **{k: header[k] for k in keys},
        "layer": m.layer,
        "downstream": measured.downstream.metrics(m.condition),
        "reconstruction": reconstruction(measured),
        "never_fired": never_fired(measured),
    }


def eval_data(job: EvalJob) -> dict[str, Any]:
    return {**job.source, "n_documents": len(job.texts), "max_length": job.act_meta.get("max_length")}


def member_metrics(
    job: EvalJob, m: Member, measured: Measured, files: dict[str, str], browsed: dict[str, int]
) -> dict[str, Any]:
    """One SAE's metrics.json but its timing."""
    result, freq = measured.downstream, measured.scan.frequency()
    return {
        **member_header(job, m),
        "d_in": m.d_in,
        "eval_data": eval_data(job),
        "downstream": result.metrics(m.condition),
        "formulas": FORMULAS,
        "reconstruction": {"eval_texts": reconstruction(measured), "training_holdout": measured.holdout},
        "never_fired": never_fired(measured),
        "firing_frequency": {
            "median": float(freq.median()),
            "max": float(freq.max()),
            "tokens": measured.scan.n_tokens,
        },
        "absorption": measured.absorption,  # null unless EVAL_ABSORPTION=1 (sae/absorption.py)
        "browser": {"scanned_tokens": measured.scan.n_tokens, **browsed},
        "speed": {
            "tokens_per_second": result.tokens_per_second(m.condition),
            "seconds": result.seconds_of(m.condition),
            "scan_seconds": round(measured.scan_seconds, 3),
            "device": str(job.device),
        },
        "files": {"metrics": METRICS_FILE, **files},
        "settings": job.settings.model_dump(mode="json"),
        "versions": package_versions(),
    }


def write_metrics(job: EvalJob, metrics: dict[str, dict[str, Any]]) -> Path:
    """Every SAE's metrics.json with the time per stage, then the sweep's report; the summary. Returns the folder of
    the one SAE's evaluation, or of the sweep's."""
    timing = job.clock.report()
    finished = {"elapsed_s": round(time.time() - job.started, 1), "finished": now()}
    for m in job.members:
        metrics[m.name] = {**metrics[m.name], "timing": timing, **finished}
        atomic_write_json(m.out / METRICS_FILE, metrics[m.name])
        print(member_summary(job, m, metrics[m.name]))
    if job.sweep is None:
        print(f"  time per stage: {StageClock.describe(timing)} (total {timing['wall_s']:.1f} s)")
        return job.members[0].out
    from sae_pipeline.outputs.plots import ABSORPTION_PANEL, CE_PANEL, FVU_PANEL, plot_sweep_frontier

    record = sweep_evaluation(job, metrics, timing, finished)
    sweep = job.sweep
    title = f"sweep {sweep.run_id} on {len(job.texts)} held-out documents"
    panels = (FVU_PANEL, CE_PANEL) + ((ABSORPTION_PANEL,) if job.settings.eval_absorption else ())
    plot_sweep_frontier(record["groups"], sweep.evaluation_frontier_path, title=title, panels=panels)
    atomic_write_json(sweep.evaluation_path, record)
    print(
        f"Evaluated sweep {sweep.run_id}: {len(job.members)} SAEs at {len(job.layers())} layer(s), the clean and "
        f"ablated passes once per layer; time per stage: {StageClock.describe(timing)} "
        f"(total {timing['wall_s']:.1f} s)\n"
        f"  outputs in {sweep.evaluation_path.parent}: {sweep.evaluation_path.name} (every SAE and each group of "
        f"seeds), {sweep.evaluation_frontier_path.name} (L0 against FVU and CE-loss recovered)"
    )
    return sweep.evaluation_path.parent


def sweep_evaluation(
    job: EvalJob, metrics: dict[str, dict[str, Any]], timing: dict[str, Any], finished: dict[str, Any]
) -> dict[str, Any]:
    """The sweep's evaluation file (``store/training.Sweep``): every SAE's frontier numbers and each group's over
    seeds."""
    from sae_pipeline.sae.sweep import seed_groups

    members = [frontier_entry(m, metrics[m.name]) for m in job.members]
    references = {}
    for layer, (m, *_) in job.layers().items():
        d = metrics[m.name]["downstream"]
        keys = ("ce_clean", "ce_zero", "ce_mean", "kl_zero", "kl_mean", "ablation_gap_zero", "ablation_gap_mean")
        references[layer] = {k: d[k] for k in keys} | {"n_predictions": d["n_predictions"]}
    return {
        "kind": "sweep_evaluation",
        "sweep_id": job.sweep.run_id,
        "activation_run_id": job.run.run_id,
        "model_id": job.model_id,
        "eval_data": eval_data(job),
        "definitions": {
            "l0, fvu": "on the held-out documents' tokens the splice replaced (reconstruction.eval_texts)",
            "ce_loss_recovered": FORMULAS["ce_loss_recovered"] + "; null with the reason when the gap is noise",
            "kl": "mean KL(p_clean || p_sae)",
            "absorption": "first-letter absorption fraction (EVAL_ABSORPTION; null when off or too few letters)",
            "never_fired_fraction": FORMULAS["never_fired"],
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


def frontier_entry(m: Member, metrics: dict[str, Any]) -> dict[str, Any]:
    d, r = metrics["downstream"], metrics["reconstruction"]["eval_texts"]
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
        "absorption": (metrics.get("absorption") or {}).get("absorption_fraction"),
        "never_fired_fraction": metrics["never_fired"]["fraction"],
        "never_fired_tokens": metrics["never_fired"]["tokens"],
        "metrics": str(Path(m.run.run_id) / EVALUATION_DIR / METRICS_FILE),
    }


def member_summary(job: EvalJob, m: Member, metrics: dict[str, Any]) -> str:
    d, r, nf = metrics["downstream"], metrics["reconstruction"]["eval_texts"], metrics["never_fired"]
    files = metrics["files"]
    return (
        f"Evaluated SAE {m.name} on {len(job.texts)} held-out documents ({d['n_real_tokens']:,} tokens, "
        f"{d['n_predictions']:,} predictions) of {job.source['dataset']!r}:\n"
        f"  CE clean {d['ce_clean']:.4f}, SAE {d['ce_sae']:.4f}, zero-ablated {d['ce_zero']:.4f}, "
        f"mean-ablated {d['ce_mean']:.4f}\n"
        f"{recovered_lines(d)}\n"
        f"  reconstruction: FVU {r['fvu']:.4f}, MSE {r['mse']:.4g}, "
        f"{describe_l0(r['l0'], metrics['top_k'], metrics['architecture'])}\n"
        f"  {describe_never_fired(nf['fraction'], nf['tokens'], 'stored', nf['n_latents'])}\n"
        f"{absorption_line(metrics.get('absorption'))}"
        f"  outputs in {m.out}: metrics.json, {files['firing_frequency']}, {files['browser']} (open in a browser), "
        f"{files['browser_json']}"
    )


def recovered_lines(d: dict[str, Any]) -> str:
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


def absorption_line(result: dict[str, Any] | None) -> str:
    """EVAL_ABSORPTION's line of the summary (nothing when it is off)."""
    if result is None:
        return ""
    if result["absorption_fraction"] is None:
        return f"  absorption: none, because {result['reason']}\n"
    return (
        f"  absorption (first letter, SAEBench's definition): {result['absorption_fraction']:.4f}, full absorption "
        f"{result['full_absorption_rate']:.4f}, over {result['letters_evaluated']} letters\n"
    )
