"""The SAE: mi_crow's ``TopKSae`` plus what it lacks (a decoder bias, BatchTopK), saved so mi_crow still loads it.

mi_crow's TopK SAE runs an overcomplete ``TopKSAE`` engine: ``codes = topk(relu(x @ W_enc.T + b_enc))`` and
``x_hat = codes @ W_dec``; there is no decoder bias. Ours keeps that engine class (same parameters, same state_dict
keys) and adds, in a subclass of the engine:

* ``b_dec`` [d_in]: subtracted from x before encoding and added after decoding (Gao et al. 2024, SAELens, sparsify);
* ``architecture="batchtopk"``: in training the k x batch largest activations of the whole batch are kept; a
  threshold (an exponential moving average of the smallest kept activation) replaces the selection at inference;
  ``"matryoshka_batchtopk"`` selects the same way (its nested-prefix loss: ``sae/architectures.py``);
* ``architecture="jumprelu"``: a learned threshold per latent (``jump_threshold``) and the kernel ``bandwidth`` of
  its straight-through estimator (``sae/architectures.py``);
* the decoder rows ``dictionary._weights`` are kept at unit norm by the trainer, so the overcomplete dictionary's
  own normalisation is a no-op and the raw rows are the decoder.

mi_crow's hooks (``modify_activations``) call ``sae_engine.encode`` / ``decode``, so a ``PipelineSae`` attached
to a language model applies b_dec and the threshold too.

``model.pt`` format (the choice that keeps b_dec visible to mi_crow users). The file is mi_crow's own payload,
``{"sae_state_dict", "mi_crow_metadata"}`` with ``k`` and ``device="cpu"``, so ``mi_crow``'s plain
``TopKSae.load(path)`` opens it on any machine. Its encoder bias is *folded*: ``b_enc - W_enc @ b_dec``, so the
plain loader computes exactly our pre-activations and codes (for TopK; for BatchTopK it uses per-token top-k
instead of the threshold). The plain loader's reconstruction lacks the decoder bias: add
``payload["pipeline_sae"]["b_dec"]`` (also in ``saelens/sae_weights.safetensors``) to its output. The extra key
``pipeline_sae`` = ``{"format", "architecture", "k", "b_dec", "threshold"}`` is ignored by mi_crow and read back
by ``PipelineSae.load``, which unfolds the bias. It also holds ``matryoshka_widths`` and, for JumpReLU,
``thresholds`` [n_latents] and ``bandwidth``, and ``mi_crow_topksae``: what mi_crow's plain loader computes from the
file. A JumpReLU SAE cannot be represented by mi_crow's TopKSae (it has no per-latent thresholds): the plain loader
opens the file but computes per-token top-k codes with k = TOP_K, not the SAE's; use ``PipelineSae.load``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from mi_crow.mechanistic.sae.modules.topk_sae import TopKSae
from overcomplete import TopKSAE as OvercompleteTopKSAE
from torch import nn

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.sae.architectures import (
    ARCHITECTURES,
    THRESHOLD_SAMPLE_TOKENS,
    JumpReLU,
    check_matryoshka_widths,
    default_matryoshka_widths,
    initial_thresholds,
)
from sae_pipeline.store.files import atomic_torch_save, load_torch_file

FORMAT = 1
MI_CROW_TOPKSAE = {  # what mi_crow's plain TopKSae.load computes from our model.pt, per architecture
    "topk": "the SAE's codes (add b_dec to its reconstruction)",
    "batchtopk": "per-token top-k codes instead of the learned threshold (add b_dec to its reconstruction)",
    "matryoshka_batchtopk": "per-token top-k codes instead of the learned threshold (add b_dec to its reconstruction)",
    "jumprelu": "not representable: mi_crow's TopKSae has no per-latent thresholds; it computes per-token top-k "
    "codes with k = TOP_K, not this SAE's; load with sae_pipeline.sae.model.PipelineSae.load",
}
THRESHOLD_EMA = 0.01  # SAELens' BatchTopK threshold learning rate
# state_dict keys of mi_crow's plain engine (overcomplete TopKSAE with the "linear" encoder)
W_ENC_KEY = "encoder.final_block.0.weight"
B_ENC_KEY = "encoder.final_block.0.bias"
W_DEC_KEY = "dictionary._weights"
MULTIPLIER_KEY = "dictionary.multiplier"


class BiasedTopKEngine(OvercompleteTopKSAE):
    """overcomplete's TopKSAE with a decoder bias and the BatchTopK, Matryoshka and JumpReLU selections."""

    def __init__(
        self,
        n_inputs: int,
        n_latents: int,
        k: int,
        architecture: str = "topk",
        device: str = "cpu",
        matryoshka_widths: tuple[int, ...] | None = None,
    ):
        if architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
        super().__init__(input_shape=n_inputs, nb_concepts=n_latents, top_k=k, device=device)
        self.architecture = architecture
        self.b_dec = nn.Parameter(torch.zeros(n_inputs, device=device))
        # BatchTopK inference threshold; negative = not estimated yet (per-token top-k is used meanwhile)
        self.register_buffer("threshold", torch.tensor(-1.0, device=device))
        self.matryoshka_widths: tuple[int, ...] = ()
        if architecture == "matryoshka_batchtopk":
            self.matryoshka_widths = tuple(matryoshka_widths or default_matryoshka_widths(n_latents))
            check_matryoshka_widths(self.matryoshka_widths, n_latents)
        if architecture == "jumprelu":
            self.jump_threshold = nn.Parameter(torch.zeros(n_latents, device=device))
            self.register_buffer("bandwidth", torch.tensor(1.0, device=device))

    @property
    def W_enc(self) -> nn.Parameter:  # [n_latents, d_in], nn.Linear layout
        return self.encoder.final_block[0].weight

    @property
    def b_enc(self) -> nn.Parameter:  # [n_latents]
        return self.encoder.final_block[0].bias

    @property
    def W_dec(self) -> nn.Parameter:  # [n_latents, d_in], rows kept at unit norm by the trainer
        return self.dictionary._weights

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """(x − b_dec) W_encᵀ + b_enc. Centring first keeps bf16 rounding relative to ‖x − b_dec‖, not to the
        activations' (often much larger) mean; the zero-valued second term gives b_dec its gradient −W_encᵀ·1
        without a [batch, n_latents] x [n_latents, d] matmul for the input's gradient."""
        b_dec = self.b_dec.detach()
        return F.linear(x - b_dec, self.W_enc, self.b_enc) - self.W_enc @ (self.b_dec - b_dec)

    def select(self, pre: torch.Tensor) -> torch.Tensor:
        """Sparse codes from pre-activations: ReLU then TopK per token, BatchTopK over the batch, or JumpReLU (in
        float32, so training, evaluation and the exports compare with the same thresholds)."""
        if self.architecture == "jumprelu":
            if self.training:
                return JumpReLU.apply(pre.float(), self.jump_threshold, self.bandwidth)
            return pre.float() * (pre.float() > self.jump_threshold)
        acts = F.relu(pre)
        if self.architecture == "topk" or (not self.training and self.threshold < 0):
            top = acts.topk(self.top_k, dim=-1, sorted=False)
            return torch.zeros_like(acts).scatter_(-1, top.indices, top.values)
        if not self.training:
            return acts * (acts > self.threshold)
        flat = acts.flatten()
        top = flat.topk(min(self.top_k * acts.shape[0], flat.numel()), sorted=False)
        codes = torch.zeros_like(flat).scatter_(-1, top.indices, top.values).view_as(acts)
        with torch.no_grad():
            kept = top.values[top.values > 0]
            if kept.numel():
                low = kept.min().float()
                new = low if self.threshold < 0 else torch.lerp(self.threshold, low, THRESHOLD_EMA)
                self.threshold.copy_(new)
        return codes

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = self.pre_acts(x)
        return pre, self.select(pre)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pre-activations, codes, reconstruction); TopK decodes sparsely (k rows per token, not all latents)."""
        pre = self.pre_acts(x)
        if self.architecture != "topk":
            z = self.select(pre)
            return pre, z, self.decode(z)
        top = F.relu(pre).topk(self.top_k, dim=-1, sorted=False)
        z = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        x_hat = (
            F.embedding_bag(top.indices, self.W_dec.to(top.values.dtype), per_sample_weights=top.values, mode="sum")
            + self.b_dec
        )
        return pre, z, x_hat

    @torch.no_grad()
    def initialize(self, b_dec: torch.Tensor, seed: int) -> None:
        """Random unit-norm decoder, encoder = decoder transpose, zero encoder bias, b_dec from the data."""
        gen = torch.Generator().manual_seed(seed)
        w = torch.randn(self.W_dec.shape, generator=gen)
        w /= w.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w)
        self.W_enc.copy_(w)  # nn.Linear stores W_enc as [n_latents, d_in]: the same layout as the decoder rows
        self.b_enc.zero_()
        self.b_dec.copy_(b_dec)
        self.threshold.fill_(-1.0)

    @torch.no_grad()
    def initialize_thresholds(self, sample: torch.Tensor, bandwidth: float) -> None:
        """JumpReLU: thresholds at which each latent fires on k/n of the sample's tokens (L0 ≈ k from the start),
        and the kernel bandwidth in units of the sample's per-dimension RMS about b_dec, SAELens' units."""
        x = sample[:THRESHOLD_SAMPLE_TOKENS].float()
        self.jump_threshold.copy_(initial_thresholds(self.pre_acts(x), self.top_k))
        rms = (x - self.b_dec).pow(2).mean().sqrt()
        self.bandwidth.fill_(bandwidth * float(rms))

    @torch.no_grad()
    def clamp_thresholds(self) -> None:
        """JumpReLU thresholds stay non-negative (below zero the gate would pass negative pre-activations)."""
        if self.architecture == "jumprelu":
            self.jump_threshold.clamp_(min=0.0)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Unit-norm decoder rows, so latent activations carry the scale (Gao et al.; sparsify)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the gradient component that would only change decoder norms (undone by normalisation anyway)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)


class PipelineSae(TopKSae):
    """mi_crow's TopKSae with a decoder bias and the other architectures; usable wherever mi_crow expects a TopKSae
    (JumpReLU: our hooks compute its codes, mi_crow's file loader cannot; module doc)."""

    def __init__(
        self,
        n_latents: int,
        n_inputs: int,
        k: int,
        architecture: str = "topk",
        device: str = "cpu",
        hook_id: str | None = None,
        store: Any = None,
        matryoshka_widths: tuple[int, ...] | None = None,
    ):
        # read by _initialize_sae_engine during super().__init__
        self._k, self._architecture, self._matryoshka_widths = k, architecture, matryoshka_widths
        super().__init__(n_latents, n_inputs, hook_id=hook_id, device=device, store=store)
        self.k = k  # mi_crow's trainer/savers look for ``sae.k``

    def _initialize_sae_engine(self, k: int | None = None) -> BiasedTopKEngine:
        if k is not None:
            self._k = self.k = k
        return BiasedTopKEngine(
            self.context.n_inputs,
            self.context.n_latents,
            self._k,
            self._architecture,
            device=self.context.device,
            matryoshka_widths=self._matryoshka_widths,
        )

    @property
    def architecture(self) -> str:
        return self._architecture

    def mi_crow_payload(self) -> dict[str, Any]:
        """The model.pt payload: mi_crow's format with the encoder bias folded, plus our extras (module doc)."""
        eng = self.sae_engine
        w_enc = eng.W_enc.detach().float().cpu()
        b_dec = eng.b_dec.detach().float().cpu()
        folded = (eng.b_enc.detach().double().cpu() - w_enc.double() @ b_dec.double()).float()
        w_dec = eng.W_dec.detach().float().cpu()
        w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        state = {
            W_ENC_KEY: w_enc.clone(),
            B_ENC_KEY: folded,
            W_DEC_KEY: w_dec,
            MULTIPLIER_KEY: eng.dictionary.multiplier.detach().float().cpu().clone(),
        }
        return {
            "sae_state_dict": state,
            "mi_crow_metadata": {
                "concepts_state": {
                    "multiplication": self.concepts.multiplication.detach().cpu(),
                    "bias": self.concepts.bias.detach().cpu(),
                },
                "n_latents": self.context.n_latents,
                "n_inputs": self.context.n_inputs,
                "k": self._k,
                "device": "cpu",  # mi_crow builds the engine on this device: cpu loads everywhere
                "layer_signature": self.context.lm_layer_signature,
                "model_id": self.context.model_id,
            },
            "pipeline_sae": {
                "format": FORMAT,
                "architecture": self._architecture,
                "k": self._k,
                "b_dec": b_dec.clone(),
                "threshold": float(eng.threshold),
                "matryoshka_widths": list(eng.matryoshka_widths) or None,
                **self._jumprelu_payload(),
                "mi_crow_topksae": MI_CROW_TOPKSAE[self._architecture],
            },
        }

    def _jumprelu_payload(self) -> dict[str, Any]:
        eng = self.sae_engine
        if self._architecture != "jumprelu":
            return {}
        return {"thresholds": eng.jump_threshold.detach().float().cpu().clone(), "bandwidth": float(eng.bandwidth)}

    def save(self, name: str, path: str | Path | None = None, k: int | None = None) -> Path:
        """Write ``<path>/<name>.pt`` atomically (mi_crow's signature; ``k`` must match ours if given)."""
        if k is not None and k != self._k:
            raise ValueError(f"k={k} differs from this SAE's k={self._k}")
        target = Path(path if path is not None else Path.cwd()) / f"{name}.pt"
        atomic_torch_save(self.mi_crow_payload(), target)
        return target

    @staticmethod
    def load(path: Path, device: str | torch.device = "cpu") -> PipelineSae:
        """Load our model.pt (or a plain mi_crow TopKSae file, then b_dec = 0)."""
        payload = load_torch_file(Path(path))
        try:
            meta, state = payload["mi_crow_metadata"], payload["sae_state_dict"]
            extra = payload.get("pipeline_sae", {})
            k = int(extra.get("k", meta["k"]))
            widths = extra.get("matryoshka_widths")
            sae = PipelineSae(
                int(meta["n_latents"]),
                int(meta["n_inputs"]),
                k,
                architecture=extra.get("architecture", "topk"),
                matryoshka_widths=tuple(widths) if widths else None,
            )
            b_dec = extra.get("b_dec", torch.zeros(int(meta["n_inputs"]))).float()
            eng = sae.sae_engine
            with torch.no_grad():
                eng.W_enc.copy_(state[W_ENC_KEY])
                eng.b_enc.copy_((state[B_ENC_KEY].double() + state[W_ENC_KEY].double() @ b_dec.double()).float())
                eng.W_dec.copy_(state[W_DEC_KEY])
                eng.dictionary.multiplier.copy_(state[MULTIPLIER_KEY])
                eng.b_dec.copy_(b_dec)
                eng.threshold.fill_(float(extra.get("threshold", -1.0)))
                if sae.architecture == "jumprelu":
                    eng.jump_threshold.copy_(extra["thresholds"])
                    eng.bandwidth.fill_(float(extra["bandwidth"]))
            concepts = meta.get("concepts_state") or {}
            if "multiplication" in concepts:
                sae.concepts.multiplication.data = concepts["multiplication"].float()
            if "bias" in concepts:
                sae.concepts.bias.data = concepts["bias"].float()
        except (KeyError, TypeError, RuntimeError, ValueError) as exc:
            raise PipelineError(f"{path} is not a TopK SAE model file ({type(exc).__name__}: {exc})") from None
        sae.context.lm_layer_signature = meta.get("layer_signature")
        sae.context.model_id = meta.get("model_id")
        sae.to_device(device)
        return sae

    def to_device(self, device: str | torch.device) -> PipelineSae:
        self.sae_engine.to(device)
        self.context.device = str(device)
        return self
