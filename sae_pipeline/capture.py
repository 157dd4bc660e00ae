"""Step 1: capture one layer's activations of real tokens into an activation run, shard by shard, resumably.

Shard i holds documents [i * DOCS_PER_SHARD, (i + 1) * DOCS_PER_SHARD) of the (limited) split. Shards are the unit
of work: a rerun skips the ones on disk, an array task takes every N-th, a stop signal lets the current one finish.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from sae_pipeline.data import load_texts
from sae_pipeline.errors import PipelineError
from sae_pipeline.layers import hf_module_path, resolve_signature
from sae_pipeline.model import DTYPES, load_config, load_language_model, num_layers, resolve_device, resolve_dtype
from sae_pipeline.preemption import StopFlag, StopRequested
from sae_pipeline.settings import CaptureSettings
from sae_pipeline.store import ActivationRun, LayerSpec, Store, block_index, new_run_id, validate_run_id


class _StopForward(Exception):
    """Raised right after the hooked layer: nothing later in the model is needed."""


def _make_detector(signature: str, hook_side: str, store_dtype: torch.dtype):
    from mi_crow.hooks import Detector
    from mi_crow.hooks.hook import HookType
    from mi_crow.hooks.utils import extract_tensor_from_output

    class RealTokenCapture(Detector):
        """A mi_crow detector that keeps only the rows of real tokens, selected on the model's device.

        ``keep`` (a bool mask [batch, seq]) is set before each forward; the selected rows are cast to the storage
        dtype on the device, so only real tokens ever cross to the CPU.
        """

        def __init__(self) -> None:
            side = HookType.PRE_FORWARD if hook_side == "input" else HookType.FORWARD
            super().__init__(hook_type=side, hook_id="sae_pipeline_capture", layer_signature=signature)
            self.keep: torch.Tensor | None = None
            self.captured: torch.Tensor | None = None

        def process_activations(self, module, input, output) -> None:
            tensor = input[0] if self.hook_type == HookType.PRE_FORWARD else extract_tensor_from_output(output)
            self.captured = tensor[self.keep].to(store_dtype)

    return RealTokenCapture()


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


@dataclass
class CaptureSummary:
    run_id: str
    complete: bool
    n_tokens: int
    n_shards_written: int
    n_empty: int
    bytes_written: int
    seconds: float


class Capturer:
    """The model with the detector and the early stop attached; turns a list of documents into one shard."""

    def __init__(self, lm, signature: str, settings: CaptureSettings):
        self.lm = lm
        self.settings = settings
        self.device = next(lm.model.parameters()).device
        self.tokenizer = lm.tokenizer
        self.special_ids = torch.tensor(sorted(set(self.tokenizer.all_special_ids)), dtype=torch.long)
        self.detector = _make_detector(signature, settings.hook_side, DTYPES[settings.store_dtype])
        self.tokens_seen = 0
        lm.layers.register_hook(signature, self.detector)
        lm.layers.register_forward_hook_for_layer(signature, self._stop)

    @staticmethod
    def _stop(module, input, output):
        raise _StopForward

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor
    ) -> torch.Tensor:
        """One forward pass stopped after the hooked layer: the ``keep`` rows in the storage dtype, on the CPU.

        Position ids come from the mask, as in generation, so a left-padded document gets the positions it has
        alone; the rows are selected on the device, so only real tokens cross to the host.
        """
        self.detector.keep, self.detector.captured = keep.to(self.device), None
        with torch.inference_mode():
            try:
                self.lm.model(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=positions.to(self.device),
                    use_cache=False,
                )
            except _StopForward:
                pass
        captured = self.detector.captured
        if captured is None or captured.ndim != 2:
            raise PipelineError(
                f"the hook {self.detector.layer_signature!r} does not give one activation vector per "
                "token; choose another LAYER_SIGNATURE (discover_layers.py --all lists them)"
            )
        return captured.cpu()

    def prepends_bos(self) -> bool:
        """Whether the tokenizer starts every document with BOS (recorded for SAELens' ``prepend_bos``)."""
        bos = self.tokenizer.bos_token_id
        ids = self.tokenizer("probe")["input_ids"]
        return bos is not None and bool(ids) and ids[0] == bos

    def width(self) -> int:
        """d_model as the hook sees it (one short forward): measured, not read from a config that may not apply."""
        ids, mask = pad_batch(
            [self.tokenizer("probe")["input_ids"]], self.tokenizer.pad_token_id, self.tokenizer.padding_side == "left"
        )
        return int(self.forward(ids, mask, (mask.cumsum(1) - 1).clamp(min=0), mask.bool()).shape[-1])

    def shard(self, texts: list[str], doc_indices: list[int], progress: tqdm) -> tuple[torch.Tensor, torch.Tensor]:
        """Activations [n_real, d] and provenance (doc, position, token id) of the documents, in document order."""
        encoded = self.tokenizer(texts, truncation=True, max_length=self.settings.max_length)["input_ids"]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))  # similar lengths batch with less padding
        left = self.tokenizer.padding_side == "left"
        acts, provs = [], []
        bs = self.settings.batch_size_save
        for start in range(0, len(order), bs):
            rows = order[start : start + bs]
            ids, mask = pad_batch([encoded[i] for i in rows], self.tokenizer.pad_token_id, left)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            keep = keep_mask(ids, mask, self.special_ids, self.settings.keep_special_tokens)
            acts.append(self.forward(ids, mask, positions, keep))
            docs = torch.tensor([doc_indices[i] for i in rows], dtype=torch.int32)[:, None].expand_as(ids)
            provs.append(torch.stack([docs[keep], positions[keep].int(), ids[keep].int()], dim=1))
            self.tokens_seen += int(keep.sum())
            progress.update(len(rows))
            progress.set_postfix_str(
                f"{self.tokens_seen / max(progress.format_dict['elapsed'], 1e-9):,.0f} tok/s", refresh=False
            )
        activations, provenance = torch.cat(acts), torch.cat(provs)
        in_doc_order = torch.argsort(
            provenance[:, 0].long() * (self.settings.max_length + 1) + provenance[:, 1], stable=True
        )
        return activations[in_doc_order], provenance[in_doc_order]


