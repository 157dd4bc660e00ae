"""Step 1: capture the hooked layers' activations of real tokens into an activation run, shard by shard, resumably.

Shard i holds documents [i * DOCS_PER_SHARD, (i + 1) * DOCS_PER_SHARD) of the (limited) split. Shards are the unit
of work: a rerun skips the ones on disk, an array task takes every N-th, a stop signal lets the current one finish.

One forward per batch serves every listed layer (a mi_crow detector on each; the forward stops right after the
hook that fires last). Three stages run beside each other, joined by bounded queues (infra/stages.py):

    prepare  (thread)  read and tokenise a shard, sort its documents by length, plan where each stored row goes,
                       pad the batches; in the main thread, between forwards, when the forward runs on CPU cores
                       that torch's threads already fill (see ``prepare_ahead``)
    forward  (main)    the truncated forward; each layer's stored rows go straight into the shard's buffers in
                       document order (CPU: one cast-and-copy; CUDA: selected and cast on the GPU, then copied into
                       pinned buffers on a side stream while the next forward runs)
    write    (thread)  write the complete shard atomically (ActivationRun.write_shard); two sets of buffers take
                       turns, so memory stays flat
"""

from __future__ import annotations

import bisect
import functools
import itertools
import os
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from sae_pipeline.infra.errors import PipelineError, human_bytes
from sae_pipeline.infra.preemption import StopFlag, StopRequested
from sae_pipeline.infra.progress import ProgressMeter
from sae_pipeline.infra.stages import InlineProducer, Producer, Worker
from sae_pipeline.infra.timing import StageClock
from sae_pipeline.lm.batches import Planner
from sae_pipeline.lm.capture import Capturer, out_of_memory_hint
from sae_pipeline.lm.data import load_texts
from sae_pipeline.lm.layers import resolve_layers
from sae_pipeline.lm.loading import (
    is_out_of_memory,
    load_config,
    load_language_model,
    num_layers,
    resolve_device,
    resolve_dtype,
)
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import RUN_ID_FILE, Store, new_run_id, validate_run_id
from sae_pipeline.store.shard_writer import BufferPool, ShardWriter

STAGES = ("start-up", "tokenise", "forward", "copy", "write", "waiting for batches", "waiting for the writer")
BATCHES_AHEAD = 4  # padded batches prepared ahead of the forward
DISK_SAMPLE_DOCS = 512  # documents tokenised to estimate the disk a capture needs


@dataclass(frozen=True)
class CaptureJob:
    """Everything step 1 works with, resolved and checked once before any shard: the run it writes, the model with
    its hooks, the plan of the documents, and the shards this process captures (``todo``, in order)."""

    settings: CaptureSettings
    run: ActivationRun
    capturer: Capturer
    planner: Planner
    manifest: dict[str, Any]
    mine: range  # this process's shards (every one, or an array task's share)
    todo: list[int]  # of those, the ones not on disk yet
    started: float  # when the process started (time.time()), for the start-up time

    @classmethod
    def open(cls, settings: CaptureSettings, run_id: str | None, started: float) -> CaptureJob:
        run = open_run(settings, run_id)
        texts = load_texts(
            settings.hf_dataset,
            settings.data_split,
            settings.text_field,
            settings.data_limit,
            settings.data_shuffle,
            settings.seed,
        )
        capturer, manifest = load_capturer(settings, run.run_id, len(texts))
        mine = range(manifest["n_shards"])
        if settings.capture_task_id is not None:
            mine = range(settings.capture_task_id, manifest["n_shards"], settings.capture_task_count)
        done = run.completed_shards() if run.exists() else set()
        planner = Planner(texts, capturer.tokenizer, settings, capturer.special_ids, pin=capturer.device.type == "cuda")
        todo = [i for i in mine if i not in done]
        return cls(settings, run, capturer, planner, manifest, mine, todo, started)

    @property
    def n_documents_todo(self) -> int:
        per, n = self.settings.docs_per_shard, len(self.planner.texts)
        return sum(min(per, n - i * per) for i in self.todo)


