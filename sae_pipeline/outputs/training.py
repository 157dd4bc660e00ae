"""Step 2's outputs: one SAE's run folder (model.pt, SAELens export, history, curves, meta.json), the summary
printed for it and for the sweep, and W&B runs when WANDB_PROJECT is set."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sae_pipeline.infra.timing import StageClock
from sae_pipeline.sae.metrics import describe_l0, describe_never_fired
from sae_pipeline.sae.sweep import SweepPlan
from sae_pipeline.settings import TrainSettings
from sae_pipeline.store.files import now, package_versions
from sae_pipeline.store.runs import SAE_RUN_ID_FILE
from sae_pipeline.store.training import SWEEP_FILE, TrainingRun

if TYPE_CHECKING:
    from sae_pipeline.sae.trainer import LoopState, Trainer
    from sae_pipeline.steps.train import TrainJob


def write_outputs(
    run: TrainingRun,
    trainer: Trainer,
    holdout: dict[str, Any],
    job: TrainJob,
    state: LoopState,
    timing: dict,
    wandb_run,
) -> None:
    """One SAE's folder: model.pt, saelens/, history.json, training_curves.png, then meta.json "complete"."""
    from sae_pipeline.outputs.plots import plot_training_curves
    from sae_pipeline.outputs.saelens import export_saelens

    plan = job.plan
    history = {**trainer.history, "holdout": holdout}
    if wandb_run is not None:
        wandb_run.log({f"holdout/{k}": v for k, v in holdout.items()}, step=state.step)
        wandb_run.finish()
    trainer.sae.save(run.model_path.stem, run.dir)
    extra = {"sae_run_id": run.run_id, "activation_run_id": plan.run.run_id}
    export_saelens(trainer.sae, run.saelens_dir, trainer.spec.layer, plan.act_meta, extra=extra)
    run.write_history(history)
    plot_training_curves(history, run.curves_path, title=f"{run.run_id} on {source_name(plan)}")
    run.write_meta(member_record(run, trainer, holdout, job, state, timing))
    print(summary(run, trainer, holdout, job, state, timing))


def member_record(
    run: TrainingRun, trainer: Trainer, holdout: dict[str, Any], job: TrainJob, state: LoopState, timing: dict
) -> dict[str, Any]:
    """meta.json of a complete training run."""
    plan, spec = job.plan, trainer.spec
    return {
        **plan.member_meta(spec, run.run_id),
        "status": "complete",
        "model_id": plan.act_meta.get("model_id"),
        "hook_side": plan.act_meta.get("hook_side"),
        "settings": trainer.settings.model_dump(mode="json"),
        "dead_tokens_window_used": trainer.window,
        "k_aux": trainer.k_aux,
        "total_steps": state.step,
        "tokens_trained": state.tokens,
        "n_train_tokens": job.loader.n_train,
        "n_holdout_tokens": job.loader.n_holdout,
        "device": str(job.device),
        "processes": job.dist.world_size,
        "elapsed_s": round(training_seconds(timing), 1),
        "timing": timing,
        "final_metrics": {"train": trainer.history["epochs"][-1], "holdout": holdout},
        "files": {
            "model": "model.pt",
            "saelens": "saelens/",
            "history": "history.json",
            "curves": "training_curves.png",
        },
        "versions": package_versions(),
        "finished": now(),
    }


def source_name(plan: SweepPlan) -> str:
    """What the SAEs trained on, in words: an activation run, or a model's forward (STREAM=1)."""
    if plan.run.run_id is None:
        return f"{plan.act_meta.get('model_id')}'s forward (streamed)"
    return f"activation run {plan.run.run_id}"


def training_seconds(timing: dict[str, Any]) -> float:
    return timing["wall_s"] - timing["stages_s"]["evaluate"]  # the loop, checkpoints included


def summary(
    run: TrainingRun, trainer: Trainer, holdout: dict[str, Any], job: TrainJob, state: LoopState, timing: dict
) -> str:
    spec, act_run = trainer.spec, source_name(job.plan)
    rate = state.tokens / max(training_seconds(timing), 1e-9)
    return (
        f"Trained SAE {run.run_id}: {spec.architecture}, {spec.n_latents} latents, k={spec.top_k}, layer "
        f"{spec.layer.signature} of {act_run}; {state.step} steps, {job.settings.epochs} epochs, "
        f"{state.tokens:,} tokens at {rate:,.0f} tokens/s on {job.device} ({StageClock.describe(timing)}). "
        f"Held-out: FVU {holdout['fvu']:.4f}, {describe_l0(holdout['l0'], spec.top_k, spec.architecture)}, "
        f"{describe_never_fired(holdout['never_fired_fraction'], holdout['n_tokens'], 'held-out', spec.n_latents)}, "
        f"dead (no firing in the last {trainer.window:,} training tokens) {holdout['dead_fraction']:.1%}. "
        f"In {run.dir}: model.pt ({model_loader(spec.architecture)}), saelens/, history.json, meta.json, "
        "training_curves.png."
    )


def model_loader(architecture: str) -> str:
    """Which loader computes the SAE's codes from model.pt (sae/model.py says why the threshold ones need ours)."""
    if architecture == "jumprelu":
        return "PipelineSae.load; mi_crow's TopKSae cannot represent JumpReLU"
    if architecture != "topk":
        return "PipelineSae.load for the learned threshold; mi_crow TopKSae.load uses per-token top-k"
    return "mi_crow TopKSae.load"


def report_end(plan: SweepPlan, complete: bool) -> None:
    pointer = plan.store.root / SAE_RUN_ID_FILE
    if not plan.is_sweep:
        print(f"{pointer} now names {plan.sweep_id}.")
    elif complete:
        print(
            f"Sweep {plan.sweep_id} complete: {len(plan.grid)} SAEs, listed in {plan.folder / SWEEP_FILE} with "
            f"their held-out metrics; {pointer} now names the sweep."
        )
    else:
        print(
            f"Task {plan.task_id} of {plan.task_count} of sweep {plan.sweep_id} done ({len(plan.share)} of its "
            f"{len(plan.grid)} SAEs); the last task to finish completes {plan.folder / SWEEP_FILE}."
        )


def start_wandb(settings: TrainSettings, sae_run_id: str, config: dict[str, Any], several: bool):
    """Only when WANDB_PROJECT is set; one W&B run per SAE, continued after a resume (several at once need W&B's
    ``reinit="create_new"``, wandb >= 0.19.10)."""
    if not settings.wandb_project:
        return None
    import wandb

    extra = {"reinit": "create_new"} if several else {}
    return wandb.init(
        project=settings.wandb_project, id=sae_run_id, name=sae_run_id, resume="allow", config=config, **extra
    )