def save_activations(
    settings: CaptureSettings, run_id: str | None = None, stop: StopFlag | None = None
) -> CaptureSummary:
    started = time.time()
    stop = stop or StopFlag().install()
    store = Store(settings.store_dir)
    store.ensure_writable()
    run_id = validate_run_id(run_id or settings.run_id or new_run_id("act"), "--run_id" if run_id else "RUN_ID")
    run = ActivationRun(store, run_id)
    if run.dir.exists() and not run.exists():
        raise PipelineError(f"{run.dir} exists but is not an activation run; choose another --run_id")
    if run.exists() and run.read_meta().get("kind") != "activations":
        raise PipelineError(f"run {run_id!r} is not an activation run; choose another --run_id")

    texts = load_texts(
        settings.hf_dataset,
        settings.data_split,
        settings.text_field,
        settings.data_limit,
        settings.data_shuffle,
        settings.seed,
    )
    config = load_config(settings.model_id)
    device = resolve_device(settings.device)
    model_dtype = resolve_dtype(settings.model_dtype, device, config)
    lm = load_language_model(settings.model_id, settings.store_dir, device, model_dtype)
    names = lm.layers.get_layer_names()
    if len(settings.layer_num) > 1 or (settings.layer_signature and len(settings.layer_signature) > 1):
        raise PipelineError("capturing several layers in one run is not supported yet; give one LAYER_NUM")
    layer_signature = settings.layer_signature[0] if settings.layer_signature else None
    signature = resolve_signature(names, settings.layer_num[0], layer_signature, num_layers(config))

    capturer = Capturer(lm, signature, settings)
    d_model = capturer.width()
    layer = LayerSpec(signature, d_model, hf_module_path(lm.model, signature), block_index(signature))
    manifest = ActivationRun.new_manifest(
        settings,
        run_id,
        [layer],
        model_dtype=str(model_dtype).removeprefix("torch."),
        n_documents=len(texts),
        n_layers=num_layers(config),
        special_token_ids=sorted(set(lm.tokenizer.all_special_ids)),
        prepend_bos=capturer.prepends_bos(),
    )
    if run.exists():
        old = run.read_meta()
        run.check_same_run(old, manifest)
        if old.get("status") == "complete":
            store.write_pointer(run_id)
            print(
                f"run {run_id!r} is already complete ({old['n_tokens']:,} tokens); nothing to do. "
                f"Start a new capture with another --run_id.",
                file=sys.stderr,
            )
            return CaptureSummary(run_id, True, old["n_tokens"], 0, 0, 0, time.time() - started)
    else:
        run.write_meta(manifest)

    mine = range(manifest["n_shards"])
    if settings.capture_task_id is not None:
        mine = range(settings.capture_task_id, manifest["n_shards"], settings.capture_task_count)
    done = run.completed_shards()
    todo = [i for i in mine if i not in done]
    run.remove_stale_temporaries(set(mine))
    if len(todo) < len(mine):
        print(
            f"resuming run {run_id!r}: {len(mine) - len(todo)} of {len(mine)} shards already on disk", file=sys.stderr
        )

    per = settings.docs_per_shard
    n_docs_todo = sum(min(per, len(texts) - i * per) for i in todo)
    written = n_tokens = n_empty = size = 0
    with tqdm(
        total=n_docs_todo,
        unit="doc",
        desc=f"capture {signature}",
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 30,
    ) as progress:
        for index in todo:
            rows = texts[index * per : (index + 1) * per][settings.text_field]
            docs = [(index * per + j, t) for j, t in enumerate(rows) if isinstance(t, str) and t.strip()]
            shard_empty = len(rows) - len(docs)
            progress.update(shard_empty)
            acts, prov = (
                capturer.shard([t for _, t in docs], [d for d, _ in docs], progress)
                if docs
                else (torch.empty(0, d_model, dtype=DTYPES[settings.store_dtype]), torch.empty(0, 3, dtype=torch.int32))
            )
            info = {
                "index": index,
                "doc_start": index * per,
                "doc_stop": index * per + len(rows),
                "n_tokens": int(acts.shape[0]),
                "n_empty": shard_empty,
            }
            size += run.write_shard(index, signature, acts, prov, info)
            written, n_tokens, n_empty = written + 1, n_tokens + int(acts.shape[0]), n_empty + shard_empty
            if stop.requested and index != todo[-1]:
                raise StopRequested(
                    f"{stop.signal_name} received: saved {written} shard(s) of run {run_id!r}; "
                    f"rerun with --run_id {run_id} to continue"
                )

    final = run.finalize_if_complete()
    summary = CaptureSummary(run_id, final is not None, n_tokens, written, n_empty, size, time.time() - started)
    _print_summary(summary, run, final, signature, d_model, settings)
    return summary


def _print_summary(
    summary: CaptureSummary,
    run: ActivationRun,
    final: dict[str, Any] | None,
    signature: str,
    d_model: int,
    settings: CaptureSettings,
) -> None:
    rate = summary.n_tokens / summary.seconds if summary.seconds > 0 else 0.0
    text = (
        f"Captured {summary.n_tokens:,} tokens (d_model {d_model}, {settings.store_dtype}) from {signature} into "
        f"{summary.n_shards_written} shard(s), {summary.bytes_written / 2**20:,.1f} MiB, in "
        f"{summary.seconds:,.1f} s ({rate:,.0f} tokens/s); {summary.n_empty} empty document(s) skipped. "
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