@dataclass
class CaptureSummary:
    run_id: str
    complete: bool
    n_tokens: int
    n_shards_written: int
    n_empty: int
    bytes_written: int
    seconds: float
    timing: dict[str, Any] | None = None


def save_activations(
    settings: CaptureSettings, run_id: str | None = None, stop: StopFlag | None = None, started: float | None = None
) -> CaptureSummary:
    """Step 1. ``started``: when the process started (time.time()), for the start-up time; default: now."""
    job = CaptureJob.open(settings, run_id, time.time() if started is None else started)
    if job.run.exists():
        old = job.run.read_meta()
        job.run.check_same_run(old, job.manifest)
        if old.get("status") == "complete":
            return already_complete(job, old)
    check_disk_space(job)
    start_or_resume(job)
    stop = stop or StopFlag().install()
    clock = StageClock(STAGES, job.capturer.device)
    ahead = prepare_ahead(job.capturer.device)
    writer, stopped = run_stages(job, stop, clock, ahead)
    timing = time_report(job, clock, writer, ahead)
    job.run.write_timing(timing)
    if stopped:
        raise StopRequested(
            f"{stop.signal_name} received: saved {len(writer.written)} shard(s) of run {job.run.run_id!r}; "
            f"rerun with --run_id {job.run.run_id} to continue"
        )
    final = job.run.finalize_if_complete()
    summary = CaptureSummary(
        job.run.run_id,
        final is not None,
        timing["tokens"],
        len(writer.written),
        sum(info["n_empty"] for info, _ in writer.written),
        sum(size for _, size in writer.written),
        time.time() - job.started,
        timing,
    )
    print(summary_line(job, summary, final), file=sys.stderr)
    return summary


def open_run(settings: CaptureSettings, run_id: str | None) -> ActivationRun:
    """The run to write: a new id, or an existing activation run (never another kind of folder)."""
    store = Store(settings.store_dir)
    store.ensure_writable()
    run_id = validate_run_id(run_id or settings.run_id or new_run_id("act"), "--run_id" if run_id else "RUN_ID")
    run = ActivationRun(store, run_id)
    run.status()  # refuses a folder that holds anything else
    return run


def load_capturer(settings: CaptureSettings, run_id: str, n_documents: int) -> tuple[Capturer, dict[str, Any]]:
    """The model with its hooks on the resolved layers, and the run's manifest (what a resume must match)."""
    config = load_config(settings.model_id)
    device = resolve_device(settings.device)
    model_dtype = resolve_dtype(settings.model_dtype, device, config)
    lm = load_language_model(settings.model_id, settings.store_dir, device, model_dtype)
    capturer = Capturer(lm, resolve_layers(lm.layers.get_layer_names(), settings, num_layers(config)), settings)
    manifest = ActivationRun.new_manifest(
        settings,
        run_id,
        capturer.layers,
        model_dtype=str(model_dtype).removeprefix("torch."),
        n_documents=n_documents,
        n_layers=num_layers(config),
        special_token_ids=sorted(set(lm.tokenizer.all_special_ids)),
        prepend_bos=capturer.prepends_bos(),
    )
    return capturer, manifest


def already_complete(job: CaptureJob, meta: dict[str, Any]) -> CaptureSummary:
    job.run.store.write_pointer(job.run.run_id, RUN_ID_FILE)
    print(
        f"run {job.run.run_id!r} is already complete ({meta['n_tokens']:,} tokens); nothing to do. "
        f"Start a new capture with another --run_id.",
        file=sys.stderr,
    )
    return CaptureSummary(job.run.run_id, True, meta["n_tokens"], 0, 0, 0, time.time() - job.started)


def start_or_resume(job: CaptureJob) -> None:
    """A new run gets its manifest; a resumed one loses the temporaries a kill left in this process's shards."""
    if job.run.exists():
        job.run.remove_stale_temporaries(set(job.mine))
    else:
        job.run.write_meta(job.manifest)
    if len(job.todo) < len(job.mine):
        print(
            f"resuming run {job.run.run_id!r}: {len(job.mine) - len(job.todo)} of {len(job.mine)} shards already "
            "on disk",
            file=sys.stderr,
        )


