"""Step 1: capture the hooked layers' activations of real tokens into an activation run, shard by shard, resumably.

Shard i holds documents [i * DOCS_PER_SHARD, (i + 1) * DOCS_PER_SHARD) of the (limited) split. Shards are the unit
of work: a rerun skips the ones on disk, an array task takes every N-th, a stop signal lets the current one finish.

One forward per batch serves every listed layer (a mi_crow detector on each; the forward stops right after the
hook that fires last). Three stages run beside each other, joined by bounded queues (sae_pipeline/stages.py):

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
import queue
import shutil
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from sae_pipeline.data import load_texts
from sae_pipeline.errors import PipelineError, human_bytes
from sae_pipeline.layers import hf_module_path, resolve_signature
from sae_pipeline.model import (
    DTYPES,
    is_out_of_memory,
    load_config,
    load_language_model,
    num_layers,
    resolve_device,
    resolve_dtype,
)
from sae_pipeline.preemption import StopFlag, StopRequested
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.stages import InlineProducer, Producer, Worker
from sae_pipeline.store import ActivationRun, LayerSpec, Store, block_index, new_run_id, validate_run_id
from sae_pipeline.timing import StageClock

STAGES = ("start-up", "tokenise", "forward", "copy", "write", "waiting for batches", "waiting for the writer")
BATCHES_AHEAD = 4  # padded batches prepared ahead of the forward
DISK_SAMPLE_DOCS = 512  # documents tokenised to estimate the disk a capture needs


def pad_batch(sequences: list[list[int]], pad_id: int, left: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask, padded on the tokenizer's side (Bielik pads on the left)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if left else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids, mask


def keep_mask(ids: torch.Tensor, mask: torch.Tensor, special_ids: torch.Tensor, keep_special: bool) -> torch.Tensor:
    """The positions a run stores: real tokens from the attention mask (never from the pad id: Bielik pads with
    EOS), special tokens (BOS, ...) only when asked for. Evaluation splices exactly these positions."""
    keep = mask.bool()
    if not keep_special:
        keep &= ~torch.isin(ids, special_ids)
    return keep


# ---------------------------------------------------------------------------------------------------- prepare


@dataclass
class ShardPlan:
    """A shard before any forward: its document range and the provenance of its stored rows in document order."""

    index: int
    info: dict[str, Any]  # index, doc_start, doc_stop, n_tokens, n_empty (the shard's metadata.json entry)
    provenance: torch.Tensor  # int32 [n_tokens, 3]: document index, position, token id


@dataclass
class Batch:
    """One forward's input, and where each of its stored rows goes in the shard."""

    shard: ShardPlan
    ids: torch.Tensor  # [docs, width], padded
    mask: torch.Tensor
    positions: torch.Tensor
    rows: torch.Tensor  # the stored positions as flat indices into [docs * width], row by row
    runs: list[tuple[int, int, int, int]]  # stretches of stored rows: (flat index, index in rows, shard row, length)
    n_docs: int  # 0 for the one placeholder batch of a shard without documents
    last: bool  # the shard's last batch


