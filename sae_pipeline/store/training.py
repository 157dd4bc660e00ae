"""Training runs (step 2's output, one SAE each) and sweeps (several SAEs trained in one pass), written and read
here only; step 3 writes its outputs into their ``evaluation/`` folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.store.files import atomic_write_json, read_json
from sae_pipeline.store.runs import RunFolder, Store

SWEEP_FILE = "sweep.json"
CHECKPOINT_COMMIT = "checkpoint.json"
CHECKPOINT_STEM = "checkpoint_"
EVALUATION_DIR = "evaluation"


class TrainingRun(RunFolder):
    """One SAE's folder, ``runs/<sae_run_id>/``, alone or as a member of a sweep (what step 3 evaluates)::

    meta.json              kind "sae"; status "running" (with the settings) while training, "complete" with
                           the final metrics, the member's values (layer, k, ...) and the sweep id, if any
    model.pt               the SAE (sae/model.py's payload: mi_crow's TopKSae.load and PipelineSae.load open it)
    saelens/               SAELens export (outputs/saelens.py)
    history.json           metrics every LOG_EVERY_STEPS steps and per epoch, held-out metrics
    training_curves.png
    checkpoint_<step>.pt   this SAE's trainer state at a step, while training; the step that counts is the one
                           named by the commit file (``CheckpointCommit``) of the process that trains it
    evaluation/            step 3's outputs
    """

    KIND, NAME, FLAG, STEP = "sae", "a training run", "--sae_run_id", "02_train_sae.py"
    STATES = ("running", "complete")

    model_path = property(lambda self: self.dir / "model.pt")
    saelens_dir = property(lambda self: self.dir / "saelens")
    history_path = property(lambda self: self.dir / "history.json")
    curves_path = property(lambda self: self.dir / "training_curves.png")
    evaluation_dir = property(lambda self: self.dir / EVALUATION_DIR)

    @staticmethod
    def is_leftover(path: Path) -> bool:
        return path.name.startswith((".", CHECKPOINT_STEM))

    def resume_id(self, meta: dict[str, Any]) -> str:
        return meta.get("sweep_id") or self.run_id  # a member resumes with its sweep

    def open(self) -> dict[str, Any]:
        """A finished training run's meta.json, its model.pt checked to be there."""
        meta = super().open()
        if not self.model_path.is_file():
            raise PipelineError(f"{self.model_path} is missing; the training run is incomplete or was modified")
        return meta

    def write_history(self, history: dict[str, Any]) -> None:
        atomic_write_json(self.history_path, history)

        atomic_write_json(self.history_path, history)

    def checkpoint_path(self, step: int) -> Path:
        return self.dir / f"{CHECKPOINT_STEM}{step}.pt"

    def checkpoint_steps(self) -> list[int]:
        steps = (p.name[len(CHECKPOINT_STEM) : -len(".pt")] for p in self.dir.glob(f"{CHECKPOINT_STEM}*.pt"))
        return sorted(int(s) for s in steps if s.isdigit())

    def remove_checkpoints(self, keep: int | None = None) -> None:
        """Every checkpoint but step ``keep``'s, and temporaries a kill left mid-write."""
        for step in self.checkpoint_steps():
            if step != keep:
                self.checkpoint_path(step).unlink(missing_ok=True)
        for stale in self.dir.glob(f".{CHECKPOINT_STEM}*.tmp"):
            stale.unlink(missing_ok=True)


class CheckpointCommit:
    """The one file that says which step's checkpoints count for the SAEs one process trains together.

    Protocol: write every SAE's ``checkpoint_<step>.pt`` (each atomically), then this file (atomically: the commit),
    then delete the older checkpoints. A kill before the commit leaves the previous step committed and all of its
    checkpoints on disk, so every SAE resumes at the same step; files of an uncommitted step are deleted on resume.
    Record: ``{"step", "epoch", "step_in_epoch", "tokens", "elapsed_s", "world_size", "members"}``.
    """

    def __init__(self, path: Path):
        self.path = path

    def read(self) -> dict[str, Any] | None:
        return read_json(self.path) if self.path.is_file() else None

    def write(self, record: dict[str, Any]) -> None:
        atomic_write_json(self.path, record)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


class Sweep(RunFolder):
    """A sweep's folder, ``runs/<sweep_id>/``::

    sweep.json                  kind "sweep": the grid, the data seed, every member's id and values, the status;
                                once complete, every member's held-out metrics from training
    frontier.png                once complete: held-out FVU against L0 (training's)
    checkpoint.json             while training, the commit file of the process training it (in a SLURM array,
                                ``checkpoint.task<t>of<T>.json``, one per task)
    evaluation/sweep.json       step 3's report, kind "sweep_evaluation": per member L0, FVU, CE-loss recovered
                                (null with the reason when the ablation gap is noise), KL; per group of seeds the
                                mean and standard deviation; the shared clean/ablated references; time per stage
    evaluation/frontier.png     step 3's frontier: L0 against FVU and against CE-loss recovered

    Each member is an ordinary ``TrainingRun`` in ``runs/<sweep_id>.<member suffix>/``, evaluable on its own (its
    ``evaluation/metrics.json`` and feature browser). Readers (step 3): ``training_runs(store, id)`` gives the
    members of a sweep id, or the run itself.
    """

    KIND, NAME, FLAG, STEP = "sweep", "a sweep", "--sae_run_id", "02_train_sae.py"
    STATES = ("running", "complete")
    META = SWEEP_FILE

    frontier_path = property(lambda self: self.dir / "frontier.png")  # training's held-out FVU against L0
    evaluation_path = property(lambda self: self.dir / EVALUATION_DIR / SWEEP_FILE)
    evaluation_frontier_path = property(lambda self: self.dir / EVALUATION_DIR / "frontier.png")

    def members(self) -> list[TrainingRun]:
        """Every SAE of the sweep, in grid order."""
        return [TrainingRun(self.store, m["sae_run_id"]) for m in self.read_meta()["members"]]

    def check_trained(self, members: list[TrainingRun]) -> None:
        """Every member has its model.pt, or the message names the ones missing and the command that finishes them."""
        missing = [run.run_id for run in members if not run.model_path.is_file()]
        if missing:
            raise PipelineError(
                f"sweep {self.run_id!r} is incomplete: {len(missing)} of its {len(members)} SAEs have no model.pt "
                f"({', '.join(missing)}); finish it with `uv run python 02_train_sae.py --sae_run_id {self.run_id}` "
                "(it continues where it stopped), then evaluate it"
            )

    def commit(self, task_id: int = 0, task_count: int = 1) -> CheckpointCommit:
        name = CHECKPOINT_COMMIT if task_count == 1 else f"checkpoint.task{task_id}of{task_count}.json"
        return CheckpointCommit(self.dir / name)

    def commits(self) -> list[CheckpointCommit]:
        return [CheckpointCommit(p) for p in sorted(self.dir.glob("checkpoint*.json"))]


def training_runs(store: Store, sae_run_id: str) -> list[TrainingRun]:
    """The SAEs an id names: a sweep's members (grid order), or the one training run."""
    sweep = Sweep(store, sae_run_id)
    return sweep.members() if sweep.exists() else [TrainingRun(store, sae_run_id)]
