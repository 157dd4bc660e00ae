"""The explainer and scorer models: any local instruct model with a chat template, answering greedily.

EXPLAINER_MODEL (and SCORER_MODEL) is a hub id, a model folder or a ``.gguf`` file, read like MODEL_ID
(``lm/loading.py``). Explanations are transformers' ``generate``, greedy (delphi's default temperature 0); scorer
answers are greedy too, constrained to delphi's answer format (``classify``). The same prompts give the same
answers, which a resumed step 4 relies on. On a CPU each chat continues a cached copy of the prefix it shares with
the others; on a GPU chats go in batches, padded on the left.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.interpret.prompts import Messages
from sae_pipeline.lm import hub

CACHED_PREFIXES = 4  # the explainer's, detection's and fuzzing's prompts each share one
ANSWER_TOKENS = ("[", ",", "0", "1")  # delphi's scorer answers: "[1,0,0,1,0]"


def _named(exc: PipelineError, variable: str) -> PipelineError:
    """``lm/loading``'s messages name MODEL_ID; here the variable is EXPLAINER_MODEL or SCORER_MODEL."""
    return PipelineError(str(exc).replace("MODEL_ID", variable))


def load_tokenizer(model_id: str, variable: str):
    """The model's tokenizer, checked to have a chat template (an instruct model), before any weight is read."""
    from transformers import AutoTokenizer

    from sae_pipeline.lm.loading import check_model_id, model_source

    try:
        check_model_id(model_id)
    except PipelineError as exc:
        raise _named(exc, variable) from None
    source, extra = model_source(model_id)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if hub.is_offline() and not source.startswith(("/", ".")):
            raise PipelineError(
                hub.not_cached(variable, model_id, "model", "a local model folder or .gguf file")
            ) from None
        raise PipelineError(f"{variable}={model_id!r} could not be loaded: {first}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise PipelineError(
            f"{variable}={model_id!r} has no chat template: the explainer and scorer must be instruct (chat) "
            "models, e.g. speakleash/Bielik-11B-v2.3-Instruct or the run's SmolLM2-135M-Instruct"
        )
    tokenizer.padding_side = "left"  # generation continues every chat at the same last position
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@dataclass
class ChatModel:
    """A chat model answering lists of chats, ``batch_size`` at a time; it counts what it generated."""

    model_id: str
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    batch_size: int
    answer_ids: dict[str, int] = field(default_factory=dict)
    generated_tokens: int = 0
    prompt_tokens: int = 0  # tokens of prompts computed (a cached prefix once)
    seconds: float = 0.0
    calls: int = 0
    _prefixes: dict = field(default_factory=dict, repr=False)

    @classmethod
    def load(cls, model_id: str, variable: str, device: torch.device, dtype_setting: str, batch_size: int):
        from transformers import AutoModelForCausalLM

        from sae_pipeline.lm.loading import load_config, model_source, resolve_dtype

        tokenizer = load_tokenizer(model_id, variable)
        try:
            dtype = resolve_dtype(dtype_setting, device, load_config(model_id))
        except PipelineError as exc:
            raise _named(exc, variable) from None
        source, extra = model_source(model_id)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, **extra).to(device).eval()
        return cls(model_id, tokenizer, model, device, batch_size, answer_token_ids(tokenizer))

    @torch.inference_mode()
    def answer(
        self, chats: list[Messages], max_new_tokens: int, stop: Callable[[str], bool] | None = None
    ) -> list[str]:
        """Each chat's greedy answer (at most ``max_new_tokens`` tokens, fewer once ``stop(text so far)`` holds),
        special tokens removed. On a CPU one chat at a time after the cached prefix it shares with the others
        (delphi's system prompt and few-shot examples: most of every prompt); on a GPU in batches of ``batch_size``."""
        started = time.perf_counter()
        if self.device.type == "cpu":
            out = [self._answer_after_prefix(chat, max_new_tokens, stop) for chat in chats]
        else:
            out = []
            for i in range(0, len(chats), self.batch_size):
                out += self._answer_batch(chats[i : i + self.batch_size], max_new_tokens, stop)
        self.seconds += time.perf_counter() - started
        self.calls += len(chats)
        return [text.strip() for text in out]

    @torch.inference_mode()
    def classify(self, chats: list[Messages], sizes: list[int]) -> list[str]:
        """Each chat's answer in delphi's scorer format, ``[d,d,...]`` with ``sizes[i]`` digits: the brackets and
        commas forced, each digit the greedy choice between "0" and "1" (greedy decoding constrained to the format:
        every answer parses, in one forward step per digit). Chats that share a prefix (all messages but the last)
        go ``batch_size`` at a time after one cached copy of it, on any device."""
        started = time.perf_counter()
        groups: dict[str, list[int]] = {}
        for i, chat in enumerate(chats):
            groups.setdefault(self.tokenizer.apply_chat_template(chat[:-1], tokenize=False), []).append(i)
        out: list[list[bool]] = [[] for _ in chats]
        for indices in groups.values():
            for at in range(0, len(indices), self.batch_size):
                batch = indices[at : at + self.batch_size]
                rows = self._classify_batch([chats[i] for i in batch], max(sizes[i] for i in batch))
                for i, row in zip(batch, rows):
                    out[i] = row[: sizes[i]]  # a digit's choice never depends on later ones
        self.seconds += time.perf_counter() - started
        self.calls += len(chats)
        self.generated_tokens += sum(sizes)
        return ["[" + ",".join(str(int(d)) for d in digits) + "]" for digits in out]

    def _generate(self, max_new_tokens: int, stop: Callable[[str], bool] | None, **inputs) -> torch.Tensor:
        start = inputs["input_ids"].shape[1]
        ids = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            stopping_criteria=None if stop is None else [_TextStop(self.tokenizer, start, stop)],
        )
        new = ids[:, start:]
        self.generated_tokens += int((new != self.tokenizer.pad_token_id).sum())
        return new

    def _answer_batch(self, chats: list[Messages], max_new_tokens: int, stop=None) -> list[str]:
        enc = self._encode_batch([self._prompt_text(chat) for chat in chats])
        return self.tokenizer.batch_decode(self._generate(max_new_tokens, stop, **enc), skip_special_tokens=True)

    def _answer_after_prefix(self, chat: Messages, max_new_tokens: int, stop=None) -> str:
        """The chat's tokens continue the cached tokens of all its messages but the last (a copy of that cache is
        extended), so only the last message and the answer are computed."""
        full = self._ids(self._prompt_text(chat))
        cache, start = self._prefix_cache(chat, [full[0]])
        self.prompt_tokens += full.shape[1] - start
        new = self._generate(max_new_tokens, stop, input_ids=full, cache=cache)
        return self.tokenizer.decode(new[0], skip_special_tokens=True)

    def _classify_batch(self, chats: list[Messages], n: int) -> list[list[bool]]:
        """After a copy of the chats' shared prefix cache (repeated per chat), their last messages padded on the
        left, then one forward per digit for the whole batch; positions count real tokens only."""
        full = [self._ids(self._prompt_text(chat) + "[")[0] for chat in chats]
        cache, start = self._prefix_cache(chats[0], full)
        suffixes = [f[start:] for f in full]
        width = max(len(x) for x in suffixes)
        ids = torch.full((len(chats), width), self.tokenizer.pad_token_id, device=self.device)
        mask = torch.zeros((len(chats), start + width), dtype=torch.long, device=self.device)
        mask[:, :start] = 1
        for row, x in enumerate(suffixes):
            ids[row, width - len(x) :] = x
            mask[row, start + width - len(x) :] = 1
        if start:
            cache.batch_repeat_interleave(len(chats))
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, start:]
        self.prompt_tokens += sum(len(x) for x in suffixes)

        def forward(step: torch.Tensor):
            nonlocal mask, positions
            mask = torch.cat([mask, torch.ones_like(step)], dim=1)
            positions = positions[:, -1:] + torch.arange(1, step.shape[1] + 1, device=step.device)
            return self.model(input_ids=step, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)

        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        digits = self._choose_digits(logits.logits[:, -1], n, forward)
        return [[bool(d) for d in row] for row in digits.tolist()]

    def _choose_digits(self, logits: torch.Tensor, n: int, forward) -> torch.Tensor:
        """n greedy choices between the tokens "0" and "1", each followed by a forced "," fed with the digit."""
        zero, one, comma = (self.answer_ids[s] for s in ("0", "1", ","))
        chosen = []
        for i in range(n):
            ones = logits[:, one] > logits[:, zero]
            chosen.append(ones)
            if i < n - 1:
                digit = torch.where(ones, one, zero)
                step = torch.stack([digit, torch.full_like(digit, comma)], dim=1)
                logits = forward(step).logits[:, -1]
        return torch.stack(chosen, dim=1)

    def _prefix_cache(self, chat: Messages, full: list[torch.Tensor]):
        """A copy of the cache of the chat's messages but the last (computed once per prefix, CACHED_PREFIXES
        kept) and its length, where every prompt of ``full`` continues the prefix's tokens; else an empty cache."""
        from transformers import DynamicCache

        prefix_text = self.tokenizer.apply_chat_template(chat[:-1], tokenize=False)
        if prefix_text not in self._prefixes:
            prefix = self._ids(prefix_text)[0]
            cache = DynamicCache()
            self.model(input_ids=prefix[None], cache=cache, use_cache=True)
            self.prompt_tokens += len(prefix)
            if len(self._prefixes) >= CACHED_PREFIXES:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[prefix_text] = (prefix, cache)
        prefix, cache = self._prefixes[prefix_text]
        if all(len(f) > len(prefix) and torch.equal(f[: len(prefix)], prefix) for f in full):
            return copy.deepcopy(cache), len(prefix)
        return DynamicCache(), 0

    def _prompt_text(self, chat: Messages) -> str:
        return self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)

    def _encode_batch(self, texts: list[str]):
        return self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)


class _TextStop:
    """A stopping criterion on the decoded answer so far (transformers calls it after every new token)."""

    def __init__(self, tokenizer, start: int, stop: Callable[[str], bool]):
        self.tokenizer, self.start, self.stop = tokenizer, start, stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([self.stop(t) for t in texts], dtype=torch.bool, device=input_ids.device)


def answer_token_ids(tokenizer) -> dict[str, int]:
    """The single tokens of delphi's scorer answers ("[1,0,1]"); a vocabulary without them cannot be constrained."""
    ids = {}
    for s in ANSWER_TOKENS:
        i = tokenizer.convert_tokens_to_ids(s)
        if i is None or i == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(i) != s:
            raise PipelineError(f"the scorer's vocabulary has no token {s!r}: its answers cannot be read as 0/1 lists")
        ids[s] = i
    return ids