class Planner:
    """Turns a shard's documents into batches: tokenised like evaluation, longest first (less padding), sized by
    BATCH_SIZE_SAVE documents or BATCH_TOKENS_SAVE padded tokens."""

    def __init__(self, texts, tokenizer, settings: CaptureSettings, special_ids: torch.Tensor, pin: bool) -> None:
        self.texts, self.tokenizer, self.settings = texts, tokenizer, settings
        self.special_ids, self.pin = special_ids, pin
        self.left = tokenizer.padding_side == "left"

    def documents(self, index: int) -> tuple[list[int], list[list[int]], int, int]:
        """(document indices, token ids, rows in the shard, empty rows) of the non-empty documents of shard i."""
        per = self.settings.docs_per_shard
        rows = self.texts[index * per : (index + 1) * per][self.settings.text_field]
        docs = [(index * per + j, t) for j, t in enumerate(rows) if isinstance(t, str) and t.strip()]
        encoded = self.encode([t for _, t in docs])
        return [d for d, _ in docs], encoded, len(rows), len(rows) - len(docs)

    def encode(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        return self.tokenizer(texts, truncation=True, max_length=self.settings.max_length)["input_ids"]

    def stored(self, doc_ids: list[int], encoded: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The provenance of the stored tokens in document order, and how many each document has."""
        lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
        ids = torch.tensor(list(itertools.chain.from_iterable(encoded)), dtype=torch.long)
        doc = torch.repeat_interleave(torch.arange(len(encoded)), lengths)
        position = torch.arange(len(ids)) - (lengths.cumsum(0) - lengths)[doc]
        keep = keep_mask(ids, torch.ones_like(ids), self.special_ids, self.settings.keep_special_tokens)
        provenance = torch.stack([torch.tensor(doc_ids, dtype=torch.long)[doc], position, ids], dim=1)[keep]
        return provenance.to(torch.int32), torch.bincount(doc[keep], minlength=len(encoded))

    def shard(self, index: int) -> list[Batch]:
        doc_ids, encoded, n_rows, n_empty = self.documents(index)
        provenance, per_doc = self.stored(doc_ids, encoded)
        offsets = per_doc.cumsum(0) - per_doc  # each document's first row in the shard
        start = index * self.settings.docs_per_shard
        info = {
            "index": index,
            "doc_start": start,
            "doc_stop": start + n_rows,
            "n_tokens": int(provenance.shape[0]),
            "n_empty": n_empty,
        }
        plan = ShardPlan(index, info, provenance)
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        groups = list(self.groups([len(encoded[i]) for i in order]))
        if not groups:
            empty = torch.empty(0, dtype=torch.long)
            return [Batch(plan, empty[None], empty[None], empty[None], empty, empty, 0, True)]
        return [self.batch(plan, encoded, order[g], offsets, last=n == len(groups) - 1) for n, g in enumerate(groups)]

    def groups(self, lengths: list[int]) -> Iterator[slice]:
        """Consecutive documents of a longest-first list, one slice per forward."""
        budget, start = self.settings.batch_tokens_save, 0
        while start < len(lengths):
            size = max(1, budget // lengths[start]) if budget else self.settings.batch_size_save
            yield slice(start, start + size)
            start += size

    def batch(self, plan: ShardPlan, encoded: list[list[int]], docs: list[int], offsets, last: bool) -> Batch:
        ids, mask = pad_batch([encoded[i] for i in docs], self.tokenizer.pad_token_id, self.left)
        positions = (mask.cumsum(1) - 1).clamp(min=0)  # as in generation: a padded document keeps its positions
        keep = keep_mask(ids, mask, self.special_ids, self.settings.keep_special_tokens)
        rows = keep.flatten().nonzero().squeeze(1)
        counts = keep.sum(1)
        first = counts.cumsum(0) - counts  # each document's first row within this batch
        dest = torch.repeat_interleave(offsets[docs] - first, counts) + torch.arange(len(rows))
        tensors = [ids, mask, positions, rows]
        if self.pin:  # pinned: the copies to the GPU do not wait for the host
            tensors = [t.pin_memory() for t in tensors]
        return Batch(plan, *tensors, runs(rows, dest), len(docs), last)

    def batches(self, shards: list[int], clock: StageClock) -> Iterator[Batch]:
        for index in shards:
            with clock.stage("tokenise"):
                batches = self.shard(index)
            yield from batches


def runs(rows: torch.Tensor, dest: torch.Tensor) -> list[tuple[int, int, int, int]]:
    """The stretches where consecutive stored rows are consecutive in the batch and in the shard (a document's
    tokens, unless a special token splits them): one copy each, from the forward's output into the shard."""
    if len(rows) == 0:
        return []
    breaks = ((rows[1:] - rows[:-1] != 1) | (dest[1:] - dest[:-1] != 1)).nonzero().squeeze(1) + 1
    starts = torch.cat([torch.zeros(1, dtype=torch.long), breaks])
    lengths = torch.diff(starts, append=torch.tensor([len(rows)]))
    return list(zip(rows[starts].tolist(), starts.tolist(), dest[starts].tolist(), lengths.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------------- forward


class _StopForward(Exception):
    """Raised right after the deepest hooked layer: nothing later in the model is needed."""


def _make_detector(signature: str, hook_side: str, order: itertools.count, take):
    from mi_crow.hooks import Detector
    from mi_crow.hooks.hook import HookType
    from mi_crow.hooks.utils import extract_tensor_from_output

    class StoredRowsCapture(Detector):
        """A mi_crow detector that hands the hooked tensor, as [batch * seq, d], to ``take(signature, tensor)``.

        ``batch_shape`` is set before each forward: a hook that gives anything else is not taken (and reported).
        ``fired`` records when the hook ran, so that the forward can stop after the last one.
        """

        def __init__(self) -> None:
            side = HookType.PRE_FORWARD if hook_side == "input" else HookType.FORWARD
            super().__init__(hook_type=side, hook_id=f"sae_pipeline_capture_{signature}", layer_signature=signature)
            self.batch_shape: tuple[int, ...] = ()
            self.fired = -1

        def process_activations(self, module, input, output) -> None:
            tensor = input[0] if self.hook_type == HookType.PRE_FORWARD else extract_tensor_from_output(output)
            self.fired = next(order)
            if isinstance(tensor, torch.Tensor) and tensor.ndim == 3 and tuple(tensor.shape[:2]) == self.batch_shape:
                take(signature, tensor.reshape(-1, tensor.shape[-1]))

    return StoredRowsCapture()


def copy_runs(dest: torch.Tensor, source: torch.Tensor, runs, column: int, non_blocking: bool = False) -> None:
    """``dest[shard row ...] = source[row ...]`` stretch by stretch, casting on the way (``column``: which index
    of a run addresses ``source``: 0 its flat index in the batch, 1 its index among the stored rows)."""
    for run in runs:
        src, dst, n = run[column], run[2], run[3]
        dest[dst : dst + n].copy_(source[src : src + n], non_blocking=non_blocking)


class Capturer:
    """The model with one detector per layer and a stop after the deepest; runs one batch's forward and puts each
    layer's stored rows into the shard's buffers, in document order.

    On the CPU the rows are copied straight from the hooked tensor into the buffers, cast on the way (one pass, no
    temporary). On CUDA they are selected and cast on the GPU, then copied into the (pinned) buffers on a side
    stream, so the next forward does not wait for them; ``shard_copied()`` gives the event that says they are done.
    """

    def __init__(self, lm, signatures: list[str], settings: CaptureSettings):
        self.lm = lm
        self.device = next(lm.model.parameters()).device
        self.dtype = DTYPES[settings.store_dtype]
        self.tokenizer = lm.tokenizer
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copy_seconds = 0.0  # host time spent copying rows, in the last forward
        self._take = None
        fired = itertools.count()
        self.detectors = {
            sig: _make_detector(sig, settings.hook_side, fired, lambda sig, flat: self._take(sig, flat))
            for sig in signatures
        }
        for sig, detector in self.detectors.items():
            lm.layers.register_hook(sig, detector)
        self.layers = self._probe()

    @staticmethod
    def _stop(module, input, output):
        raise _StopForward

    def _probe(self) -> list[LayerSpec]:
        """One short full forward: the width each hook gives (measured, not read from a config that may not apply)
        and which hook fires last, after which every later forward stops."""
        ids, mask = pad_batch(
            [self.tokenizer("probe")["input_ids"]], self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        )
        widths: dict[str, int] = {}
        self._forward(
            ids, mask, (mask.cumsum(1) - 1).clamp(min=0), lambda sig, flat: widths.update({sig: flat.shape[1]})
        )
        deepest = max(self.detectors, key=lambda sig: self.detectors[sig].fired)
        self.lm.layers.register_forward_hook_for_layer(deepest, self._stop)
        return [
            LayerSpec(sig, int(widths[sig]), hf_module_path(self.lm.model, sig), block_index(sig))
            for sig in self.detectors
        ]

    def forward(self, batch: Batch, buffers: dict[str, torch.Tensor]) -> None:
        """The batch's forward; each layer's stored rows go to ``buffers[signature]`` (the shard, document order).

        Position ids come from the mask, as in generation, so a left-padded document gets the positions it has
        alone; the rows are selected on the device, so only stored tokens cross to the host.
        """
        self.copy_seconds = 0.0
        if self.copy_stream is None:
            self._forward(
                batch.ids, batch.mask, batch.positions, lambda sig, flat: self._copy(buffers[sig], flat, batch)
            )
            return
        rows, stored = batch.rows.to(self.device, non_blocking=True), {}
        self._forward(
            batch.ids,
            batch.mask,
            batch.positions,
            lambda sig, flat: stored.update({sig: flat.to(self.dtype).index_select(0, rows)}),
        )
        started = time.perf_counter()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for sig, rows_of_layer in stored.items():
                rows_of_layer.record_stream(self.copy_stream)  # not reused by the forward before it is copied
                copy_runs(buffers[sig], rows_of_layer, batch.runs, column=1, non_blocking=True)
        self.copy_seconds = time.perf_counter() - started

    def _copy(self, dest: torch.Tensor, flat: torch.Tensor, batch: Batch) -> None:
        started = time.perf_counter()
        copy_runs(dest, flat, batch.runs, column=0)
        self.copy_seconds += time.perf_counter() - started

    def shard_copied(self):
        """On CUDA the event after every copy issued so far (wait on it before reading the buffers); else None."""
        return None if self.copy_stream is None else self.copy_stream.record_event()

    def _forward(self, ids, mask, positions, take) -> None:
        to_device = dict(device=self.device, non_blocking=True)
        taken = set()
        self._take = lambda sig, flat: (taken.add(sig), take(sig, flat))
        for detector in self.detectors.values():
            detector.batch_shape = tuple(ids.shape)
        with torch.inference_mode():
            try:
                self.lm.model(
                    input_ids=ids.to(**to_device),
                    attention_mask=mask.to(**to_device),
                    position_ids=positions.to(**to_device),
                    use_cache=False,
                )
            except _StopForward:
                pass
        missing = [sig for sig in self.detectors if sig not in taken]
        if missing:
            raise PipelineError(
                f"the hook {missing[0]!r} does not give one activation vector per token; choose another "
                "LAYER_SIGNATURE (discover_layers.py --all lists them)"
            )

    def prepends_bos(self) -> bool:
        """Whether the tokenizer starts every document with BOS (recorded for SAELens' ``prepend_bos``)."""
        bos = self.tokenizer.bos_token_id
        ids = self.tokenizer("probe")["input_ids"]
        return bos is not None and bool(ids) and ids[0] == bos


def out_of_memory_hint(batch: Batch, settings: CaptureSettings) -> PipelineError:
    docs, width = batch.ids.shape
    if settings.batch_tokens_save:
        lower = f"lower BATCH_TOKENS_SAVE (now {settings.batch_tokens_save})"
    else:
        lower = f"lower BATCH_SIZE_SAVE (now {settings.batch_size_save}), or set BATCH_TOKENS_SAVE below {docs * width}"
    return PipelineError(
        f"the GPU ran out of memory in a forward of {docs} documents x {width} tokens: {lower}; "
        "rerun with the same --run_id to resume"
    )


# ---------------------------------------------------------------------------------------------------- write


@dataclass
class HostBuffers:
    """One shard's rows of every layer, in document order; ``full`` keeps the capacity for the next shard."""

    full: dict[str, torch.Tensor]
    n_tokens: int = 0

    def views(self) -> dict[str, torch.Tensor]:
        return {sig: buf[: self.n_tokens] for sig, buf in self.full.items()}


class BufferPool:
    """Buffers that take turns (one shard filling, one being written): host memory holds two shards at most and
    reuses the same pages shard after shard. Pinned on CUDA, so the copies from the GPU land in them directly."""

    def __init__(self, layers: list[LayerSpec], dtype: torch.dtype, pin: bool, writer: Worker, sets: int = 2) -> None:
        self.layers, self.dtype, self.pin, self.writer = layers, dtype, pin, writer
        self._free: queue.Queue[HostBuffers] = queue.Queue()
        for _ in range(sets):
            self._free.put(HostBuffers({}))

    def take(self, n_tokens: int) -> tuple[HostBuffers, float]:
        """A free set grown to ``n_tokens`` rows, and the seconds spent waiting while the writer held every set
        (it fails with the writer)."""
        started = time.perf_counter()
        while True:
            self.writer.raise_if_failed()
            try:
                buffers = self._free.get(timeout=0.1)
                break
            except queue.Empty:
                pass
        waited = time.perf_counter() - started
        for layer in self.layers:
            held = buffers.full.get(layer.signature)
            if held is None or held.shape[0] < n_tokens:
                buffers.full[layer.signature] = torch.empty(
                    n_tokens, layer.d_model, dtype=self.dtype, pin_memory=self.pin
                )
        buffers.n_tokens = n_tokens
        return buffers, waited

    def give_back(self, buffers: HostBuffers) -> None:
        self._free.put(buffers)


class ShardWriter:
    """Writes complete shards (in the write thread) and keeps what the summary needs."""

    def __init__(self, run: ActivationRun, clock: StageClock) -> None:
        self.run, self.clock = run, clock
        self.pool: BufferPool | None = None
        self.written: list[tuple[dict[str, Any], int]] = []  # (shard info, bytes)

    def __call__(self, item: tuple[ShardPlan, HostBuffers, Any]) -> None:
        plan, buffers, copied = item
        if copied is not None:
            with self.clock.stage("copy"):
                copied.synchronize()
        try:
            with self.clock.stage("write"):
                size = self.run.write_shard(plan.index, buffers.views(), plan.provenance, plan.info)
        except OSError as exc:
            raise PipelineError(
                f"could not write shard {plan.index} into {self.run.dir} ({exc.strerror or exc}); free space in "
                f"STORE_DIR or choose another one, then rerun with --run_id {self.run.run_id} to resume"
            ) from None
        self.written.append((plan.info, size))
        self.pool.give_back(buffers)


# ---------------------------------------------------------------------------------------------------- the step


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


def resolve_layers(names: list[str], settings: CaptureSettings, n_layers: int | None) -> list[str]:
    """LAYER_SIGNATURE's names if given, else LAYER_NUM's blocks, in the order listed."""
    if settings.layer_signature:
        return [resolve_signature(names, 0, sig, n_layers) for sig in settings.layer_signature]
    return [resolve_signature(names, num, None, n_layers) for num in settings.layer_num]


def save_activations(
    settings: CaptureSettings, run_id: str | None = None, stop: StopFlag | None = None, started: float | None = None
) -> CaptureSummary:
    """Step 1. ``started``: when the process started (time.time()), for the start-up time; default: now."""
    started = time.time() if started is None else started
    stop = stop or StopFlag().install()
    run = _open_run(settings, run_id)
    texts = load_texts(
        settings.hf_dataset,
        settings.data_split,
        settings.text_field,
        settings.data_limit,
        settings.data_shuffle,
        settings.seed,
    )
    capturer, manifest = _load_capturer(settings, run.run_id, len(texts))
    if run.exists():
        old = run.read_meta()
        run.check_same_run(old, manifest)
        if old.get("status") == "complete":
            run.store.write_pointer(run.run_id)
            print(
                f"run {run.run_id!r} is already complete ({old['n_tokens']:,} tokens); nothing to do. "
                f"Start a new capture with another --run_id.",
                file=sys.stderr,
            )
            return CaptureSummary(run.run_id, True, old["n_tokens"], 0, 0, 0, time.time() - started)

    mine = range(manifest["n_shards"])
    if settings.capture_task_id is not None:
        mine = range(settings.capture_task_id, manifest["n_shards"], settings.capture_task_count)
    done = run.completed_shards() if run.exists() else set()
    todo = [i for i in mine if i not in done]
    planner = Planner(texts, capturer.tokenizer, settings, capturer.special_ids, pin=capturer.device.type == "cuda")
    check_disk_space(run.store, capturer.layers, settings, planner, todo, len(texts))
    if run.exists():
        run.remove_stale_temporaries(set(mine))
    else:
        run.write_meta(manifest)
    if len(todo) < len(mine):
        print(
            f"resuming run {run.run_id!r}: {len(mine) - len(todo)} of {len(mine)} shards already on disk",
            file=sys.stderr,
        )

    clock = StageClock(STAGES, capturer.device)
    ahead = prepare_ahead(capturer.device)
    writer, stopped = _capture(run, capturer, planner, todo, stop, clock, settings, started, ahead)
    timing = _time_report(clock, writer, settings, capturer, started, ahead)
    run.write_timing(timing)
    if stopped:
        raise StopRequested(
            f"{stop.signal_name} received: saved {len(writer.written)} shard(s) of run {run.run_id!r}; "
            f"rerun with --run_id {run.run_id} to continue"
        )
    final = run.finalize_if_complete()
    summary = CaptureSummary(
        run.run_id,
        final is not None,
        timing["tokens"],
        len(writer.written),
        sum(info["n_empty"] for info, _ in writer.written),
        sum(size for _, size in writer.written),
        time.time() - started,
        timing,
    )
    _print_summary(summary, run, final, capturer.layers, settings)
    return summary


def _open_run(settings: CaptureSettings, run_id: str | None) -> ActivationRun:
    """The run to write: a new id, or an existing activation run (never another kind of folder)."""
    store = Store(settings.store_dir)
    store.ensure_writable()
    run_id = validate_run_id(run_id or settings.run_id or new_run_id("act"), "--run_id" if run_id else "RUN_ID")
    run = ActivationRun(store, run_id)
    if run.dir.exists() and not run.exists():
        raise PipelineError(f"{run.dir} exists but is not an activation run; choose another --run_id")
    if run.exists() and run.read_meta().get("kind") != "activations":
        raise PipelineError(f"run {run_id!r} is not an activation run; choose another --run_id")
    return run


def _load_capturer(settings: CaptureSettings, run_id: str, n_documents: int) -> tuple[Capturer, dict[str, Any]]:
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


def _time_report(
    clock: StageClock, writer: ShardWriter, settings: CaptureSettings, capturer: Capturer, started: float, ahead: bool
) -> dict[str, Any]:
    """This process's time report (GPU busy counted after start-up), with what it wrote and whether it prepared
    batches ahead in a thread."""
    wall = time.time() - started
    return clock.report(
        wall,
        gpu_span_s=wall - clock.seconds()["start-up"],
        host=socket.gethostname(),
        task=None if settings.capture_task_id is None else [settings.capture_task_id, settings.capture_task_count],
        device=str(capturer.device),
        shards=len(writer.written),
        tokens=sum(info["n_tokens"] for info, _ in writer.written),
        prepare_ahead=ahead,
    )


def check_disk_space(
    store: Store, layers: list[LayerSpec], settings: CaptureSettings, planner: Planner, todo: list[int], n_docs: int
) -> None:
    """Say what the capture will take on disk (tokens estimated from an even sample of the documents to capture),
    and refuse to start when STORE_DIR has less room than that."""
    per = settings.docs_per_shard
    counts = [min(per, n_docs - i * per) for i in todo]
    ends = list(itertools.accumulate(counts))
    if not ends:
        return
    picks = range(0, ends[-1], max(1, ends[-1] // DISK_SAMPLE_DOCS))[:DISK_SAMPLE_DOCS]
    sample = []
    for pick in picks:
        j = bisect.bisect_right(ends, pick)
        sample.append(todo[j] * per + pick - (ends[j] - counts[j]))
    texts = [t for t in planner.texts[sample][settings.text_field] if isinstance(t, str) and t.strip()]
    tokens = len(planner.stored(list(range(len(texts))), planner.encode(texts))[0]) * ends[-1] / len(sample)
    per_token = ActivationRun.bytes_per_token(layers, settings.store_dtype)
    need, free = tokens * per_token, shutil.disk_usage(store.runs_dir).free
    widths = ", ".join(str(layer.d_model) for layer in layers)
    print(
        f"capture: {len(layers)} layer(s) of d_model {widths} in {settings.store_dtype}: {per_token:,} bytes per "
        f"token with its provenance; about {tokens:,.0f} tokens to capture (estimated from {len(sample)} "
        f"documents) take about {human_bytes(need)}; {store.root} has {human_bytes(free)} free",
        file=sys.stderr,
    )
    if need > free:
        raise PipelineError(
            f"STORE_DIR={str(store.root)!r} has {human_bytes(free)} free, but this capture needs about "
            f"{human_bytes(need)} ({per_token:,} bytes per token x about {tokens:,.0f} tokens): free space, set "
            "STORE_DIR to a larger disk, or capture less (DATA_LIMIT, MAX_LENGTH, fewer layers)"
        )


def prepare_ahead(device: torch.device) -> bool:
    """Whether the prepare stage gets its own thread, working ahead of the forward: on a GPU, and on a CPU where
    torch leaves a core free. Beside a CPU forward whose threads take every core it would only pre-empt them, and
    they wait for each other: the whole step ran at 0.89 of a bare forward with it, 0.96 without
    (benchmarks/RESULTS.md)."""
    if device.type != "cpu":
        return True
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return torch.get_num_threads() < cores


def _capture(
    run: ActivationRun,
    capturer: Capturer,
    planner: Planner,
    todo: list[int],
    stop: StopFlag,
    clock: StageClock,
    settings: CaptureSettings,
    started: float,
    ahead: bool,
) -> tuple[ShardWriter, bool]:
    """The stages over this process's shards (``ahead``: the prepare stage in its own thread); ``True`` at the end
    when a stop signal ended them early (after a whole shard, every forwarded shard written). An error anywhere
    cancels every stage."""
    writer = ShardWriter(run, clock)
    write = Worker("write", writer, maxsize=2)
    writer.pool = BufferPool(capturer.layers, capturer.dtype, capturer.copy_stream is not None, write)
    batches = functools.partial(planner.batches, todo, clock)
    if ahead:
        prepare = Producer("prepare", batches, maxsize=BATCHES_AHEAD)
    else:
        prepare = InlineProducer("prepare", batches)
    n_docs = sum(min(settings.docs_per_shard, len(planner.texts) - i * settings.docs_per_shard) for i in todo)
    try:
        with tqdm(
            total=n_docs,
            unit="doc",
            desc="capture " + (capturer.layers[0].signature if len(capturer.layers) == 1 else "layers"),
            file=sys.stderr,
            dynamic_ncols=True,
            mininterval=0.5 if sys.stderr.isatty() else 30,
        ) as progress:
            stopped = _forward_all(
                capturer, prepare, write, writer.pool, todo, stop, clock, progress, settings, started
            )
        prepare.cancel()
        write.close()
    except BaseException:
        for stage in (prepare, write):
            stage.cancel()
        raise
    return writer, stopped


def _forward_all(
    capturer: Capturer,
    prepare: Producer | InlineProducer,
    write: Worker,
    pool: BufferPool,
    todo: list[int],
    stop: StopFlag,
    clock: StageClock,
    progress: tqdm,
    settings: CaptureSettings,
    started: float,
) -> bool:
    """The main thread's part: forward every prepared batch into its shard's buffers and hand complete shards to
    the writer; polls the stop flag between shards. Returns whether it stopped early."""
    tokens, first, buffers = 0, True, None
    with torch.inference_mode():
        while True:
            batch, waited = prepare.get()
            clock.add("start-up" if first else "waiting for batches", time.time() - started if first else waited)
            first = False
            if batch is None:
                return False
            if buffers is None:
                buffers, waited = pool.take(batch.shard.info["n_tokens"])
                clock.add("waiting for the writer", waited)
            if batch.n_docs:
                mark, forward_started = clock.gpu.begin(), time.perf_counter()
                try:
                    capturer.forward(batch, buffers.full)
                except Exception as exc:
                    if is_out_of_memory(exc):
                        raise out_of_memory_hint(batch, settings) from None
                    raise
                clock.gpu.end(mark)
                clock.add("forward", time.perf_counter() - forward_started - capturer.copy_seconds)
                clock.add("copy", capturer.copy_seconds)
            tokens += int(batch.shard.info["n_tokens"]) if batch.last else 0
            progress.update(batch.n_docs + (batch.shard.info["n_empty"] if batch.last else 0))
            progress.set_postfix_str(f"{tokens / max(progress.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False)
            if batch.last:
                clock.add("waiting for the writer", write.put((batch.shard, buffers, capturer.shard_copied())))
                buffers = None
                if stop.requested and batch.shard.index != todo[-1]:
                    return True


def _print_summary(
    summary: CaptureSummary,
    run: ActivationRun,
    final: dict[str, Any] | None,
    layers: list[LayerSpec],
    settings: CaptureSettings,
) -> None:
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
        f"Captured {summary.n_tokens:,} tokens (d_model {widths}, {settings.store_dtype}) from {where} into "
        f"{summary.n_shards_written} shard(s), {summary.bytes_written / 2**20:,.1f} MiB, in {summary.seconds:,.1f} s "
        f"({rate:,.0f} tokens/s after a {startup:,.1f} s start-up); {summary.n_empty} empty document(s) skipped. "
        f"Seconds by stage ({overlap}): {StageClock.describe(summary.timing)}. "
    )
    if final is not None:
        text += (
            f"Run {summary.run_id!r} is complete: {final['n_tokens']:,} tokens in {final['n_shards']} shards, "
            f"{final['bytes'] / 2**20:,.1f} MiB at {run.dir}; {run.store.root / 'run_id.txt'} points to it."
        )
    else:
        missing = run.read_meta()["n_shards"] - len(run.completed_shards())
        text += (
            f"Run {summary.run_id!r} at {run.dir} still misses {missing} shard(s) of other array tasks; "
            "it is marked complete when the last one finishes."
        )
    print(text, file=sys.stderr)
