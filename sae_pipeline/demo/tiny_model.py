"""A tiny random-weight stand-in for Bielik, so the pipeline can be tested offline on a CPU.

The saved directory loads with `AutoTokenizer` / `AutoModelForCausalLM.from_pretrained(dir)` exactly
like a hub id, and its tokenizer keeps the Bielik facts the pipeline depends on: `<unk>`=0,
`<s>`=1 prepended to every sequence, `</s>`=2 used as EOS and as the (left) padding token.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sae_pipeline.infra.errors import PipelineError

SAMPLE_PATH = Path(__file__).resolve().parents[2] / "data" / "polish_sample.jsonl"
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # list order fixes ids 0, 1, 2 as in Bielik
MODEL_MAX_LENGTH = 2048
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_sample_texts(path: Path | None = None) -> list[str]:
    """All texts of the sample corpus, blank ones included: the pipeline must see them to skip and count them."""
    path = Path(path) if path is not None else SAMPLE_PATH
    if not path.is_file():
        raise PipelineError(f'sample corpus {path} not found; expected a JSONL file with one {{"text": ...}} per line')
    with path.open(encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]


def _build_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE so every Polish diacritic round-trips, whatever the corpus covered."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((t for t in texts if t.strip()), trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="</s>",  # Bielik has no pad token; the pipeline pads with EOS
        padding_side="left",
        model_max_length=MODEL_MAX_LENGTH,
    )


def build_tiny_llama(
    out_dir: Path,
    texts: Iterable[str],
    *,
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int = 128,
    vocab_size: int = 512,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Train the tokenizer on `texts`, build a seeded random LlamaForCausalLM, save both to `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = _build_tokenizer(texts, vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=MODEL_MAX_LENGTH,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=2,
        tie_word_embeddings=False,
        dtype=dtype,
    )
    with torch.random.fork_rng(devices=[]):  # deterministic weights without touching the caller's RNG
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config).to(dtype).eval()
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


# Random-weight models the benchmarks time: a CPU-sized Llama, and one with Bielik-1.5B's exact shape (for a GPU).
BENCHMARK_SHAPES = {
    "cpu": dict(hidden_size=512, num_layers=8, num_heads=8, num_kv_heads=4, intermediate_size=1376, vocab_size=4000),
    "bielik-1.5b": dict(
        hidden_size=1536, num_layers=32, num_heads=12, num_kv_heads=2, intermediate_size=8960, vocab_size=32000
    ),
}


def build_benchmark_llama(out_dir: Path, bielik_shape: bool) -> Path:
    shape = BENCHMARK_SHAPES["bielik-1.5b" if bielik_shape else "cpu"]
    return build_tiny_llama(out_dir, load_sample_texts(), **shape)


def main() -> None:
    parser = argparse.ArgumentParser(description="Build a tiny random Llama with a Bielik-like tokenizer.")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--data", type=Path, default=None, help="JSONL corpus for the tokenizer (default: sample)")
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=128)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    args = parser.parse_args()
    path = build_tiny_llama(
        args.out_dir,
        load_sample_texts(args.data),
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        intermediate_size=args.intermediate,
        vocab_size=args.vocab,
        seed=args.seed,
        dtype=DTYPES[args.dtype],
    )
    print(path)


if __name__ == "__main__":
    main()
