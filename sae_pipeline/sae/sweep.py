"""The sweep step 2 trains: every combination of the list-valued settings, its ids, its share per task, its memory.

Grid. ``LAYER_NUM`` (or ``LAYER_SIGNATURE``) x ``N_LATENTS_MULTIPLIER`` x ``TOP_K`` x ``SAE_ARCHITECTURE`` x ``LR``
x ``SEED``, in that order (layers in the activation run's order, values in the order given), so the grid and its
ids are a function of the settings alone: every task of a SLURM array computes the same one. Layers: by default
every layer of the activation run; ``LAYER_NUM`` / ``LAYER_SIGNATURE`` set explicitly choose a subset of them.

Ids. One SAE keeps the plain layout: its folder is ``runs/<SAE_RUN_ID>/``. Several form a sweep: ``runs/<SAE_RUN_ID>/``
holds ``sweep.json`` and member i trains in ``runs/<SAE_RUN_ID>.<suffix>/``, the suffix naming its values
(``L16.k32.x4.topk.s1``, plus ``.lr<LR>`` when LR is a list), an ordinary training run of its own.

Share. Task t of T (a SLURM array, ``TRAIN_TASK_ID`` / ``TRAIN_TASK_COUNT``) trains members t, t+T, t+2T, ...

Memory. Every SAE of a process is held at once (weights, gradients, two Adam moments, dead-latent counters) and
steps one after the other, so the peak is the sum of the states plus the largest SAE's activations of one batch;
the loader holds two shuffle groups and one shard per layer on the host. ``MemoryEstimate`` adds these up before
anything is written; a sweep that does not fit is refused with the number of array tasks that would fit.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.settings import TrainSettings
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.files import now
from sae_pipeline.store.runs import RUN_ID_FILE, SAE_RUN_ID_FILE, Store, new_run_id, validate_run_id
from sae_pipeline.store.training import CheckpointCommit, Sweep, TrainingRun

# Dense [batch, n_latents] float32 tensors alive at the peak of one step (pre-activations, codes, their autocast and
# AuxK copies, gradients): measured on CPU with benchmarks/train_memory.py, rounded up.
DENSE_TENSORS_PER_STEP = 10
# ... and the ones an architecture adds (Matryoshka's prefix decodes, JumpReLU's float32 gates), measured the same
# way (+1.3 and +0.5 over TopK), rounded up.
EXTRA_DENSE_TENSORS = {"matryoshka_batchtopk": 2, "jumprelu": 1}
STATE_FLOATS_PER_PARAM = 4  # the parameter, its gradient, Adam's two moments
GIB = 1 << 30


@dataclass(frozen=True)
class SaeSpec:
    """One SAE of the grid: where it reads and the values it trains with."""

    layer: LayerSpec
    n_latents_multiplier: int
    top_k: int
    architecture: str
    lr: float
    seed: int
    matryoshka_widths: tuple[int, ...] | None = None  # matryoshka_batchtopk only: the nested prefixes

    @property
    def n_latents(self) -> int:
        return self.layer.d_model * self.n_latents_multiplier

    def values(self) -> dict[str, Any]:
        """The member's own values, as sweep.json and meta.json record them."""
        return {
            "layer_signature": self.layer.signature,
            "layer_num": self.layer.layer_num,
            "d_in": self.layer.d_model,
            "n_latents": self.n_latents,
            "n_latents_multiplier": self.n_latents_multiplier,
            "top_k": self.top_k,
            "architecture": self.architecture,
            "lr": self.lr,
            "seed": self.seed,
            **({"matryoshka_widths": list(self.matryoshka_widths)} if self.matryoshka_widths else {}),
        }

    def state_bytes(self) -> int:
        """Weights, gradients and Adam moments in float32, plus the int64 dead-latent and firing counters."""
        d, n = self.layer.d_model, self.n_latents
        return 4 * STATE_FLOATS_PER_PARAM * (2 * n * d + n + d) + 3 * 8 * n

    def batch_bytes(self, batch_tokens: int) -> int:
        dense = DENSE_TENSORS_PER_STEP + EXTRA_DENSE_TENSORS.get(self.architecture, 0)
        return 4 * dense * batch_tokens * self.n_latents


