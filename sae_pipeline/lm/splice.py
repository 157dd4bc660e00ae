"""The splice: an SAE's reconstruction (or an ablation) put in place of a layer's activations during a forward, at
exactly the positions capture stores. Evaluation's CE-loss and KL passes run through it."""

from __future__ import annotations

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.tokens import pad_batch
from sae_pipeline.sae.metrics import ReconstructionStats


def make_splice(
    signature: str,
    hook_side: str,
    saes: torch.nn.Module | dict[str, torch.nn.Module],
    mean: torch.Tensor | None = None,
):
    """A mi_crow Controller on ``signature`` that, per mode, replaces the ``keep`` positions of the batch tensor.

    Modes: ``off`` (clean; the hook returns at once), ``zero``, ``mean``, or the name of one of ``saes`` (a bare
    engine is named ``sae``): ``engine(x) -> (pre, z, x_hat)`` on the kept rows, one call per batch; the rows it saw
    and their reconstruction update ``stats[name]`` when set. Set ``keep`` before each forward. Outputs are replaced
    in place (as mi_crow does); inputs are replaced in a copy, because a module's input is often also the residual
    stream it is added back to.
    """
    from mi_crow.hooks import Controller
    from mi_crow.hooks.hook import HookType

    class SaeSplice(Controller):
        def __init__(self) -> None:
            side = HookType.PRE_FORWARD if hook_side == "input" else HookType.FORWARD
            super().__init__(hook_type=side, hook_id="sae_pipeline_splice", layer_signature=signature)
            self.saes = saes if isinstance(saes, dict) else {"sae": saes}
            self.mean = mean
            self.mode = "off"
            self.keep: torch.Tensor | None = None
            self.stats: dict[str, ReconstructionStats] = {}
            self.calls = 0
            self.width: int | None = None

        def modify_activations(self, module, inputs, output):
            tensor = inputs if self.hook_type == HookType.PRE_FORWARD else output
            self.calls += 1
            self.width = int(tensor.shape[-1])
            if self.mode == "off":
                return None
            new = self.replacement(tensor)
            if self.hook_type == HookType.PRE_FORWARD:
                out = tensor.clone()
                out[self.keep] = new
                return out
            tensor[self.keep] = new
            return None

        def replacement(self, tensor: torch.Tensor) -> torch.Tensor:
            """What the kept positions become in this mode."""
            if self.mode == "zero":
                return torch.zeros((), dtype=tensor.dtype, device=tensor.device)
            if self.mode == "mean":
                return self.mean.to(device=tensor.device, dtype=tensor.dtype)
            if self.mode not in self.saes:
                raise ValueError(f"unknown splice mode {self.mode!r}")
            x = tensor[self.keep].float()
            _, z, x_hat = self.saes[self.mode](x)
            if self.mode in self.stats:
                self.stats[self.mode].update(x, x_hat.float(), z.float())
            return x_hat.to(tensor.dtype)

    return SaeSplice()


def probe_width(model, tokenizer, splice, device: torch.device) -> int:
    """The width the hook actually sees (one short clean forward)."""
    ids, mask = pad_batch([tokenizer("probe")["input_ids"]], tokenizer.pad_token_id, tokenizer.padding_side == "left")
    splice.mode, splice.width = "off", None
    with torch.inference_mode():
        model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
    if splice.width is None:
        raise PipelineError(f"the hook {splice.layer_signature!r} did not fire during the forward pass")
    return splice.width
