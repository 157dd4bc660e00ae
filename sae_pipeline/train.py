"""Step 2: train every SAE of a sweep on an activation run, resumably; one SAE is a sweep of one.

Read top to bottom, ``train_sae``:

1. plans the sweep (``sweep.plan_sweep``): the activation run, its layers, the grid of SAEs, their ids, this task's
   share; bad values, ids holding something else and runs started with other settings are refused before any work;
2. builds one ``Trainer`` per SAE and one shuffled ``TokenLoader`` per layer, and refuses a sweep that does not fit
   in memory (``sweep.MemoryEstimate``);
3. resumes every trainer from the committed checkpoint step (``store.CheckpointCommit``), or initialises them:
   b_dec = geometric median of a data sample, random unit-norm decoder, encoder = decoder transpose;
4. ``fit``: every step reads one batch per layer and every trainer of that layer steps on it; a checkpoint every
   CHECKPOINT_EVERY_STEPS steps, at each epoch end and on SIGUSR1/SIGTERM (then exit 75, the sbatch wrapper
   requeues);
5. evaluates every SAE on the held-out slice and writes its run folder (model.pt, saelens/, history.json,
   training_curves.png, meta.json), then sweep.json and STORE_DIR/sae_run_id.txt, and deletes the checkpoints.

``Trainer.step`` (one SAE, one batch): loss = FVU of the batch + AUXK_ALPHA x AuxK + L1_LAMBDA x mean|z|; Adam with
linear warm-up and final linear decay; the decoder-norm-changing part of its gradient removed, gradient clipping,
unit-norm decoder after every step; autocast on CUDA. AuxK (Gao et al. 2024): e = (x − x̂) detached;
ê = W_dec · TopK_{k_aux}(pre-activations of dead latents), without b_dec;
loss = Σ‖e − ê‖² / Σ‖e − mean e‖² x min(n_dead / k_aux, 1), k_aux = d_in / 2. A latent is dead when it
has not fired in the last DEAD_TOKENS_WINDOW training tokens, a window capped at a tenth of the run's training
tokens so that short runs get one too.

Exact resume. A checkpoint holds everything a step depends on (weights, Adam, schedule, scaler, dead-latent
counters, pending metrics, history) and the loader's position is a pure function of (run, DATA_SEED, epoch, step),
so a resumed run replays exactly what the uninterrupted one does: on CPU the final model is bit for bit the same.

Several processes (torchrun; ``dist`` from the cli layer, see distributed.py): every rank holds every SAE and
trains on its part of each global step's batch (train_data.py says which tokens); per SAE and step one all-reduce
makes gradients, dead-latent counters, logged loss and BatchTopK threshold global, so every rank steps identically;
one more per step agrees on a stop. Rank 0 alone writes checkpoints and outputs. Which tokens a step trains on
depends on the number of processes (train_data.py), so a checkpoint resumes only with the same number: another is
refused in one line rather than silently repeating and dropping part of the interrupted epoch.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from sae_pipeline.distributed import Dist
from sae_pipeline.errors import PipelineError
from sae_pipeline.metrics import ReconstructionStats, dead_fraction, fvu
from sae_pipeline.preemption import StopFlag, StopRequested
from sae_pipeline.settings import TrainSettings
from sae_pipeline.store import SAE_RUN_ID_FILE, SWEEP_FILE, CheckpointCommit, TrainingRun, package_versions
from sae_pipeline.sweep import MemoryEstimate, SaeSpec, SweepPlan, plan_sweep
from sae_pipeline.timing import StageClock
from sae_pipeline.train_data import TokenLoader

if TYPE_CHECKING:
    from sae_pipeline.sae import BiasedTopKEngine, PipelineSae

B_DEC_SAMPLE_TOKENS = 32_768
AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
STAGES = ("read", "step", "checkpoint", "evaluate")  # where step 2's time goes (timing.StageClock)


def train_sae(
    settings: TrainSettings,
    run_id: str | None = None,
    sae_run_id: str | None = None,
    stop: StopFlag | None = None,
    dist: Dist | None = None,
) -> Path:
    """Train (or resume) the SAEs the settings describe; returns the folder of the one SAE, or of the sweep.
    ``dist``: this process's place in a torchrun launch (default: the only process)."""
    dist = dist or Dist()
    plan = plan_sweep(settings, run_id, sae_run_id)
    if _nothing_to_do(plan, dist):
        return plan.folder
    device = dist.device(settings.device)
    loaders = open_loaders(plan, device, dist)
    check_memory(plan, loaders, device, dist.world_size)
    dist.init(device)
    dist.barrier()  # every rank has looked at the run folders before rank 0 writes into them

    loader = next(iter(loaders.values()))
    total_steps = loader.steps_per_epoch * settings.epochs
    window = min(settings.dead_tokens_window, max(settings.batch_size_train, loader.n_train * settings.epochs // 10))
    model_id = plan.act_meta.get("model_id")
    trainers = [Trainer(spec, settings, total_steps, window, device, dist, model_id) for spec in plan.specs()]
    runs, commit, clock = plan.runs(), plan.commit(), StageClock(STAGES, device)
    progress = resume(runs, trainers, commit, clock, dist)
    if progress is None:
        progress = Progress()
        initialize(trainers, loaders, plan, dist)

    stop = stop or StopFlag().install()
    wandb = [_start_wandb(settings, r.run_id, plan.config, len(runs) > 1) if dist.is_main else None for r in runs]
    bar = _progress(loader.n_train * settings.epochs, progress.tokens, plan.sweep_id, disable=not dist.is_main)
    save = partial(save_checkpoint, runs, trainers, commit, progress, clock, dist)
    finished = fit(
        trainers,
        loaders,
        progress,
        settings,
        save,
        lambda: dist.any(stop.requested, device),
        clock,
        partial(_report_step, bar, wandb, progress),
    )
    bar.close()
    if not finished:
        dist.barrier()  # no rank exits (and makes torchrun kill the others) before rank 0 has saved
        raise StopRequested(
            f"stopped by {stop.signal_name or 'another rank'} at step {progress.step} of {total_steps}; "
            f"checkpoint saved, rerun with --sae_run_id {plan.sweep_id} to continue"
        )

    with clock.stage("evaluate"):
        holdout = evaluate_holdout(trainers, loaders, settings.batch_size_train, device, dist)
    if dist.is_main:
        wall = clock.wall_seconds()
        timing = clock.report(wall, gpu_span_s=wall - clock.seconds()["evaluate"])  # GPU busy: over the loop
        for run, trainer, metrics, wandb_run in zip(runs, trainers, holdout, wandb):
            if run.status() != "complete":
                write_outputs(run, trainer, metrics, plan, progress, timing, loader, dist, wandb_run)
        _report_end(plan, plan.finalize())
    dist.barrier()
    return plan.folder


def open_loaders(plan: SweepPlan, device: torch.device, dist: Dist) -> dict[str, TokenLoader]:
    """One shuffled loader per layer the process trains, all with the sweep's data seed (the same token order)."""
    s = plan.settings
    return {
        layer.signature: TokenLoader(
            plan.run,
            layer.signature,
            layer.d_model,
            s.batch_size_train,
            s.holdout_fraction,
            plan.data_seed,
            s.shuffle_buffer_tokens,
            dist.rank,
            dist.world_size,
            pin_memory=device.type == "cuda",
        )
        for layer in plan.layers_trained()
    }


def _nothing_to_do(plan: SweepPlan, dist: Dist) -> bool:
    if plan.share and not plan.finished():
        return False
    if dist.is_main and not plan.share:
        print(
            f"task {plan.task_id} of {plan.task_count}: the sweep has only {len(plan.grid)} SAEs, none is this "
            "task's; nothing to do",
            file=sys.stderr,
        )
    elif dist.is_main:
        plan.finalize()
        print(f"training run {plan.sweep_id!r} is already finished ({plan.folder}); nothing to do", file=sys.stderr)
    return True


def _report_step(bar, wandb: list, progress: Progress, n_tokens: int, lines: list[dict[str, Any]] | None) -> None:
    """The progress bar, and on log steps W&B (when set up)."""
    bar.update(n_tokens)
    if lines:
        bar.set_postfix(fvu=f"{lines[0]['fvu']:.3f}", l0=f"{lines[0]['l0']:.1f}", refresh=False)
        for wandb_run, line in zip(wandb, lines):
            if wandb_run is not None:
                wandb_run.log(line, step=progress.step)


def _report_end(plan: SweepPlan, complete: bool) -> None:
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


# -- the loop ------------------------------------------------------------------------------------------------------
@dataclass
class Progress:
    """Where the loop stands; the same for every SAE of the process, since they step together."""

    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens: int = 0


def fit(
    trainers: list[Trainer],
    loaders: dict[str, TokenLoader],
    progress: Progress,
    settings: TrainSettings,
    save: Callable[[], None],
    stop_requested: Callable[[], bool],
    clock: StageClock,
    report: Callable[[int, list | None], None],
) -> bool:
    """The loop: every global step, one batch per layer, and every trainer of that layer steps on it; history lines
    and checkpoints on schedule. False when a stop was requested (the checkpoint then saved), True at the end."""
    layers = list(loaders)
    by_layer = [[t for t in trainers if t.spec.layer.signature == layer] for layer in layers]
    while progress.epoch < settings.epochs:
        streams = [loaders[layer].iter_epoch(progress.epoch, progress.step_in_epoch, clock.device) for layer in layers]
        for batches in clock.reading(zip(*streams)):
            with clock.stage("step"), clock.gpu_busy():
                for x, layer_trainers in zip(batches, by_layer):
                    for trainer in layer_trainers:
                        n_tokens = trainer.step(x)
            progress.step += 1
            progress.step_in_epoch += 1
            progress.tokens += n_tokens
            log = progress.step % settings.log_every_steps == 0
            report(n_tokens, [t.log_line(progress) for t in trainers] if log else None)
            stopping = stop_requested()
            if stopping or progress.step % settings.checkpoint_every_steps == 0:
                save()
            if stopping:
                return False
        for trainer in trainers:
            trainer.end_epoch(progress)
        progress.epoch += 1
        progress.step_in_epoch = 0
        save()
    return True


# -- one SAE -------------------------------------------------------------------------------------------------------
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
        from sae_pipeline.sae import PipelineSae  # mi_crow & co. take seconds to import: only once inputs are good

        d_in, n_latents = spec.layer.d_model, spec.n_latents
        self.spec, self.settings, self.total_steps, self.window, self.dist = spec, settings, total_steps, window, dist
        self.sae: PipelineSae = PipelineSae(n_latents, d_in, spec.top_k, spec.architecture)
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
        self.dist.broadcast_module(self.eng)

    def step(self, x: torch.Tensor) -> int:
        """One optimisation step on this rank's tokens ``x``; returns the step's tokens over all ranks."""
        x = x.float()
        dead = self.since_fired >= self.window
        # 1. encode, select, decode (bf16 autocast on CUDA)
        with torch.autocast(x.device.type, dtype=self.amp) if self.amp else contextlib.nullcontext():
            pre, z, x_hat = self.eng(x)
        pre, z, x_hat = pre.float(), z.float(), x_hat.float()
        # 2. loss: FVU + AuxK on the dead latents + L1 on the codes
        aux = auxk_loss(self.eng, pre, x, x_hat, dead, self.k_aux) if self.settings.auxk_alpha else x.new_zeros(())
        loss = fvu(x, x_hat) + self.settings.auxk_alpha * aux + self.settings.l1_lambda * z.abs().mean()
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
        # 6. unit-norm decoder rows
        self.eng.normalize_decoder()
        # 7. counters and metrics
        self.since_fired.add_(n_tokens).masked_fill_(fired, 0)
        self.log_stats.update(x, x_hat.detach(), z.detach())
        self.loss_since_log += loss_v
        self.auxk_since_log += aux_v
        self.loss_this_epoch += loss_v
        self.steps_since_log += 1
        self.steps_this_epoch += 1
        return n_tokens

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

    def log_line(self, progress: Progress) -> dict[str, Any]:
        """A history line for the steps since the last one (appended to the history and returned)."""
        stats = self.dist.gather_stats(self.log_stats)  # log_stats itself with one process
        n = max(self.steps_since_log, 1)
        line = {
            "step": progress.step,
            "epoch": progress.epoch,
            "tokens": progress.tokens,
            "loss": float(self.loss_since_log) / n,
            "auxk_loss": float(self.auxk_since_log) / n,
            **_round(stats.result()),
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

    def end_epoch(self, progress: Progress) -> None:
        if self.steps_since_log:
            self.log_line(progress)
        line = {
            "epoch": progress.epoch,
            "step": progress.step,
            "tokens": progress.tokens,
            "loss": float(self.loss_this_epoch) / max(self.steps_this_epoch, 1),
            **_round(self.epoch_stats.result()),
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


# -- start, checkpoints, end ---------------------------------------------------------------------------------------
def initialize(trainers: list[Trainer], loaders: dict[str, TokenLoader], plan: SweepPlan, dist: Dist) -> None:
    """A fresh start: each layer's data sample drawn once for all of its SAEs; meta.json "running" per SAE."""
    for layer, loader in loaders.items():
        sample = loader.sample(B_DEC_SAMPLE_TOKENS)
        for trainer in trainers:
            if trainer.spec.layer.signature == layer:
                trainer.initialize(sample)
    if dist.is_main:
        plan.start()


def save_checkpoint(
    runs: list[TrainingRun],
    trainers: list[Trainer],
    commit: CheckpointCommit,
    progress: Progress,
    clock: StageClock,
    dist: Dist,
) -> None:
    """Every SAE's checkpoint at this step, then the commit naming the step, then the older checkpoints deleted
    (store.CheckpointCommit): a kill anywhere in between resumes every SAE from the same step."""
    with clock.stage("checkpoint"):
        states = [t.state_dict() for t in trainers]  # every rank: the pending metrics are gathered
        if not dist.is_main:
            return
        from sae_pipeline.sae import atomic_torch_save

        for run, state in zip(runs, states):
            atomic_torch_save({"step": progress.step, "trainer": state}, run.checkpoint_path(progress.step))
        commit.write(
            {
                **asdict(progress),
                "world_size": dist.world_size,
                "members": [run.run_id for run in runs],
                "clock": clock.state_dict(),
            }
        )
        for run in runs:
            run.remove_checkpoints(keep=progress.step)


def resume(
    runs: list[TrainingRun], trainers: list[Trainer], commit: CheckpointCommit, clock: StageClock, dist: Dist
) -> Progress | None:
    """The committed step's state into every trainer (None: nothing committed, start afresh)."""
    from sae_pipeline.sae import load_torch_file

    record = commit.read()
    if record is None:
        if dist.is_main:
            for run in runs:
                run.remove_checkpoints()  # written before a first commit that never came
        return None
    progress = Progress(record["step"], record["epoch"], record["step_in_epoch"], record["tokens"])
    if not {run.run_id for run in runs} <= set(record["members"]):  # fewer: those complete since are not resumed
        raise PipelineError(f"{commit.path} names other training runs than this sweep's; the sweep was modified")
    if record["world_size"] != dist.world_size:
        n = record["world_size"]
        raise PipelineError(
            f"training run {commit.path.parent.name!r} was checkpointed by {n} training process(es) (step "
            f"{progress.step}, epoch {progress.epoch + 1}), now {dist.world_size}: which tokens each step trains on "
            f"depends on the process count, so resume it with {n} (torchrun --nproc_per_node={n}, or as many GPUs), "
            "or start a new --sae_run_id"
        )
    for run, trainer in zip(runs, trainers):
        trainer.load_state_dict(load_torch_file(run.checkpoint_path(progress.step))["trainer"])
        if dist.is_main:
            run.remove_checkpoints(keep=progress.step)  # an uncommitted later step's files, left by a kill
    clock.load_state_dict(record["clock"])
    if dist.is_main:
        print(
            f"resumed from step {progress.step} of {trainers[0].total_steps} (epoch {progress.epoch + 1}) using "
            f"{commit.path}",
            file=sys.stderr,
        )
    return progress


@torch.no_grad()
def evaluate_holdout(
    trainers: list[Trainer], loaders: dict[str, TokenLoader], batch_size: int, device: torch.device, dist: Dist
) -> list[dict[str, Any]]:
    """Every SAE's FVU, MSE, L0, never-fired and dead fractions on the held-out slice, in inference mode (BatchTopK:
    threshold); each layer's slice read once for all of its SAEs, each rank its share, merged exactly."""
    stats = {id(t): ReconstructionStats(t.spec.layer.d_model, t.spec.n_latents, device) for t in trainers}
    for t in trainers:
        t.eng.eval()
    for layer, loader in loaders.items():
        layer_trainers = [t for t in trainers if t.spec.layer.signature == layer]
        for batch in loader.iter_holdout(batch_size):
            x = batch.to(device).float()
            for t in layer_trainers:
                with torch.autocast(device.type, dtype=t.amp) if t.amp else contextlib.nullcontext():
                    _, z, x_hat = t.eng(x)
                stats[id(t)].update(x, x_hat.float(), z.float())
    results = []
    for t in trainers:
        t.eng.train()
        metrics = _round(dist.gather_stats(stats[id(t)]).result())
        results.append({**metrics, "dead_fraction": dead_fraction(t.since_fired, t.window)})
    return results


def write_outputs(
    run: TrainingRun,
    trainer: Trainer,
    holdout: dict[str, Any],
    plan: SweepPlan,
    progress: Progress,
    timing: dict[str, Any],
    loader: TokenLoader,
    dist: Dist,
    wandb_run,
) -> None:
    """One SAE's folder: model.pt, saelens/, history.json, training_curves.png, then meta.json "complete"."""
    from sae_pipeline.export import export_saelens
    from sae_pipeline.plots import plot_training_curves

    spec, settings = trainer.spec, trainer.settings
    history = {**trainer.history, "holdout": holdout}
    train_s = timing["wall_s"] - timing["stages_s"]["evaluate"]  # the loop, checkpoints included
    if wandb_run is not None:
        wandb_run.log({f"holdout/{k}": v for k, v in holdout.items()}, step=progress.step)
        wandb_run.finish()
    trainer.sae.save(run.model_path.stem, run.dir)
    export_saelens(
        trainer.sae,
        run.saelens_dir,
        spec.layer,
        plan.act_meta,
        extra={"sae_run_id": run.run_id, "activation_run_id": plan.run.run_id},
    )
    run.write_history(history)
    plot_training_curves(history, run.curves_path, title=f"{run.run_id} on {plan.run.run_id}")
    run.write_meta(
        {
            **plan.member_meta(spec, run.run_id),
            "status": "complete",
            "model_id": plan.act_meta.get("model_id"),
            "hook_side": plan.act_meta.get("hook_side"),
            "k": spec.top_k,
            "architecture": spec.architecture,
            "settings": settings.model_dump(mode="json"),
            "dead_tokens_window_used": trainer.window,
            "k_aux": trainer.k_aux,
            "total_steps": progress.step,
            "tokens_trained": progress.tokens,
            "n_train_tokens": loader.n_train,
            "n_holdout_tokens": loader.n_holdout,
            "device": str(trainer.eng.W_dec.device),
            "processes": dist.world_size,
            "elapsed_s": round(train_s, 1),
            "timing": timing,
            "final_metrics": {"train": trainer.history["epochs"][-1], "holdout": holdout},
            "files": {
                "model": "model.pt",
                "saelens": "saelens/",
                "history": "history.json",
                "curves": "training_curves.png",
            },
            "versions": package_versions(),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    rate, ho = progress.tokens / max(train_s, 1e-9), holdout
    print(
        f"Trained SAE {run.run_id}: {spec.architecture}, {spec.n_latents} latents, k={spec.top_k}, layer "
        f"{spec.layer.signature} of activation run {plan.run.run_id}; {progress.step} steps, {settings.epochs} "
        f"epochs, {progress.tokens:,} tokens at {rate:,.0f} tokens/s on {trainer.eng.W_dec.device} "
        f"({StageClock.describe(timing)}). Held-out ({loader.n_holdout:,} tokens): FVU {ho['fvu']:.4f}, "
        f"L0 {ho['l0']:.1f}, "
        f"never fired {ho['never_fired_fraction']:.1%}, dead (no firing in {trainer.window:,} tokens) "
        f"{ho['dead_fraction']:.1%}. In {run.dir}: model.pt (mi_crow TopKSae.load), saelens/, history.json, "
        "meta.json, training_curves.png."
    )


def check_memory(plan: SweepPlan, loaders: dict[str, TokenLoader], device: torch.device, world_size: int) -> None:
    """Refuse, before any work, SAEs that together do not fit on the device (or loader buffers on the host)."""
    import psutil

    on_gpu = device.type == "cuda"
    estimate = MemoryEstimate.of(
        plan.specs(),
        plan.settings.batch_size_train // world_size,
        host=sum(loader.host_bytes() for loader in loaders.values()),
        staging=sum(loader.device_bytes() for loader in loaders.values()) if on_gpu else 0,
        device_is_host=not on_gpu,
    )
    free_host = psutil.virtual_memory().available
    free_device = torch.cuda.mem_get_info(device)[0] if on_gpu else free_host
    estimate.check(free_device, free_host, str(device), plan.task_count)


# -- the maths -----------------------------------------------------------------------------------------------------
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


# -- small helpers -------------------------------------------------------------------------------------------------
def _round(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}


def _progress(total_tokens: int, done: int, name: str, disable: bool = False):
    from tqdm import tqdm

    return tqdm(
        total=total_tokens,
        initial=done,
        unit="tok",
        unit_scale=True,
        desc=f"train {name}",
        disable=disable,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=1.0 if sys.stderr.isatty() else 30.0,
    )


def _start_wandb(settings: TrainSettings, sae_run_id: str, config: dict[str, Any], several: bool):
    """Only when WANDB_PROJECT is set; one W&B run per SAE, continued after a resume (several at once need W&B's
    ``reinit="create_new"``, wandb >= 0.19.10)."""
    if not settings.wandb_project:
        return None
    import wandb

    extra = {"reinit": "create_new"} if several else {}
    return wandb.init(
        project=settings.wandb_project, id=sae_run_id, name=sae_run_id, resume="allow", config=config, **extra
    )


__all__ = ["train_sae", "fit", "Trainer", "auxk_loss", "geometric_median", "lr_factor", "evaluate_holdout"]
