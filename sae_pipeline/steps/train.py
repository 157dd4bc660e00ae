"""Step 2: train every SAE of a sweep on an activation run, resumably; one SAE is a sweep of one.

Read top to bottom, ``train_sae``:

1. plans the sweep (``sae/sweep.plan_sweep``): the activation run, its layers, the grid of SAEs, their ids, this
   task's share; bad values, ids holding something else and runs started with other settings are refused before
   any work;
2. opens the job (``TrainJob.open``): one shuffled ``TokenLoader`` per layer and one ``Trainer`` per SAE, refusing
   a sweep that does not fit in memory (``sae/sweep.MemoryEstimate``);
3. resumes every trainer from the committed checkpoint step (``store/training.CheckpointCommit``), or initialises
   them: b_dec = geometric median of a data sample, random unit-norm decoder, encoder = decoder transpose;
4. ``fit``: every step reads one batch per layer and every trainer of that layer steps on it; a checkpoint every
   CHECKPOINT_EVERY_STEPS steps, at each epoch end and on SIGUSR1/SIGTERM (then exit 75, the sbatch wrapper
   requeues);
5. evaluates every SAE on the held-out slice and writes its run folder (``outputs/training.write_outputs``), then
   sweep.json and STORE_DIR/sae_run_id.txt, and deletes the checkpoints.

Exact resume. A checkpoint holds everything a step depends on (weights, Adam, schedule, scaler, dead-latent
counters, pending metrics, history) and the loader's position is a pure function of (run, DATA_SEED, epoch, step),
so a resumed run replays exactly what the uninterrupted one does: on CPU the final model is bit for bit the same.

Several processes (torchrun; ``dist`` from the cli layer, see infra/distributed.py): every rank holds every SAE and
trains on its part of each global step's batch (sae/loader.py says which tokens); one collective per SAE and step
(sae/trainer.py), one more agrees on a stop. Rank 0 alone writes checkpoints and outputs. Which tokens a step trains
on depends on the number of processes, so a checkpoint resumes only with the same number: another is refused in one
line rather than silently repeating and dropping part of the interrupted epoch.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from sae_pipeline.infra.distributed import Dist
from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.infra.preemption import StopFlag, StopRequested
from sae_pipeline.infra.progress import ProgressMeter
from sae_pipeline.infra.timing import StageClock
from sae_pipeline.outputs.training import report_end, start_wandb, write_outputs
from sae_pipeline.sae.loader import TokenLoader
from sae_pipeline.sae.metrics import ReconstructionStats, dead_fraction, rounded
from sae_pipeline.sae.sweep import MemoryEstimate, SweepPlan, plan_sweep
from sae_pipeline.sae.trainer import LoopState, Trainer
from sae_pipeline.settings import TrainSettings
from sae_pipeline.store.files import atomic_torch_save, load_torch_file
from sae_pipeline.store.training import CheckpointCommit, TrainingRun

B_DEC_SAMPLE_TOKENS = 32_768
STAGES = ("read", "step", "checkpoint", "evaluate")  # where step 2's time goes (infra/timing.StageClock)


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
    return train_planned(plan_sweep(settings, run_id, sae_run_id), dist, stop)


def train_planned(plan: SweepPlan, dist: Dist, stop: StopFlag | None = None, loaders=None) -> Path:
    """``train_sae`` once the sweep is planned; ``loaders(plan, device, dist)`` gives each layer's loader (default:
    ``open_loaders``, the activation run's; streaming passes its own, steps/stream.py)."""
    settings = plan.settings
    if nothing_to_do(plan, dist):
        return plan.folder
    job = TrainJob.open(plan, dist, loaders or open_loaders)
    state = job.start()
    stop = stop or StopFlag().install()
    wandb = [
        start_wandb(settings, r.run_id, plan.config, len(job.runs) > 1) if dist.is_main else None for r in job.runs
    ]
    total_tokens = job.loader.n_train * settings.epochs
    with ProgressMeter(
        f"train {plan.sweep_id}",
        total_tokens,
        "tok",
        initial=state.tokens,
        every_s=settings.progress_every_seconds,
        enabled=dist.is_main,
    ) as meter:
        finished = fit(job, state, lambda: dist.any(stop.requested, job.device), StepReport(meter, wandb, state))
    if not finished:
        dist.barrier()  # no rank exits (and makes torchrun kill the others) before rank 0 has saved
        raise StopRequested(
            f"stopped by {stop.signal_name or 'another rank'} at step {state.step} of {job.total_steps}; "
            f"checkpoint saved, rerun with --sae_run_id {plan.sweep_id} to continue"
        )
    with job.clock.stage("evaluate"):
        holdout = evaluate_holdout(job)
    if dist.is_main:
        wall = job.clock.wall_seconds()
        timing = job.clock.report(wall, gpu_span_s=wall - job.clock.seconds()["evaluate"])  # GPU busy: the loop
        for run, trainer, metrics, wandb_run in zip(job.runs, job.trainers, holdout, wandb):
            if run.status() != "complete":
                write_outputs(run, trainer, metrics, job, state, timing, wandb_run)
        report_end(plan, plan.finalize())
    dist.barrier()
    return plan.folder


