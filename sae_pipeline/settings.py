"""Every environment variable of the pipeline, defined once.

Each field is read from the upper-case environment variable of the same name (``top_k`` <- ``TOP_K``). The scripts
pick the class for their step; the fields, defaults and bounds live only here; docs/configuration.md is generated
from them (scripts/configuration_doc.py; a test fails while it is stale).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from sae_pipeline.infra.errors import PipelineError


def default_store_dir() -> Path:
    """``$SCRATCH/sae_store`` on clusters that define SCRATCH, else ``./store`` (the original specification's rule)."""
    scratch = os.environ.get("SCRATCH")
    return Path(scratch) / "sae_store" if scratch else Path("store")


def _as_list(value: Any) -> list[Any]:
    """``8,16,24`` from the environment, or a Python value; a single value is a list of one."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",")]
    return list(value) if isinstance(value, list | tuple) else [value]


def _distinct(values: tuple[Any, ...]) -> tuple[Any, ...]:
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ValueError(f"lists {', '.join(map(str, repeated))} more than once")
    return values


def ListOf(item: Any) -> Any:  # noqa: N802 (a type factory)
    """A comma-separated list variable (sweeps): ``TOP_K=16,32,64``; one value is a list of one."""
    return Annotated[tuple[item, ...], NoDecode, BeforeValidator(_as_list), AfterValidator(_distinct)]


class CommonSettings(BaseSettings):
    """Variables every step reads."""

    model_config = SettingsConfigDict(
        case_sensitive=False, env_ignore_empty=True, extra="ignore", protected_namespaces=(), frozen=True
    )

    model_id: str = Field(
        "speakleash/Bielik-1.5B-v3.0-Instruct",
        min_length=1,
        description="Hugging Face model id, a local model directory or a .gguf file",
    )
    store_dir: Path = Field(
        default_factory=default_store_dir,
        description="where runs are stored ($SCRATCH/sae_store when SCRATCH is set, else ./store)",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$", description="auto, cpu, cuda, cuda:N or mps")
    model_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="dtype the model runs in; auto = checkpoint dtype on GPU, float32 on CPU"
    )
    layer_num: ListOf(Annotated[int, Field(ge=0)]) = Field(
        16,
        min_length=1,
        validate_default=True,
        description="transformer block(s) whose post_attention_layernorm is hooked; a list (8,16,24) captures or "
        "trains several",
    )
    layer_signature: ListOf(Annotated[str, Field(min_length=1)]) | None = Field(
        None, min_length=1, description="full mi_crow hook name(s); overrides LAYER_NUM (any architecture)"
    )
    seed: int = Field(
        42, ge=0, description="seed of the dataset shuffle (DATA_SHUFFLE); in step 2 of each SAE's initialisation"
    )
    run_id: str | None = Field(
        None,
        min_length=1,
        description="activation run id (same as --run_id; step 1 default: a fresh one, "
        "later steps: the one in STORE_DIR/run_id.txt)",
    )
    progress_every_seconds: float = Field(
        60,
        gt=0,
        allow_inf_nan=False,
        description="when output is not a terminal (a SLURM log), one progress line every this many seconds; "
        "a terminal shows a bar",
    )


def _slurm_int(name: str, default: int | None) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    if not value.strip().isdigit():
        raise ValueError(f"{name}={value!r} is not valid: SLURM sets it to a task number (an integer)")
    return int(value)


def _array_task(settings: BaseSettings, id_field: str, count_field: str) -> None:
    """Fill a step's (task id, task count) from SLURM's array variables when neither is set; check the pair."""
    task_id, count = getattr(settings, id_field), getattr(settings, count_field)
    if task_id is None and count is None and "SLURM_ARRAY_TASK_ID" in os.environ:
        task = _slurm_int("SLURM_ARRAY_TASK_ID", None)
        first = _slurm_int("SLURM_ARRAY_TASK_MIN", 0)
        last = _slurm_int("SLURM_ARRAY_TASK_MAX", task)
        task_id, count = task - first, last - first + 1
        object.__setattr__(settings, id_field, task_id)
        object.__setattr__(settings, count_field, count)
    if (task_id is None) != (count is None):
        raise ValueError(f"{id_field.upper()} and {count_field.upper()} must be set together")
    if task_id is not None and task_id >= count:
        raise ValueError(f"{id_field.upper()}={task_id} must be below {count_field.upper()}={count}")


class CaptureSettings(CommonSettings):
    """Variables of step 1 (01_save_activations.py)."""

    hf_dataset: str = Field(
        "roneneldan/TinyStories",
        min_length=1,
        description="hub dataset or a local file/folder (jsonl, json, csv, parquet, txt)",
    )
    data_split: str = Field("train", min_length=1, description="dataset split")
    text_field: str = Field("text", min_length=1, description="column holding the text")
    data_limit: int = Field(10000, ge=1, description="first N rows of the split are used")
    data_shuffle: bool = Field(False, description="shuffle the split (seeded by SEED) before taking DATA_LIMIT rows")
    max_length: int = Field(128, ge=2, description="tokens per document, longer ones are truncated")
    batch_size_save: int = Field(16, ge=1, description="documents per forward pass")
    batch_tokens_save: int | None = Field(
        None,
        ge=1,
        description="padded tokens per forward pass; when set, batches are sized by tokens instead of "
        "BATCH_SIZE_SAVE (on a GPU, see docs/gpus.md)",
    )
    docs_per_shard: int = Field(1024, ge=1, description="documents per stored shard (the unit of resume)")
    hook_side: Literal["output", "input"] = Field(
        "output",
        description="output = the hooked module's output (the original specification's default); input = its input",
    )
    keep_special_tokens: bool = Field(False, description="also store BOS/EOS and other special tokens")
    store_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="dtype activations are stored in"
    )
    capture_task_id: int | None = Field(
        None,
        ge=0,
        description="this task's part of the dataset (default: from SLURM_ARRAY_TASK_ID in an array job, else all)",
    )
    capture_task_count: int | None = Field(
        None, ge=1, description="number of parts the dataset is split into (default: the array's task count)"
    )

    @model_validator(mode="after")
    def _array_task(self) -> CaptureSettings:
        """In a SLURM array each task captures its own shards of the one run: derive the part from SLURM."""
        _array_task(self, "capture_task_id", "capture_task_count")
        return self


class TrainSettings(CommonSettings):
    """Variables of step 2 (02_train_sae.py). Defaults were chosen by benchmarks/train_quality.py (RESULTS.md)."""

    # Sweep axes: each accepts a comma-separated list and step 2 trains every combination in one pass.
    n_latents_multiplier: ListOf(Annotated[int, Field(ge=1)]) = Field(
        4, min_length=1, validate_default=True, description="SAE latents = d_model x this"
    )
    top_k: ListOf(Annotated[int, Field(ge=1)]) = Field(
        8,
        min_length=1,
        validate_default=True,
        description="active latents per token (must be below the number of latents)",
    )
    sae_architecture: ListOf(Literal["topk", "batchtopk", "matryoshka_batchtopk", "jumprelu"]) = Field(
        "topk",
        min_length=1,
        validate_default=True,
        description="topk = k latents per token; batchtopk = k per token on average over a batch, "
        "with a threshold learned for inference; matryoshka_batchtopk = batchtopk whose nested prefixes "
        "(MATRYOSHKA_WIDTHS) each reconstruct on their own; jumprelu = a learned threshold per latent, "
        "trained towards an L0 of TOP_K (docs/architectures.md)",
    )
    matryoshka_widths: ListOf(Annotated[int, Field(ge=1)]) | None = Field(
        None,
        min_length=1,
        description="matryoshka_batchtopk: the nested prefix sizes, strictly increasing and ending at the SAE's "
        "latents (default: n/64,n/16,n/4,n)",
    )
    jumprelu_l0_coefficient: float = Field(
        0.05,
        gt=0,
        allow_inf_nan=False,
        description="jumprelu: weight of the L0 target penalty mean(2/k (L0 - k)^2), k = TOP_K, against the FVU "
        "loss (docs/architectures.md)",
    )
    jumprelu_bandwidth: float = Field(
        0.05,
        gt=0,
        allow_inf_nan=False,
        description="jumprelu: width of the straight-through estimator's kernel, in units of the activations' "
        "per-dimension RMS (SAELens' default 0.05)",
    )
    seed: ListOf(Annotated[int, Field(ge=0)]) = Field(
        42, min_length=1, validate_default=True, description="seed of each SAE's initialisation"
    )
    lr: ListOf(Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]) = Field(
        6e-3,
        min_length=1,
        validate_default=True,
        description="peak learning rate (Adam); chosen by the sweep in benchmarks/RESULTS.md",
    )
    data_seed: int | None = Field(
        None,
        ge=0,
        description="seed of the training-token order, shared by every SAE of a sweep (default: SEED's first)",
    )
    epochs: int = Field(10, ge=1, description="passes over the training tokens")
    batch_size_train: int = Field(
        4096,
        ge=1,
        description="tokens per optimisation step (the original specification used 32, far too few for a good SAE)",
    )
    lr_warmup_fraction: float = Field(
        0.05, ge=0, le=0.5, description="fraction of the steps with a linear learning-rate warm-up"
    )
    lr_decay_fraction: float = Field(
        0.2, ge=0, le=1, description="fraction of the steps at the end with a linear decay to 0"
    )
    l1_lambda: float = Field(
        1e-4, ge=0, allow_inf_nan=False, description="L1 penalty on the mean code value (optional for TopK; 0 disables)"
    )
    auxk_alpha: float = Field(
        1 / 32,
        ge=0,
        allow_inf_nan=False,
        description="weight of the AuxK loss that revives dead latents (Gao et al. 2024; 0 disables)",
    )
    dead_tokens_window: int = Field(
        10_000_000,
        ge=1,
        description="a latent is dead if it did not fire in this many training tokens "
        "(capped at a tenth of all tokens trained on, so short runs get one)",
    )
    grad_clip: float = Field(
        1.0, ge=0, allow_inf_nan=False, description="gradient-norm clipping threshold (0 disables)"
    )
    amp_dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="autocast dtype on CUDA (float32 disables autocast; CPU always runs float32)"
    )
    holdout_fraction: float = Field(
        0.05, gt=0, le=0.5, description="fraction of every shard's tokens held out for evaluation, never trained on"
    )
    shuffle_buffer_tokens: int = Field(
        1_048_576,
        ge=1,
        description="tokens held in memory and shuffled together (whole shards, "
        "at least one; memory about 2x this x d_model x 2 bytes)",
    )
    checkpoint_every_steps: int = Field(
        1000, ge=1, description="steps between checkpoints (also written at each epoch end)"
    )
    log_every_steps: int = Field(100, ge=1, description="steps between metric lines in history.json")
    wandb_project: str | None = Field(
        None, min_length=1, description="log metrics to this W&B project (unset: nothing is sent)"
    )
    sae_run_id: str | None = Field(
        None, min_length=1, description="training run id, the sweep's id when several SAEs train (default: a fresh one)"
    )
    train_task_id: int | None = Field(
        None,
        ge=0,
        description="this task's share of the sweep: SAEs t, t+T, ... of the grid (default: from "
        "SLURM_ARRAY_TASK_ID in an array job, else all)",
    )
    train_task_count: int | None = Field(
        None, ge=1, description="number of tasks T the sweep is split into (default: the array's task count)"
    )
    stream: bool = Field(
        False,
        description="train from the model's forward instead of an activation run (step 1's variables say what to "
        "run; nothing is stored); see docs/streaming.md",
    )

    @model_validator(mode="after")
    def _array_task(self) -> TrainSettings:
        """In a SLURM array each task trains its own share of the sweep: derive the share from SLURM."""
        _array_task(self, "train_task_id", "train_task_count")
        return self

    @model_validator(mode="after")
    def _schedule_fits(self) -> TrainSettings:
        if self.lr_warmup_fraction + self.lr_decay_fraction > 1:
            raise ValueError(
                f"LR_WARMUP_FRACTION={self.lr_warmup_fraction} + LR_DECAY_FRACTION="
                f"{self.lr_decay_fraction} must not exceed 1"
            )
        return self


class StreamSettings(TrainSettings, CaptureSettings):
    """Variables of step 2 with STREAM=1 (docs/streaming.md): the training variables, plus step 1's that say which
    model, layers, documents and tokens to run (the forward that step 1 would have stored, done on the fly)."""

    stream_buffer_tokens: int = Field(
        262_144,
        ge=1,
        description="STREAM=1: activations (of whole shards, at least one) forwarded and shuffled together; "
        "memory about 2x this x d_model x STORE_DTYPE's bytes per layer",
    )

    @model_validator(mode="after")
    def _array_task(self) -> StreamSettings:
        """A streaming run splits its sweep over an array (TRAIN_TASK_*), never the dataset."""
        _array_task(self, "train_task_id", "train_task_count")
        if self.stream and self.capture_task_id is not None:
            raise ValueError(
                "CAPTURE_TASK_ID splits a capture; with STREAM=1 an array splits the sweep (TRAIN_TASK_ID)"
            )
        return self


def load_settings(cls: type[BaseSettings]) -> BaseSettings:
    """Read ``cls`` from the environment; a bad value becomes one PipelineError line naming the variable."""
    try:
        return cls()
    except ValidationError as exc:
        err = exc.errors()[0]
        if not err["loc"]:  # a rule across several variables: its message names them
            raise PipelineError(str(err["msg"]).removeprefix("Value error, ")) from None
        name = str(err["loc"][0]).upper()
        field = cls.model_fields.get(name.lower())
        hint = f" ({field.description})" if field is not None and field.description else ""
        message = str(err["msg"]).removeprefix("Value error, ")
        raise PipelineError(f"{name}={os.environ.get(name, '')!r} is not valid: {message}{hint}") from None


class EvalSettings(CommonSettings):
    """Variables of step 3 (03_evaluate_sae.py). The layer, hook side, special-token rule and max length come from
    the training and activation runs; MODEL_ID defaults to the activation run's model when it is not set."""

    sae_run_id: str | None = Field(
        None,
        min_length=1,
        description="training run or sweep to evaluate (same as --sae_run_id; default: the one in "
        "STORE_DIR/sae_run_id.txt)",
    )
    eval_limit: int = Field(
        200,
        ge=1,
        description="held-out documents evaluated: the rows after the ones capture "
        "used (DATA_LIMIT), or the first rows of EVAL_DATASET",
    )
    eval_dataset: str | None = Field(
        None,
        min_length=1,
        description="evaluate on this hub dataset or local file instead "
        "(default: the activation run's dataset, past the captured rows)",
    )
    eval_split: str | None = Field(
        None, min_length=1, description="split of EVAL_DATASET (default: train; without EVAL_DATASET the run's split)"
    )
    eval_text_field: str | None = Field(
        None, min_length=1, description="text column of EVAL_DATASET (default: the run's TEXT_FIELD)"
    )
    batch_size_eval: int = Field(8, ge=1, description="documents per forward pass in evaluation")
    eval_scan_tokens: int = Field(
        1_000_000,
        ge=1,
        description="stored tokens of the activation run read for the feature browser "
        "(top contexts, frequencies) and the mean-ablation mean",
    )
    browser_latents: int = Field(
        100,
        ge=0,
        description="latents shown in detail in the feature browser (a few from every decade of firing frequency; "
        "all are listed and open)",
    )
    browser_contexts: int = Field(10, ge=1, le=100, description="top-activating contexts shown per latent")
    browser_window: int = Field(12, ge=1, le=64, description="tokens shown on each side of an activating token")
    eval_absorption: bool = Field(
        False,
        description="measure first-letter feature absorption as SAEBench does (off by default: one forward per "
        "word, probes per letter; on SmolLM2 on CPU it adds tens of seconds, see docs/evaluation.md)",
    )
    absorption_words: int = Field(
        2000, ge=50, description="single-token words of the vocabulary used by EVAL_ABSORPTION (80% train, 20% test)"
    )
    absorption_letters: str = Field(
        "abcdefghijklmnopqrstuvwxyz",
        min_length=2,
        description="the alphabet of EVAL_ABSORPTION: words are made of these letters, each first letter is a class "
        "(Polish: aąbcćdeęfghijklłmnńoóprsśtuwyzźż)",
    )

    @model_validator(mode="after")
    def _absorption_letters(self) -> EvalSettings:
        letters = self.absorption_letters
        if not letters.isalpha() or letters != letters.lower() or len(set(letters)) != len(letters):
            raise ValueError(f"ABSORPTION_LETTERS={letters!r}: give distinct lower-case letters, e.g. abcdefghijklmnop")
        return self


class InterpretSettings(CommonSettings):
    """Variables of step 4 (04_interpret_sae.py). The layer and the texts come from the training and activation
    runs; the explainer defaults to the activation run's model (an instruct model in the default setup)."""

    sae_run_id: str | None = Field(
        None,
        min_length=1,
        description="training run or sweep to interpret (same as --sae_run_id; default: the one in "
        "STORE_DIR/sae_run_id.txt)",
    )
    explainer_model: str | None = Field(
        None,
        min_length=1,
        description="instruct model (with a chat template) that explains latents: a hub id, a model folder or a "
        ".gguf file (default: the activation run's model; on a GPU node: speakleash/Bielik-11B-v2.3-Instruct)",
    )
    scorer_model: str | None = Field(
        None, min_length=1, description="instruct model that scores the explanations (default: EXPLAINER_MODEL)"
    )
    interpret_limit: int = Field(
        200,
        ge=1,
        description="latents explained and scored, spread over the decades of firing frequency like the browser's "
        "detailed latents; at least the number of firing latents means all of them",
    )
    interpret_language: str = Field(
        "Polish", min_length=1, description="language of the texts, named in the explainer's and scorers' prompts"
    )
    interpret_scan_tokens: int = Field(
        10_000_000, ge=1, description="stored tokens read for the latents' frequencies and examples"
    )
    interpret_top_examples: int = Field(
        20, ge=1, le=200, description="top-activating contexts per latent shown to the explainer"
    )
    interpret_test_examples: int = Field(
        10, ge=1, le=200, description="activating contexts per latent, across its quantiles, shown to the scorers"
    )
    interpret_non_activating: int = Field(
        10, ge=1, le=200, description="contexts per latent where it does not fire, shown to the scorers"
    )
    interpret_window: int = Field(12, ge=1, le=64, description="tokens of context on each side of a chosen token")
    interpret_examples_per_prompt: int = Field(5, ge=1, le=50, description="examples a scorer judges per prompt")
    explainer_max_new_tokens: int = Field(64, ge=8, description="tokens the explainer may generate per latent")
    interpret_batch_size: int = Field(8, ge=1, description="chats per generate call of the explainer and scorer")
    interpret_delphi_cache: bool = Field(
        False,
        description="also write the SAE's codes of every latent over the scanned tokens as delphi's latent cache "
        "(interpretation/delphi_cache/), for delphi's own pipeline",
    )
    interpret_neuronpedia: bool = Field(
        False,
        description="also write the interpreted latents as SAE-Dashboard/Neuronpedia feature JSON "
        "(interpretation/neuronpedia/batch-0.json; loads the run's model for the top logits)",
    )