def check_disk_space(job: CaptureJob) -> None:
    """Say what the capture will take on disk (tokens estimated from an even sample of the documents to capture),
    and refuse to start when STORE_DIR has less room than that."""
    settings, store, layers = job.settings, job.run.store, job.capturer.layers
    tokens, sampled = estimate_tokens(job)
    if not sampled:
        return
    per_token = ActivationRun.bytes_per_token(layers, settings.store_dtype)
    need, free = tokens * per_token, shutil.disk_usage(store.runs_dir).free
    widths = ", ".join(str(layer.d_model) for layer in layers)
    print(
        f"capture: {len(layers)} layer(s) of d_model {widths} in {settings.store_dtype}: {per_token:,} bytes per "
        f"token with its provenance; about {tokens:,.0f} tokens to capture (estimated from {sampled} "
        f"documents) take about {human_bytes(need)}; {store.root} has {human_bytes(free)} free",
        file=sys.stderr,
    )
    if need > free:
        raise PipelineError(
            f"STORE_DIR={str(store.root)!r} has {human_bytes(free)} free, but this capture needs about "
            f"{human_bytes(need)} ({per_token:,} bytes per token x about {tokens:,.0f} tokens): free space, set "
            "STORE_DIR to a larger disk, or capture less (DATA_LIMIT, MAX_LENGTH, fewer layers)"
        )


