"""First-letter feature absorption (Chanin et al. 2024, "A is for Absorption"), as SAEBench's absorption eval
(``sae_bench/evals/absorption``) defines it, with its default thresholds:

1. a linear probe per letter (one against the rest) on the model's activations of the training words;
2. per letter, the SAE's main latents by k-sparse probing: an L1-penalised probe on the SAE codes ranks the latents,
   a logistic probe on the top k of them is fitted for k = 1..10, and k grows while the test F1 rises by at least
   0.03 (SAEBench's feature splitting);
3. per probe-positive test word of the letter (the probe's score > 0), the absorption fraction: the probe
   projection of the activation that the main latents do not carry and up to 3 other latents do (each with decoder
   cosine to the probe ≥ 0.1, together at least 0.4 of the projection); 1 when the main latents do not fire at all;
4. per letter the mean over its probe-positive words; the score is the mean over the letters whose probe has a test
   F1 above 0.6, reported only when at least 20 letters qualify (otherwise null with the reason).

"Full absorption" (SAEBench's second number): the main latents are silent and the single top-projecting latent has
cosine ≥ 0.025 with the probe and carries at least 0.4 of the projection.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from sae_pipeline.lm.spelling import CONTEXT_EXAMPLES, Words, context_ids, split_words, word_activations

PROBE = {"epochs": 50, "lr": 0.01, "end_lr": 1e-5, "weight_decay": 1e-6}  # SAEBench's train_multi_probe
PROBE_BATCH = 64  # SAEBench's for the activation probe; also for the L1 probe on codes (SAEBench: 4096, but it has
# ten times more words, so this keeps a similar number of steps)
L1_DECAY = 0.01
MAX_K = 10
F1_JUMP = 0.03
MIN_PROBE_F1 = 0.6
MIN_LETTERS = 20
ABSORBER_COSINE = 0.1
PROJECTION_SHARE = 0.4
MAX_ABSORBERS = 3
FULL_ABSORPTION_COSINE = 0.025
EPS = 1e-8
WORD_BATCH = 256  # words per forward, one token each after the shared prefix
THRESHOLDS = {
    "k_sparse_max_k": MAX_K,
    "f1_jump": F1_JUMP,
    "min_probe_f1": MIN_PROBE_F1,
    "min_letters": MIN_LETTERS,
    "absorber_cosine": ABSORBER_COSINE,
    "projection_share": PROJECTION_SHARE,
    "max_absorbers": MAX_ABSORBERS,
    "full_absorption_cosine": FULL_ABSORPTION_COSINE,
}


@dataclass(frozen=True)
class Probed:
    """One split's words as the probes see them: activations [n, d] and first-letter classes [n]."""

    acts: torch.Tensor
    letters: torch.Tensor

    @classmethod
    def of(cls, words: Words, acts: torch.Tensor) -> Probed:
        return cls(acts.float(), words.letters)


@dataclass(frozen=True)
class LetterProbe:
    """One-against-the-rest linear probes [n_letters, d] and their F1 on the test words."""

    weight: torch.Tensor
    bias: torch.Tensor
    test_f1: torch.Tensor

    def scores(self, acts: torch.Tensor) -> torch.Tensor:
        return acts @ self.weight.T + self.bias


