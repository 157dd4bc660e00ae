"""The explainer and scorer models: any local instruct model with a chat template, answering greedily.

EXPLAINER_MODEL (and SCORER_MODEL) is a hub id, a model folder or a ``.gguf`` file, read like MODEL_ID
(``lm/loading.py``). Generation is transformers' ``generate`` on batches of chats, padded on the left, greedy
(delphi's default temperature 0): the same prompts give the same answers, which a resumed step 4 relies on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.interpret.prompts import Messages
from sae_pipeline.lm import hub

CACHED_PREFIXES = 4  # the explainer's, detection's and fuzzing's prompts each share one


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
    generated_tokens: int = 0
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
        return cls(model_id, tokenizer, model, device, batch_size)

    @torch.inference_mode()
    def answer(self, chats: list[Messages], max_new_tokens: int) -> list[str]:
        """Each chat's greedy answer (at most ``max_new_tokens`` tokens), special tokens removed. On a CPU one chat
        at a time after the cached prefix it shares with the others (delphi's system prompt and few-shot examples:
        most of every prompt); on a GPU in batches of ``batch_size``."""
        started = time.perf_counter()
        if self.device.type == "cpu":
            out = [self._answer_after_prefix(chat, max_new_tokens) for chat in chats]
        else:
            out = []
            for i in range(0, len(chats), self.batch_size):
                out += self._answer_batch(chats[i : i + self.batch_size], max_new_tokens)
        self.seconds += time.perf_counter() - started
        self.calls += len(chats)
        return [text.strip() for text in out]

    def _generate(self, max_new_tokens: int, **inputs) -> torch.Tensor:
        ids = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        new = ids[:, inputs["input_ids"].shape[1] :]
        self.generated_tokens += int((new != self.tokenizer.pad_token_id).sum())
        return new

    def _answer_batch(self, chats: list[Messages], max_new_tokens: int) -> list[str]:
        texts = [self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) for chat in chats]
        enc = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        return self.tokenizer.batch_decode(self._generate(max_new_tokens, **enc), skip_special_tokens=True)

    def _answer_after_prefix(self, chat: Messages, max_new_tokens: int) -> str:
        """The chat's tokens continue the cached tokens of all its messages but the last (a copy of that cache is
        extended), so only the last message and the answer are computed."""
        from transformers import DynamicCache

        full = self._ids(self.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False))
        prefix_text = self.tokenizer.apply_chat_template(chat[:-1], tokenize=False)
        if prefix_text not in self._prefixes:
            prefix = self._ids(prefix_text)
            cache = DynamicCache()
            self.model(input_ids=prefix, cache=cache, use_cache=True)
            if len(self._prefixes) >= CACHED_PREFIXES:
                self._prefixes.pop(next(iter(self._prefixes)))
            self._prefixes[prefix_text] = (prefix, cache)
        prefix, cache = self._prefixes[prefix_text]
        if full.shape[1] <= prefix.shape[1] or not torch.equal(full[0, : prefix.shape[1]], prefix[0]):
            return self.tokenizer.decode(self._generate(max_new_tokens, input_ids=full)[0], skip_special_tokens=True)
        new = self._generate(max_new_tokens, input_ids=full, cache=copy.deepcopy(cache))
        return self.tokenizer.decode(new[0], skip_special_tokens=True)

    def _ids(self, text: str) -> torch.Tensor:
        return self.tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self.device)
