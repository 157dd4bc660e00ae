"""The model with one mi_crow detector per hooked layer and a stop after the deepest: one forward per batch puts
every layer's stored rows into the shard's buffers, in document order."""

from __future__ import annotations

import itertools
import time

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.batches import Batch
from sae_pipeline.lm.layers import LayerSpec, block_index, hf_module_path
from sae_pipeline.lm.loading import DTYPES
from sae_pipeline.lm.tokens import pad_batch, positions_of, special_ids_of
from sae_pipeline.settings import CaptureSettings


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
        self.special_ids = special_ids_of(self.tokenizer)
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
        self._forward(ids, mask, positions_of(mask), lambda sig, flat: widths.update({sig: flat.shape[1]}))
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