def select_layers(settings: TrainSettings, run_layers: list[LayerSpec], run_id: str) -> list[LayerSpec]:
    """The run's layers, or the subset LAYER_NUM / LAYER_SIGNATURE names when set explicitly (each must be in it)."""
    if "layer_signature" in settings.model_fields_set and settings.layer_signature:
        wanted, key, name = settings.layer_signature, (lambda spec: spec.signature), "LAYER_SIGNATURE"
    elif "layer_num" in settings.model_fields_set:
        wanted, key, name = settings.layer_num, (lambda spec: spec.layer_num), "LAYER_NUM"
    else:
        return list(run_layers)
    by_key = {key(spec): spec for spec in run_layers}
    missing = [w for w in wanted if w not in by_key]
    if missing:
        held = ", ".join(str(key(spec)) for spec in run_layers)
        raise PipelineError(
            f"{name}={','.join(map(str, wanted))} is not valid: activation run {run_id!r} holds {name} {held} "
            f"(unset {name} to train on every layer of the run, or capture the others with step 1)"
        )
    return [by_key[w] for w in wanted]


def build_grid(settings: TrainSettings, layers: list[LayerSpec]) -> list[SaeSpec]:
    """Every combination, in the fixed order of the module docstring; refuses TOP_K >= n_latents and Matryoshka
    widths that do not fit the SAE, by name."""
    if settings.matryoshka_widths and "matryoshka_batchtopk" not in settings.sae_architecture:
        raise PipelineError(
            "MATRYOSHKA_WIDTHS is set but SAE_ARCHITECTURE trains no matryoshka_batchtopk SAE: add "
            "matryoshka_batchtopk to SAE_ARCHITECTURE or unset MATRYOSHKA_WIDTHS"
        )
    grid = [
        SaeSpec(layer, mult, k, arch, lr, seed, matryoshka_widths(settings, arch, layer.d_model * mult))
        for layer in layers
        for mult in settings.n_latents_multiplier
        for k in settings.top_k
        for arch in settings.sae_architecture
        for lr in settings.lr
        for seed in settings.seed
    ]
    for spec in grid:
        if spec.top_k >= spec.n_latents:
            where = f" at {spec.layer.signature}" if len(layers) > 1 else ""
            raise PipelineError(
                f"TOP_K={spec.top_k} is not valid: use 1..{spec.n_latents - 1} (below n_latents = d_model "
                f"{spec.layer.d_model} x N_LATENTS_MULTIPLIER {spec.n_latents_multiplier}{where})"
            )
    return grid


def matryoshka_widths(settings: TrainSettings, architecture: str, n_latents: int) -> tuple[int, ...] | None:
    """MATRYOSHKA_WIDTHS, or its default for this width, for a Matryoshka SAE (None for the others)."""
    from sae_pipeline.sae.architectures import check_matryoshka_widths, default_matryoshka_widths

    if architecture != "matryoshka_batchtopk":
        return None
    widths = tuple(settings.matryoshka_widths or default_matryoshka_widths(n_latents))
    try:
        check_matryoshka_widths(widths, n_latents)
    except ValueError as exc:
        raise PipelineError(
            f"MATRYOSHKA_WIDTHS={','.join(map(str, widths))} is not valid: {exc} (d_model x "
            "N_LATENTS_MULTIPLIER; unset it for the default n/64,n/16,n/4,n)"
        ) from None
    return widths


def member_ids(sae_run_id: str, grid: list[SaeSpec], settings: TrainSettings) -> list[str]:
    """``[sae_run_id]`` for one SAE; else ``<sae_run_id>.<suffix>`` per member (module docstring)."""
    if len(grid) == 1:
        return [sae_run_id]
    layer_nums = [spec.layer.layer_num for spec in grid]
    by_number = None not in layer_nums and len(set(layer_nums)) == len({spec.layer.signature for spec in grid})
    ids = []
    for spec in grid:
        layer = f"L{spec.layer.layer_num}" if by_number else spec.layer.signature
        suffix = f"{layer}.k{spec.top_k}.x{spec.n_latents_multiplier}.{spec.architecture}.s{spec.seed}"
        if len(settings.lr) > 1:
            suffix += f".lr{spec.lr:g}"
        ids.append(validate_run_id(f"{sae_run_id}.{suffix}", "--sae_run_id (with the sweep's member suffix)"))
    return ids