def train_linear_probes(
    x: torch.Tensor, targets: torch.Tensor, batch_size: int, l1: float = 0.0, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAEBench's multi-probe: BCE with positive weights (negatives / positives per output), Adam, the LR decaying
    exponentially per epoch, optionally an L1 penalty on the weights; zero-initialised (SAEBench: PyTorch's random
    init), so a latent's rank never depends on its random start."""
    gen = torch.Generator().manual_seed(seed)  # the batches' shuffle, the only randomness
    probe = torch.nn.Linear(x.shape[1], targets.shape[1])
    torch.nn.init.zeros_(probe.weight)  # a latent that never fires keeps weight 0, so it is never ranked by chance
    torch.nn.init.zeros_(probe.bias)
    pos = targets.sum(0)
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=(len(targets) - pos) / pos.clamp(min=1))
    opt = torch.optim.Adam(probe.parameters(), lr=PROBE["lr"], weight_decay=PROBE["weight_decay"])
    gamma = math.exp(math.log(PROBE["end_lr"] / PROBE["lr"]) / PROBE["epochs"])
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, gamma)
    for _ in range(PROBE["epochs"]):
        for rows in torch.randperm(len(x), generator=gen).split(batch_size):
            loss = loss_fn(probe(x[rows]), targets[rows]) + l1 * probe.weight.abs().sum(-1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    return probe.weight.detach(), probe.bias.detach()


def one_hot(letters: torch.Tensor, n_letters: int) -> torch.Tensor:
    return F.one_hot(letters, n_letters).float()


def f1_scores(predicted: torch.Tensor, actual: torch.Tensor) -> torch.Tensor:
    """F1 per column of boolean [n, c] predictions against boolean [n, c] truth (0 where undefined)."""
    tp = (predicted & actual).sum(0).float()
    return 2 * tp / (predicted.sum(0) + actual.sum(0)).clamp(min=1)


def fit_letter_probe(train: Probed, test: Probed, n_letters: int, seed: int = 0) -> LetterProbe:
    """Step 1 of the module docstring: the probes on the model's activations, once per layer."""
    weight, bias = train_linear_probes(train.acts, one_hot(train.letters, n_letters), PROBE_BATCH, seed=seed)
    probe = LetterProbe(weight, bias, torch.zeros(n_letters))
    f1 = f1_scores(probe.scores(test.acts) > 0, one_hot(test.letters, n_letters).bool())
    return LetterProbe(weight, bias, f1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's ``LogisticRegression(class_weight="balanced")`` (L2, C = 1), fitted with L-BFGS."""
    w = torch.zeros(x.shape[1], requires_grad=True)
    b = torch.zeros((), requires_grad=True)
    pos = y.sum().clamp(min=1)
    sample_weight = torch.where(y > 0, len(y) / (2 * pos), len(y) / (2 * (len(y) - pos).clamp(min=1)))
    opt = torch.optim.LBFGS([w, b], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        bce = F.binary_cross_entropy_with_logits(x @ w + b, y, reduction="none")
        loss = ((sample_weight * bce).sum() + 0.5 * w.square().sum()) / len(y)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def main_latents(ranking: torch.Tensor, train_codes, train_y, test_codes, test_y) -> list[int]:
    """Step 2 for one letter: the top-k latents of ``ranking`` (the L1 probe's weights) for the largest k reached
    while each k's logistic probe raises the test F1 by at least F1_JUMP."""
    best, chosen = -100.0, []
    for k in range(1, min(MAX_K, len(ranking)) + 1):
        feats = ranking.topk(k).indices
        w, b = fit_logistic(train_codes[:, feats], train_y)
        predicted = (test_codes[:, feats] @ w + b > 0)[:, None]
        f1 = float(f1_scores(predicted, test_y.bool()[:, None])[0])
        if f1 <= best + F1_JUMP:
            break
        best, chosen = f1, feats.tolist()
    return chosen


def absorption_fractions(
    acts: torch.Tensor, codes: torch.Tensor, direction: torch.Tensor, w_dec: torch.Tensor, main: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3 for the probe-positive words of one letter: [n] absorption fractions and [n] full-absorption flags."""
    direction = direction / direction.norm()
    cos = F.cosine_similarity(direction[None], w_dec, dim=-1)
    proj = codes * cos  # each latent's share of the probe projection
    total = acts @ direction
    is_main = torch.zeros(len(cos), dtype=torch.bool)
    is_main[main] = True
    main_proj = proj[:, is_main].sum(-1)
    absorbers = torch.where(~is_main & (cos >= ABSORBER_COSINE) & (proj > 0), proj, torch.zeros(()))
    absorbed = absorbers.topk(min(MAX_ABSORBERS, absorbers.shape[1]), dim=-1).values.sum(-1)
    partial = torch.minimum(absorbed, total - main_proj)
    fraction = torch.where(main_proj <= 0, 1.0, (partial / (partial + main_proj)).clamp(0, 1))
    none = (main_proj >= total) | (absorbed / total < PROJECTION_SHARE)
    fraction = torch.where(none, 0.0, fraction)
    top = proj.max(-1)
    silent = (codes[:, is_main] < EPS).all(-1)
    full = silent & (cos[top.indices] >= FULL_ABSORPTION_COSINE) & (total >= 0)
    full &= top.values / total >= PROJECTION_SHARE
    return fraction, full


def encode_all(encode: Callable[[torch.Tensor], torch.Tensor], acts: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([encode(part).float().cpu() for part in acts.split(batch)])


def measure_absorption(
    train: Probed,
    test: Probed,
    probe: LetterProbe,
    encode: Callable[[torch.Tensor], torch.Tensor],
    w_dec: torch.Tensor,
    alphabet: str,
) -> dict[str, Any]:
    """Steps 2 to 4 for one SAE: ``encode`` maps activations to codes, ``w_dec`` [n_latents, d] its decoder."""
    n_letters = len(alphabet)
    train_codes, test_codes = encode_all(encode, train.acts), encode_all(encode, test.acts)
    l1_weight, _ = train_linear_probes(train_codes, one_hot(train.letters, n_letters), PROBE_BATCH, l1=L1_DECAY)
    positive = probe.scores(test.acts) > 0
    letters = []
    for c, letter in enumerate(alphabet):
        train_y, test_y = (train.letters == c).float(), (test.letters == c).float()
        if train_y.sum() == 0 or test_y.sum() == 0:
            continue
        main = main_latents(l1_weight[c], train_codes, train_y, test_codes, test_y)
        rows = positive[:, c] & (test.letters == c)
        fraction, full = absorption_fractions(test.acts[rows], test_codes[rows], probe.weight[c], w_dec.cpu(), main)
        letters.append(letter_entry(letter, float(probe.test_f1[c]), main, fraction, full))
    return absorption_summary(letters) | {"letters": letters}


def letter_entry(letter: str, f1: float, main: list[int], fraction: torch.Tensor, full: torch.Tensor) -> dict:
    n = len(fraction)
    return {
        "letter": letter,
        "probe_f1": round(f1, 4),
        "main_latents": main,
        "probe_true_positives": n,
        "mean_absorption_fraction": float(fraction.mean()) if n else None,
        "full_absorption_rate": float(full.float().mean()) if n else None,
    }


def absorption_summary(letters: list[dict]) -> dict[str, Any]:
    """Step 4: the mean over the letters the model's probe knows, or null with the reason."""
    usable = [e for e in letters if e["probe_f1"] > MIN_PROBE_F1 and e["probe_true_positives"] > 0]
    summary = {"letters_evaluated": len(usable), "thresholds": THRESHOLDS}
    if len(usable) < MIN_LETTERS:
        reason = (
            f"only {len(usable)} letters have a probe with test F1 above {MIN_PROBE_F1} (at least {MIN_LETTERS} "
            "needed, as SAEBench): the model does not represent first letters linearly enough at this layer"
        )
        return summary | {"absorption_fraction": None, "full_absorption_rate": None, "reason": reason}
    mean = lambda key: sum(e[key] for e in usable) / len(usable)  # noqa: E731
    return summary | {
        "absorption_fraction": mean("mean_absorption_fraction"),
        "full_absorption_rate": mean("full_absorption_rate"),
        "mean_main_latents": mean_len(usable),
        "reason": None,
    }


def mean_len(entries: list[dict]) -> float:
    return sum(len(e["main_latents"]) for e in entries) / len(entries)


@dataclass(frozen=True)
class SpellingProbe:
    """What the SAEs of one layer share: the words' activations and the letter probes (step 1), built once."""

    train: Probed
    test: Probed
    probe: LetterProbe
    alphabet: str
    words: dict[str, Any]

    @classmethod
    def build(cls, lm, layer: str, hook_side: str, device: torch.device, alphabet: str, n_words: int, seed: int):
        train_words, test_words = split_words(lm.tokenizer, alphabet, n_words, seed)
        prefix = context_ids(lm.tokenizer, train_words.words[:CONTEXT_EXAMPLES])

        def probed(words: Words) -> Probed:
            acts = word_activations(lm, layer, hook_side, prefix, words.token_ids, device, WORD_BATCH)
            return Probed.of(words, acts)

        train, test = probed(train_words), probed(test_words)
        probe = fit_letter_probe(train, test, len(alphabet), seed)
        words = {"train": len(train_words.words), "test": len(test_words.words), "context_tokens": len(prefix) + 1}
        return cls(train, test, probe, alphabet, words | {"alphabet": alphabet})

    def measure(self, engine: torch.nn.Module) -> dict[str, Any]:
        """Steps 2 to 4 for one SAE engine (``encode(x) -> (pre, codes)``, ``W_dec``)."""
        device = engine.W_dec.device

        def encode(x: torch.Tensor) -> torch.Tensor:
            return engine.encode(x.to(device))[1]

        w_dec = engine.W_dec.detach().float().cpu()
        return measure_absorption(self.train, self.test, self.probe, encode, w_dec, self.alphabet) | {
            "words": self.words
        }
