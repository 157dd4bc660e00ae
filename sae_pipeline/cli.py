"""Entry points of the numbered scripts: parse flags and settings, call one function, turn errors into one line."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from sae_pipeline.infra.errors import PipelineError, StorageError, storage_error
from sae_pipeline.infra.preemption import StopRequested
from sae_pipeline.settings import CaptureSettings, CommonSettings, StreamSettings, TrainSettings, load_settings

# Installed (overcomplete needs them) and imported by transformers whenever installed, yet never used by a text model:
# torchvision for image and video helpers, scipy for object-detection losses.
UNUSED_BY_TEXT_MODELS = ("torchvision", "scipy")


def skip_unused_imports() -> None:
    """Mark the packages a text model never uses as absent in this process (``sys.modules[name] = None``), so that
    transformers, which imports whatever is installed, leaves them out: about a second of start-up. Only for steps
    that never need them (capture, discover_layers; overcomplete's SAE does), before transformers is imported."""
    for name in UNUSED_BY_TEXT_MODELS:
        sys.modules.setdefault(name, None)


@dataclass(frozen=True)
class Resume:
    """How a step is rerun after a failure: its run-id flag, and what the rerun keeps."""

    flag: str
    keeps: str


CAPTURE_RESUME = Resume("--run_id", "it keeps the complete shards and captures the rest")
TRAIN_RESUME = Resume("--sae_run_id", "it continues from the last checkpoint")
EVALUATE_RESUME = Resume("--sae_run_id", "the trained SAE is untouched; evaluation starts over")


def exit_on_error(fn: Callable[[], object], resume: Resume | None = None) -> None:
    """Users see ``error: <one line>`` and a non-zero exit, never a traceback, for anything they can fix.

    A filesystem failure anywhere (ours or a library's write) is one StorageError line ending with the command that
    resumes the step: ``resume`` names the step's run-id flag; the id is the run folder the failed path lies in.
    """
    try:
        fn()
    except StopRequested as exc:
        _fail(str(exc), exc.exit_code, prefix="stopped")
    except PipelineError as exc:
        _fail(_with_resume(exc, resume) if isinstance(exc, StorageError) else str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        storage = storage_error(exc)
        if storage is None:
            raise
        _fail(_with_resume(storage, resume), storage.exit_code)


def _with_resume(exc: StorageError, resume: Resume | None) -> str:
    if resume is None:
        return str(exc)
    if exc.run_id is None:
        return f"{exc}; then rerun the same command with the same {resume.flag} ({resume.keeps})"
    script = Path(sys.argv[0]).name
    return f"{exc}; then rerun `uv run python {script} {resume.flag} {exc.run_id}` ({resume.keeps})"


def _fail(message: str, code: int, prefix: str = "error") -> NoReturn:
    _close_progress_bars()
    sys.stderr.write(f"{prefix}: {message}\n")  # one write: lines of several ranks never run into each other
    sys.stderr.flush()
    sys.exit(code)


def _close_progress_bars() -> None:
    """A bar the failed step left open would put the error line at the end of its own line."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ())):
        bar.close()


def prepare_process() -> None:
    """Before any heavy import, settle whether the hub is used: offline, a model or dataset that is not cached
    fails at once instead of after retries."""
    from sae_pipeline.lm.hub import settle_offline_mode

    settle_offline_mode()


def save_activations_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Step 1: capture a layer's activations into the store.")
    parser.add_argument("--run_id", help="activation run id (default: a fresh one); an unfinished run is resumed")
    args = parser.parse_args(argv)

    def run() -> None:
        settings = load_settings(CaptureSettings)  # before the heavy import: a bad variable fails in a blink
        skip_unused_imports()
        prepare_process()
        from sae_pipeline.infra.timing import process_start
        from sae_pipeline.steps.capture import save_activations

        save_activations(settings, run_id=args.run_id, started=process_start())

    exit_on_error(run, CAPTURE_RESUME)


def train_sae_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Step 2: train a TopK SAE, or a sweep of SAEs, on an activation run.")
    parser.add_argument("--run_id", help="activation run to train on (default: the one in STORE_DIR/run_id.txt)")
    parser.add_argument(
        "--sae_run_id",
        help="training run id, a sweep's id for several SAEs (default: SAE_RUN_ID, else a fresh one); an unfinished "
        "run is resumed",
    )
    args = parser.parse_args(argv)

    def run() -> None:
        settings = load_settings(TrainSettings)  # before the heavy import: a bad variable fails in a blink
        streamed = load_settings(StreamSettings) if settings.stream else None  # step 1's variables too
        prepare_process()
        from sae_pipeline.infra.distributed import Dist
        from sae_pipeline.steps.train import train_sae

        dist = Dist.from_env(os.environ)  # the one place that reads torchrun's WORLD_SIZE/RANK/LOCAL_RANK
        try:
            if streamed is not None:
                from sae_pipeline.steps.stream import stream_sae

                if args.run_id:
                    raise PipelineError("--run_id names an activation run, but STREAM=1 trains without one: drop one")
                stream_sae(streamed, sae_run_id=args.sae_run_id, dist=dist)
            else:
                train_sae(settings, run_id=args.run_id, sae_run_id=args.sae_run_id, dist=dist)
        finally:
            dist.close()

    exit_on_error(run, TRAIN_RESUME)


def discover_layers_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Show a model's layers and which one to hook.")
    parser.add_argument("--load", action="store_true", help="load the weights and list the hook names")
    parser.add_argument("--all", action="store_true", help="list every hook name, not only the per-block ones")
    args = parser.parse_args(argv)

    def run() -> None:
        settings = load_settings(CommonSettings)
        skip_unused_imports()
        prepare_process()
        from sae_pipeline.steps.discover import discover

        discover(settings, load=args.load, show_all=args.all)

    exit_on_error(run)


def evaluate_sae_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Step 3: evaluate a trained SAE, or every SAE of a sweep (CE-loss recovered, reconstruction, "
        "feature browser; a sweep's frontier report)."
    )
    parser.add_argument(
        "--sae_run_id",
        help="training run or sweep to evaluate (default: SAE_RUN_ID, else the one in STORE_DIR/sae_run_id.txt)",
    )
    args = parser.parse_args(argv)

    def run() -> None:
        from sae_pipeline.settings import EvalSettings

        settings = load_settings(EvalSettings)  # before the heavy import: a bad variable fails in a blink
        prepare_process()
        from sae_pipeline.steps.evaluate import evaluate_sae

        evaluate_sae(settings, sae_run_id=args.sae_run_id)

    exit_on_error(run, EVALUATE_RESUME)


INTERPRET_RESUME = Resume("--sae_run_id", "it continues after the last latent written")


def interpret_sae_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Step 4: explain an SAE's latents with a local instruct model and score the explanations "
        "(detection, fuzzing, and a control), or every SAE's of a sweep."
    )
    parser.add_argument(
        "--sae_run_id",
        help="training run or sweep to interpret (default: SAE_RUN_ID, else the one in STORE_DIR/sae_run_id.txt)",
    )
    args = parser.parse_args(argv)

    def run() -> None:
        from sae_pipeline.settings import InterpretSettings

        settings = load_settings(InterpretSettings)  # before the heavy import: a bad variable fails in a blink
        prepare_process()
        from sae_pipeline.steps.interpret import interpret_sae

        for folder in interpret_sae(settings, sae_run_id=args.sae_run_id):
            print(f"interpretation written to {folder}")

    exit_on_error(run, INTERPRET_RESUME)