def estimate_tokens(job: CaptureJob) -> tuple[float, int]:
    """(stored tokens of the shards to capture, documents sampled), from an even sample of their documents."""
    per, planner = job.settings.docs_per_shard, job.planner
    counts = [min(per, len(planner.texts) - i * per) for i in job.todo]
    ends = list(itertools.accumulate(counts))
    if not ends:
        return 0.0, 0
    sample = []
    for pick in range(0, ends[-1], max(1, ends[-1] // DISK_SAMPLE_DOCS))[:DISK_SAMPLE_DOCS]:
        j = bisect.bisect_right(ends, pick)
        sample.append(job.todo[j] * per + pick - (ends[j] - counts[j]))
    texts = [t for t in planner.texts[sample][job.settings.text_field] if isinstance(t, str) and t.strip()]
    stored = len(planner.stored(list(range(len(texts))), planner.encode(texts))[0])
    return stored * ends[-1] / len(sample), len(sample)


def prepare_ahead(device: torch.device) -> bool:
    """Whether the prepare stage gets its own thread, working ahead of the forward: on a GPU, and on a CPU where
    torch leaves a core free. Beside a CPU forward whose threads take every core it would only pre-empt them, and
    they would wait for each other at every barrier (benchmarks/RESULTS.md)."""
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads() < cores


def run_stages(job: CaptureJob, stop: StopFlag, clock: StageClock, ahead: bool) -> tuple[ShardWriter, bool]:
    """The stages over this process's shards (``ahead``: the prepare stage in its own thread); ``True`` at the end
    when a stop signal ended them early (after a whole shard, every forwarded shard written). An error anywhere
    cancels every stage."""
    capturer = job.capturer
    writer = ShardWriter(job.run, clock)
    write = Worker("write", writer, maxsize=2)
    writer.pool = BufferPool(capturer.layers, capturer.dtype, capturer.copy_stream is not None, write)
    batches = functools.partial(job.planner.batches, job.todo, clock)
    prepare = Producer("prepare", batches, maxsize=BATCHES_AHEAD) if ahead else InlineProducer("prepare", batches)
    name = "capture " + (capturer.layers[0].signature if len(capturer.layers) == 1 else "layers")
    try:
        with ProgressMeter(name, job.n_documents_todo, "doc", every_s=job.settings.progress_every_seconds) as meter:
            stopped = forward_all(job, prepare, write, writer.pool, stop, clock, meter)
        prepare.cancel()
        write.close()
    except BaseException:
        for stage in (prepare, write):
            stage.cancel()
        raise
    return writer, stopped


def forward_all(
    job: CaptureJob,
    prepare: Producer | InlineProducer,
    write: Worker,
    pool: BufferPool,
    stop: StopFlag,
    clock: StageClock,
    meter: ProgressMeter,
) -> bool:
    """The main thread's part: forward every prepared batch into its shard's buffers and hand complete shards to
    the writer; polls the stop flag between shards. Returns whether it stopped early."""
    first, buffers = True, None
    with torch.inference_mode():
        while True:
            batch, waited = prepare.get()
            clock.add("start-up" if first else "waiting for batches", time.time() - job.started if first else waited)
            first = False
            if batch is None:
                return False
            if buffers is None:
                buffers, waited = pool.take(batch.shard.info["n_tokens"])
                clock.add("waiting for the writer", waited)
            if batch.n_docs:
                forward(job, batch, buffers, clock)
            info = batch.shard.info
            meter.update(batch.n_docs + (info["n_empty"] if batch.last else 0), int(info["n_tokens"]) * batch.last)
            if batch.last:
                clock.add("waiting for the writer", write.put((batch.shard, buffers, job.capturer.shard_copied())))
                buffers = None
                if stop.requested and batch.shard.index != job.todo[-1]:
                    return True


def forward(job: CaptureJob, batch, buffers, clock: StageClock) -> None:
    """One batch's forward into the shard's buffers, timed; a GPU out of memory names the variable to lower."""
    mark, started = clock.gpu.begin(), time.perf_counter()
    try:
        job.capturer.forward(batch, buffers.full)
    except Exception as exc:
        if is_out_of_memory(exc):
            raise out_of_memory_hint(batch, job.settings) from None
        raise
    clock.gpu.end(mark)
    clock.add("forward", time.perf_counter() - started - job.capturer.copy_seconds)
    clock.add("copy", job.capturer.copy_seconds)


def time_report(job: CaptureJob, clock: StageClock, writer: ShardWriter, ahead: bool) -> dict[str, Any]:
    """This process's time report (GPU busy counted after start-up), with what it wrote and whether it prepared
    batches ahead in a thread."""
    settings = job.settings
    wall = time.time() - job.started
    return clock.report(
        wall,
        gpu_span_s=wall - clock.seconds()["start-up"],
        host=socket.gethostname(),
        task=None if settings.capture_task_id is None else [settings.capture_task_id, settings.capture_task_count],
        device=str(job.capturer.device),
        shards=len(writer.written),
        tokens=sum(info["n_tokens"] for info, _ in writer.written),
        prepare_ahead=ahead,
    )


def summary_line(job: CaptureJob, summary: CaptureSummary, final: dict[str, Any] | None) -> str:
    run, layers = job.run, job.capturer.layers
    startup = summary.timing["stages_s"]["start-up"]
    rate = summary.n_tokens / max(summary.seconds - startup, 1e-9)
    where = (
        layers[0].signature if len(layers) == 1 else f"{len(layers)} layers ({', '.join(x.signature for x in layers)})"
    )
    widths = ", ".join(sorted({str(x.d_model) for x in layers}))
    overlap = "they overlap"
    if not summary.timing["prepare_ahead"]:
        overlap = "tokenised between forwards, which take every core; written beside them"
    text = (
        f"Captured {summary.n_tokens:,} tokens (d_model {widths}, {job.settings.store_dtype}) from {where} into "
        f"{summary.n_shards_written} shard(s), {summary.bytes_written / 2**20:,.1f} MiB, in {summary.seconds:,.1f} s "
        f"({rate:,.0f} tokens/s after a {startup:,.1f} s start-up); {summary.n_empty} empty document(s) skipped. "
        f"Seconds by stage ({overlap}): {StageClock.describe(summary.timing)}. "
    )
    if final is not None:
        return text + (
            f"Run {summary.run_id!r} is complete: {final['n_tokens']:,} tokens in {final['n_shards']} shards, "
            f"{final['bytes'] / 2**20:,.1f} MiB at {run.dir}; {run.store.root / RUN_ID_FILE} points to it."
        )
    missing = run.read_meta()["n_shards"] - len(run.completed_shards())
    return text + (
        f"Run {summary.run_id!r} at {run.dir} still misses {missing} shard(s) of other array tasks; "
        "it is marked complete when the last one finishes."
    )