SEED_GROUP_KEYS = ("layer_signature", "layer_num", "n_latents_multiplier", "architecture", "lr", "top_k")


def seed_groups(members: list[dict[str, Any]], metrics: tuple[str, ...]) -> list[dict[str, Any]]:
    """The members that differ only in SEED, in grid order, with each metric's mean and sample standard deviation over
    the seeds (``{"mean", "std"}``; std null with one seed; a metric null for any seed is null for the group, since a
    mean over the seeds that have one would mislead)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for m in members:
        groups.setdefault(tuple(m.get(k) for k in SEED_GROUP_KEYS), []).append(m)
    out = []
    for key, group in groups.items():
        entry: dict[str, Any] = dict(zip(SEED_GROUP_KEYS, key))
        entry |= {"seeds": [m.get("seed") for m in group], "n_seeds": len(group)}
        for name in metrics:
            values = [m.get(name) for m in group]
            if None in values:
                entry[name] = {"mean": None, "std": None}
            else:
                std = statistics.stdev(values) if len(values) > 1 else None
                entry[name] = {"mean": statistics.fmean(values), "std": std}
        out.append(entry)
    return out


def task_share(n_members: int, task_id: int, task_count: int) -> list[int]:
    """Grid indices task ``task_id`` of ``task_count`` trains: t, t+T, t+2T, ..."""
    return list(range(task_id, n_members, task_count))


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one process needs: on the training device (every SAE's state, the largest SAE's activations of one
    batch, the loader's copies in flight to a GPU) and on the host (the loader's shuffle buffers)."""

    n_saes: int
    states: int
    batch: int
    host: int
    device_is_host: bool

    @classmethod
    def of(
        cls, specs: list[SaeSpec], batch_tokens: int, host: int, staging: int, device_is_host: bool
    ) -> MemoryEstimate:
        batch = max(s.batch_bytes(batch_tokens) for s in specs) + staging
        return cls(len(specs), sum(s.state_bytes() for s in specs), batch, host, device_is_host)

    @property
    def device(self) -> int:
        return self.states + self.batch + (self.host if self.device_is_host else 0)

    def check(self, free_device: int, free_host: int, where: str, task_count: int) -> None:
        """One line saying how to split a sweep that does not fit (or to shrink an SAE that alone does not)."""
        device_short = self.device > free_device
        if not device_short and (self.device_is_host or self.host <= free_host):
            return
        need, free, place = (self.device, free_device, where) if device_short else (self.host, free_host, "the host")
        head = (
            f"the {self.n_saes} SAE(s) this process trains need about {_size(need)} on {place} ({_size(self.states)} "
            f"of weights, gradients and Adam state, {_size(self.batch)} for one batch's activations, "
            f"{_size(self.host)} of loader buffers) but {_size(free)} are free"
        )
        per_sae = self.states / self.n_saes
        room = free_device - (self.device - self.states)  # what is left for SAE states
        if device_short and self.n_saes > 1 and room >= per_sae:
            tasks = task_count * math.ceil(self.n_saes / int(room // per_sae))
            raise PipelineError(
                f"{head}: train fewer SAEs at once: fewer values in TOP_K, SEED, N_LATENTS_MULTIPLIER, "
                f"SAE_ARCHITECTURE, LR or LAYER_NUM, or split the sweep over a SLURM array of {tasks} tasks "
                f"(sbatch --array=0-{tasks - 1} submit_train_sae.sh)"
            )
        raise PipelineError(f"{head}: lower BATCH_SIZE_TRAIN, N_LATENTS_MULTIPLIER or SHUFFLE_BUFFER_TOKENS")


def _size(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.1f} GiB" if n_bytes >= GIB / 10 else f"{n_bytes / (1 << 20):.1f} MiB"


# -- the plan of one process ---------------------------------------------------------------------------------------
# settings that may change between a kill and the resume; every other one must match what the run started with
RESUME_MAY_CHANGE = {
    "device",
    "store_dir",
    "run_id",
    "sae_run_id",
    "checkpoint_every_steps",
    "log_every_steps",
    "wandb_project",
    "model_id",
    "model_dtype",
    "layer_num",
    "train_task_id",
    "train_task_count",
    "stream",  # a cached run's config never holds it; a streamed one's holds its own source (steps/stream.py)
}


@dataclass
class SweepPlan:
    """What this process trains: the grid (all of it, for ids and sweep.json), its own share of it (``share``) and,
    of that, the SAEs not complete yet (``todo``: a share finished but for one SAE trains that one only)."""

    settings: TrainSettings
    store: Store
    run: ActivationRun
    act_meta: dict[str, Any]
    sweep_id: str
    grid: list[SaeSpec]
    ids: list[str]
    share: list[int]
    todo: list[int]
    task_id: int
    task_count: int
    data_seed: int
    config: dict[str, Any]

    @property
    def is_sweep(self) -> bool:
        return len(self.grid) > 1

    @property
    def folder(self) -> Path:
        """The one SAE's run folder, or the sweep's."""
        return self.store.run_dir(self.sweep_id)

    def specs(self) -> list[SaeSpec]:
        """The SAEs this process trains (``todo``), in grid order; ``runs()`` are their folders."""
        return [self.grid[i] for i in self.todo]

    def runs(self) -> list[TrainingRun]:
        return [TrainingRun(self.store, self.ids[i]) for i in self.todo]

    def own_runs(self) -> list[TrainingRun]:
        """This task's whole share, complete or not."""
        return [TrainingRun(self.store, self.ids[i]) for i in self.share]

    def layers_trained(self) -> list[LayerSpec]:
        return list({spec.layer.signature: spec.layer for spec in self.specs()}.values())

    def commit(self) -> CheckpointCommit:
        return Sweep(self.store, self.sweep_id).commit(self.task_id, self.task_count)

    def finished(self) -> bool:
        return not self.todo

    def member_meta(self, spec: SaeSpec, run_id: str) -> dict[str, Any]:
        """What every meta.json of a member holds, running or complete."""
        return {
            "sae_run_id": run_id,
            "sweep_id": self.sweep_id if self.is_sweep else None,
            "activation_run_id": self.run.run_id,
            **spec.values(),
            "data_seed": self.data_seed,
            "config": self.config,
        }

    def start(self) -> None:
        """sweep.json (any task may write it: its content is a function of the settings) and every member's
        meta.json, status "running"."""
        if self.is_sweep:
            Sweep(self.store, self.sweep_id).write_meta(self.sweep_record("running"))
        for spec, run in zip(self.specs(), self.runs()):
            run.write_meta({**self.member_meta(spec, run.run_id), "status": "running", "started": now()})

    def sweep_record(self, status: str) -> dict[str, Any]:
        s = self.settings
        return {
            "sweep_id": self.sweep_id,
            "status": status,
            "activation_run_id": self.run.run_id,
            "data_seed": self.data_seed,
            "grid": {
                "layer_signature": [layer.signature for layer in dict.fromkeys(spec.layer for spec in self.grid)],
                "n_latents_multiplier": list(s.n_latents_multiplier),
                "top_k": list(s.top_k),
                "sae_architecture": list(s.sae_architecture),
                "lr": list(s.lr),
                "seed": list(s.seed),
            },
            "members": [{"sae_run_id": i, **spec.values()} for spec, i in zip(self.grid, self.ids)],
            "config": self.config,
        }

    def finalize(self) -> bool:
        """After this process's SAEs are complete: its checkpoints removed; for a sweep whose members are all
        complete (whichever task gets there last), sweep.json marked complete with every member's held-out
        metrics. Then sae_run_id.txt points to the id. False while other tasks' members are still training."""
        self.commit().remove()
        for run in self.own_runs():
            run.remove_checkpoints()
        if self.is_sweep:
            sweep = Sweep(self.store, self.sweep_id)
            members = sweep.members()
            if not all(run.status() == "complete" for run in members):
                return False
            from sae_pipeline.outputs.plots import plot_sweep_frontier

            record = self.sweep_record("complete")
            for entry, run in zip(record["members"], members):
                entry["holdout"] = run.read_meta()["final_metrics"]["holdout"]
            groups = seed_groups([{**m, **m["holdout"]} for m in record["members"]], ("l0", "fvu"))
            plot_sweep_frontier(groups, sweep.frontier_path, title=f"sweep {self.sweep_id}")
            sweep.write_meta(record)
        self.store.write_pointer(self.sweep_id, SAE_RUN_ID_FILE)
        return True

    def check_existing(self) -> None:
        """Refuse ids that hold something else, runs started with other settings, and members another split of a
        SLURM array checkpointed: before anything is written."""
        sweep = Sweep(self.store, self.sweep_id)
        if sweep.exists():
            check_same_config(sweep.read_meta()["config"], self.config, self.sweep_id)
        elif self.is_sweep:
            single = TrainingRun(self.store, self.sweep_id)
            if single.status() is not None:  # an SAE's folder (status() refuses one holding anything else)
                check_same_config(single.read_meta()["config"], self.config, self.sweep_id)
        for run in self.own_runs():
            if run.status() is not None:
                check_same_config(run.read_meta()["config"], self.config, run.run_id)
        mine, own = {run.run_id for run in self.own_runs()}, self.commit().path
        for other in sweep.commits():
            taken = mine & set((other.read() or {}).get("members", ()))
            if other.path != own and taken:
                raise PipelineError(
                    f"{len(taken)} SAE(s) of {self.sweep_id!r} were checkpointed by another split of the sweep "
                    f"({other.path.name}); resume them with the same number of array tasks (TRAIN_TASK_COUNT), or "
                    "start a new --sae_run_id"
                )


def plan_sweep(settings: TrainSettings, run_id: str | None, sae_run_id: str | None) -> SweepPlan:
    """Resolve everything step 2 needs from the settings and the store, and check it, before any work."""
    store = Store(settings.store_dir)
    run_id = validate_run_id(run_id or settings.run_id or store.read_pointer(RUN_ID_FILE))
    run = ActivationRun(store, run_id)
    act_meta = run.open()
    layers = select_layers(settings, ActivationRun.layer_specs(act_meta), run_id)
    grid = build_grid(settings, layers)
    sweep_id = validate_run_id(sae_run_id or settings.sae_run_id or new_run_id("sae"), "--sae_run_id")
    data_seed = settings.data_seed if settings.data_seed is not None else settings.seed[0]
    config = {
        **{k: v for k, v in settings.model_dump(mode="json").items() if k not in RESUME_MAY_CHANGE},
        "layer_signature": [layer.signature for layer in layers],
        "data_seed": data_seed,
        "activation_run_id": run_id,
    }
    task_id, task_count = settings.train_task_id or 0, settings.train_task_count or 1
    plan = SweepPlan(
        settings,
        store,
        run,
        act_meta,
        sweep_id,
        grid,
        member_ids(sweep_id, grid, settings),
        task_share(len(grid), task_id, task_count),
        [],
        task_id,
        task_count,
        data_seed,
        config,
    )
    store.ensure_writable()
    plan.check_existing()
    plan.todo = [i for i, run in zip(plan.share, plan.own_runs()) if run.status() != "complete"]
    return plan


def check_same_config(saved: dict[str, Any], current: dict[str, Any], run_id: str) -> None:
    def shown(value: Any) -> str:  # as the variable is written: TOP_K=16,32
        return ",".join(map(str, value)) if isinstance(value, list | tuple) else repr(value)

    diffs = [
        f"{k.upper()}={shown(current.get(k))} (started with {shown(saved.get(k))})"
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k)
    ]
    if diffs:
        raise PipelineError(
            f"training run {run_id!r} was started with other settings: {', '.join(diffs)}; "
            "rerun with the original settings, or choose a new --sae_run_id"
        )