@dataclass
class TrainJob:
    """What one process of step 2 works with, built once before any step: the plan, its place among the processes,
    one loader per layer, one Trainer per SAE, their run folders, the commit file and the clock."""

    plan: SweepPlan
    dist: Dist
    device: torch.device
    loaders: dict[str, TokenLoader]
    trainers: list[Trainer]
    runs: list[TrainingRun]
    commit: CheckpointCommit
    clock: StageClock

    @classmethod
    def open(cls, plan: SweepPlan, dist: Dist, loaders_of: Callable | None = None) -> TrainJob:
        settings = plan.settings
        device = dist.device(settings.device)
        loaders = (loaders_of or open_loaders)(plan, device, dist)
        check_memory(plan, loaders, device, dist.world_size)
        dist.init(device)
        dist.barrier()  # every rank has looked at the run folders before rank 0 writes into them
        loader = next(iter(loaders.values()))
        total_steps = loader.steps_per_epoch * settings.epochs
        window = min(
            settings.dead_tokens_window, max(settings.batch_size_train, loader.n_train * settings.epochs // 10)
        )
        model_id = plan.act_meta.get("model_id")
        trainers = [Trainer(spec, settings, total_steps, window, device, dist, model_id) for spec in plan.specs()]
        return cls(plan, dist, device, loaders, trainers, plan.runs(), plan.commit(), StageClock(STAGES, device))

    settings = property(lambda self: self.plan.settings)
    loader = property(lambda self: next(iter(self.loaders.values())))  # any: every layer has the same tokens
    total_steps = property(lambda self: self.trainers[0].total_steps)

    def layer_trainers(self) -> list[tuple[str, list[Trainer]]]:
        return [(layer, [t for t in self.trainers if t.spec.layer.signature == layer]) for layer in self.loaders]

    def start(self) -> LoopState:
        """The committed step's state in every trainer, or a fresh start: each layer's data sample drawn once for
        all of its SAEs, meta.json "running" per SAE."""
        state = self.resume()
        if state is not None:
            return state
        for layer, trainers in self.layer_trainers():
            sample = self.loaders[layer].sample(B_DEC_SAMPLE_TOKENS)
            for trainer in trainers:
                trainer.initialize(sample)
        if self.dist.is_main:
            self.plan.start()
        return LoopState()

    def save(self, state: LoopState) -> None:
        """Every SAE's checkpoint at this step, then the commit naming the step, then the older checkpoints deleted
        (store/training.CheckpointCommit): a kill anywhere in between resumes every SAE from the same step."""
        with self.clock.stage("checkpoint"):
            states = [t.state_dict() for t in self.trainers]  # every rank: the pending metrics are gathered
            if not self.dist.is_main:
                return
            for run, trainer_state in zip(self.runs, states):
                atomic_torch_save({"step": state.step, "trainer": trainer_state}, run.checkpoint_path(state.step))
            members = [run.run_id for run in self.runs]
            record = {**asdict(state), "world_size": self.dist.world_size, "members": members}
            self.commit.write({**record, "clock": self.clock.state_dict()})
            for run in self.runs:
                run.remove_checkpoints(keep=state.step)

    def resume(self) -> LoopState | None:
        """The committed step's state into every trainer (None: nothing committed, start afresh)."""
        record = self.commit.read()
        if record is None:
            if self.dist.is_main:
                for run in self.runs:
                    run.remove_checkpoints()  # written before a first commit that never came
            return None
        state = LoopState(record["step"], record["epoch"], record["step_in_epoch"], record["tokens"])
        self.check_commit(record, state)
        for run, trainer in zip(self.runs, self.trainers):
            trainer.load_state_dict(load_torch_file(run.checkpoint_path(state.step))["trainer"])
            if self.dist.is_main:
                run.remove_checkpoints(keep=state.step)  # an uncommitted later step's files, left by a kill
        self.clock.load_state_dict(record["clock"])
        if self.dist.is_main:
            print(
                f"resumed from step {state.step} of {self.total_steps} (epoch {state.epoch + 1}) using "
                f"{self.commit.path}",
                file=sys.stderr,
            )
        return state

    def check_commit(self, record: dict[str, Any], state: LoopState) -> None:
        if not {run.run_id for run in self.runs} <= set(record["members"]):  # fewer: the ones complete since
            raise PipelineError(
                f"{self.commit.path} names other training runs than this sweep's; the sweep was modified"
            )
        n, now = record["world_size"], self.dist.world_size
        if n != now:
            raise PipelineError(
                f"training run {self.commit.path.parent.name!r} was checkpointed by {n} training process(es) (step "
                f"{state.step}, epoch {state.epoch + 1}), now {now}: which tokens each step trains on depends on the "
                f"process count, so resume it with {n} (torchrun --nproc_per_node={n}, or as many GPUs), or start a "
                "new --sae_run_id"
            )


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


def nothing_to_do(plan: SweepPlan, dist: Dist) -> bool:
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


# -- the loop ------------------------------------------------------------------------------------------------------
def fit(job: TrainJob, state: LoopState, stop_requested: Callable[[], bool], report: Callable) -> bool:
    """The loop: every global step, one batch per layer, and every trainer of that layer steps on it; history lines
    and checkpoints on schedule. False when a stop was requested (the checkpoint then saved), True at the end."""
    settings, clock, by_layer = job.settings, job.clock, job.layer_trainers()
    while state.epoch < settings.epochs:
        streams = [job.loaders[layer].iter_epoch(state.epoch, state.step_in_epoch, job.device) for layer, _ in by_layer]
        for batches in clock.reading(zip(*streams)):
            with clock.stage("step"), clock.gpu_busy():
                for x, (_, trainers) in zip(batches, by_layer):
                    for trainer in trainers:
                        n_tokens = trainer.step(x)
            state.advance(n_tokens)
            log = state.step % settings.log_every_steps == 0
            report(n_tokens, [t.log_line(state) for t in job.trainers] if log else None)
            stopping = stop_requested()
            if stopping or state.step % settings.checkpoint_every_steps == 0:
                job.save(state)
            if stopping:
                return False
        for trainer in job.trainers:
            trainer.end_epoch(state)
        state.next_epoch()
        job.save(state)
    return True


@dataclass
class StepReport:
    """What each step shows: the progress meter, and on log steps the first SAE's FVU and L0 and every SAE's history
    line in W&B (when set up)."""

    meter: ProgressMeter
    wandb: list
    state: LoopState

    def __call__(self, n_tokens: int, lines: list[dict[str, Any]] | None) -> None:
        fields = f"FVU {lines[0]['fvu']:.3f}, L0 {lines[0]['l0']:.2f}" if lines else ""
        self.meter.update(n_tokens, fields=fields)
        for wandb_run, line in zip(self.wandb, lines or ()):
            if wandb_run is not None:
                wandb_run.log(line, step=self.state.step)


@torch.no_grad()
def evaluate_holdout(job: TrainJob) -> list[dict[str, Any]]:
    """Every SAE's FVU, MSE, L0, never-fired and dead fractions on the held-out slice, in inference mode (BatchTopK:
    threshold); each layer's slice read once for all of its SAEs, each rank its share, merged exactly."""
    device = job.device
    stats = {id(t): ReconstructionStats(t.spec.layer.d_model, t.spec.n_latents, device) for t in job.trainers}
    for t in job.trainers:
        t.eng.eval()
    for layer, trainers in job.layer_trainers():
        for batch in job.loaders[layer].iter_holdout(job.settings.batch_size_train):
            x = batch.to(device).float()
            for t in trainers:
                with torch.autocast(device.type, dtype=t.amp) if t.amp else contextlib.nullcontext():
                    _, z, x_hat = t.eng(x)
                stats[id(t)].update(x, x_hat.float(), z.float())
    results = []
    for t in job.trainers:
        t.eng.train()
        metrics = rounded(job.dist.gather_stats(stats[id(t)]).result())
        results.append({**metrics, "dead_fraction": dead_fraction(t.since_fired, t.window)})
    return results
