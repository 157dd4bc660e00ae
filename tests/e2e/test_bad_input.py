"""Issue 2's bad-input list through the real scripts: non-zero exit, one `error:` line naming the variable or file
(no traceback), and the store exactly as it was: a complete run is present, so "nothing overwritten" means something.

One good capture is made per module and copied into each case's store (copies keep mtimes), so every case starts
from the same complete run ``good``, an incomplete run ``partial`` and ``run_id.txt`` pointing to ``good``. The cases
run a few at a time in one module fixture (each script spends seconds importing torch); each test checks its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sae_pipeline.store.activations import ActivationRun
from sae_pipeline.store.runs import Store
from tests.helpers import pipeline_env, run_script

STEP1, STEP2, STEP3 = "01_save_activations.py", "02_train_sae.py", "03_evaluate_sae.py"
SITE2 = "llamaforcausallm_model_layers_2_post_attention_layernorm"


@pytest.fixture(scope="module")
def golden(tiny_model, tmp_path_factory) -> tuple[dict[str, str], Path]:
    """(env, store): a complete run 'good' from a real capture, plus 'partial', a copy killed after shard 1."""
    env = pipeline_env(tiny_model)
    store = tmp_path_factory.mktemp("golden") / "store"
    res = run_script(STEP1, {**env, "STORE_DIR": str(store)}, "--run_id", "good")
    assert res.returncode == 0, res.stderr[-3000:]
    assert (store / "run_id.txt").read_text().strip() == "good"
    # What a SIGKILL during shard 2 leaves: shards 0-1, a stale temporary, and the manifest still "capturing".
    partial = store / "runs" / "partial"
    shutil.copytree(store / "runs" / "good", partial)
    meta = json.loads((partial / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["n_shards"] == 3
    for key in ("n_tokens", "n_empty_documents", "bytes", "completed"):
        meta.pop(key)
    meta.update(status="capturing", run_id="partial", run_name="partial")
    (partial / "meta.json").write_text(json.dumps(meta, indent=2))
    os.rename(partial / "batch_2", partial / ".tmp_batch_2_999_abcd")
    return env, store


def snapshot(root: Path) -> dict[str, tuple]:
    """Every file (size, mtime, content hash) and folder under ``root``. Folder mtimes are left out: the write
    probe of STORE_DIR creates and deletes a hidden file, which touches runs/ without changing what it holds."""
    out: dict[str, tuple] = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_dir():
            out[rel] = ("dir",)
        else:
            st = p.stat()
            out[rel] = (st.st_size, st.st_mtime_ns, hashlib.sha1(p.read_bytes()).hexdigest())
    return out


def _immutable(path: Path, on: bool) -> None:
    """A folder nobody may write, root included (chmod does not stop root; tests run as root)."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i" if on else "-i", str(path)], check=True)
    else:
        path.chmod(0o500 if on else 0o755)


@dataclass
class Case:
    id: str
    script: str
    env: dict[str, str] = field(default_factory=dict)
    args: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()  # substrings of the error line: the variable or file, and what is valid
    setup: Callable[[Path, dict[str, str]], None] | None = None  # changes the store before the snapshot
    readonly_runs: bool = False


def _no_pointer(store: Path, env) -> None:
    (store / "run_id.txt").unlink()


def _pointer(text: str):
    def setup(store: Path, env) -> None:
        (store / "run_id.txt").write_text(text)

    return setup


def _store_under_a_file(store: Path, env) -> None:
    blocker = store / "not_a_folder.txt"
    blocker.write_text("a regular file\n")
    env["STORE_DIR"] = str(blocker / "store")


CASES = [
    # ---- step 2 settings
    Case("TOP_K=0", STEP2, {"TOP_K": "0"}, expect=("TOP_K='0'", "greater than or equal to 1")),
    Case("TOP_K>n_latents", STEP2, {"TOP_K": "1000"}, expect=("TOP_K=1000", "1..127", "n_latents")),
    Case("TOP_K=abc", STEP2, {"TOP_K": "abc"}, expect=("TOP_K='abc'", "integer")),
    Case("EPOCHS=-1", STEP2, {"EPOCHS": "-1"}, expect=("EPOCHS='-1'", "greater than or equal to 1")),
    Case("LR=0", STEP2, {"LR": "0"}, expect=("LR='0'", "greater than 0")),
    Case("TOP_K-list>n_latents", STEP2, {"TOP_K": "4,1000"}, expect=("TOP_K=1000", "1..127")),
    Case(
        "MATRYOSHKA_WIDTHS-not-ending-at-n_latents",
        STEP2,
        {"SAE_ARCHITECTURE": "matryoshka_batchtopk", "MATRYOSHKA_WIDTHS": "8,64"},
        expect=("MATRYOSHKA_WIDTHS=8,64 is not valid", "n_latents = 128"),
    ),
    Case(
        "MATRYOSHKA_WIDTHS=0",
        STEP2,
        {"SAE_ARCHITECTURE": "matryoshka_batchtopk", "MATRYOSHKA_WIDTHS": "0,128"},
        expect=("MATRYOSHKA_WIDTHS", "greater than or equal to 1"),
    ),
    Case(
        "JUMPRELU_BANDWIDTH=0", STEP2, {"JUMPRELU_BANDWIDTH": "0"}, expect=("JUMPRELU_BANDWIDTH='0'", "greater than 0")
    ),
    Case("LAYER_NUM-not-in-run-step2", STEP2, {"LAYER_NUM": "2,3"}, expect=("LAYER_NUM=2,3", "holds LAYER_NUM 2")),
    Case(
        "sweep-does-not-fit",
        STEP2,
        {"N_LATENTS_MULTIPLIER": "1000000,2000000"},
        expect=("the 2 SAE(s) this process trains need about", "GiB", "N_LATENTS_MULTIPLIER"),
    ),
    # ---- step 1 settings
    Case("DATA_LIMIT=0", STEP1, {"DATA_LIMIT": "0"}, expect=("DATA_LIMIT='0'", "greater than or equal to 1")),
    Case(
        "BATCH_SIZE_SAVE=0",
        STEP1,
        {"BATCH_SIZE_SAVE": "0"},
        expect=("BATCH_SIZE_SAVE='0'", "greater than or equal to 1"),
    ),
    Case("LAYER_NUM=99", STEP1, {"LAYER_NUM": "99"}, expect=("LAYER_NUM=99", "4 layers", "0..3")),
    Case("LAYER_NUM=-1", STEP1, {"LAYER_NUM": "-1"}, expect=("LAYER_NUM='-1'", "greater than or equal to 0")),
    Case(
        "LAYER_SIGNATURE-unknown",
        STEP1,
        {"LAYER_SIGNATURE": "no_such_layer"},
        expect=("LAYER_SIGNATURE='no_such_layer'", SITE2),
    ),
    Case(
        "TEXT_FIELD-missing", STEP1, {"TEXT_FIELD": "content"}, expect=("TEXT_FIELD='content'", "its columns are: text")
    ),
    Case(
        "MODEL_ID-missing-dir",
        STEP1,
        {"MODEL_ID": "/no/such/model/dir"},
        expect=("MODEL_ID='/no/such/model/dir'", "hub id"),
    ),
    Case("MODEL_ID-not-an-id", STEP1, {"MODEL_ID": "not a model!"}, expect=("MODEL_ID='not a model!'", "hub id")),
    Case(
        "MODEL_ID-not-cached-offline",
        STEP1,
        {"MODEL_ID": "nobody-xyz/no-such-model-xyz", "HF_HUB_CACHE": "/nonexistent/hf-cache"},
        expect=("MODEL_ID='nobody-xyz/no-such-model-xyz'", "not in the local Hugging Face cache", "local model folder"),
    ),
    Case(
        "HF_DATASET-not-cached-offline",
        STEP1,
        {"HF_DATASET": "nobody-xyz/no-such-corpus", "HF_HUB_CACHE": "/nonexistent/hf-cache"},
        expect=("HF_DATASET='nobody-xyz/no-such-corpus'", "not in the local Hugging Face cache", ".jsonl"),
    ),
    Case(
        "HF_DATASET-missing",
        STEP1,
        {"HF_DATASET": "/no/such/corpus.jsonl"},
        expect=("HF_DATASET='/no/such/corpus.jsonl'", "does not exist", ".jsonl"),
    ),
    Case("STORE_DIR-under-a-file", STEP1, setup=_store_under_a_file, expect=("STORE_DIR=", "not writable")),
    Case("STORE_DIR-read-only-step1", STEP1, readonly_runs=True, expect=("STORE_DIR=", "not writable")),
    Case("STORE_DIR-read-only-step2", STEP2, readonly_runs=True, expect=("STORE_DIR=", "not writable")),
    Case(
        "DEVICE=cuda-step1",
        STEP1,
        {"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""},
        expect=("DEVICE='cuda'", "CUDA is not available", "DEVICE=cpu"),
    ),
    Case(
        "DEVICE=cuda-step2",
        STEP2,
        {"DEVICE": "cuda", "CUDA_VISIBLE_DEVICES": ""},
        expect=("DEVICE='cuda'", "CUDA is not available", "DEVICE=cpu"),
    ),
    # ---- run ids and pointers
    Case(
        "run_id-escape-step1",
        STEP1,
        args=("--run_id", "../escape"),
        expect=("--run_id='../escape'", "not a valid run id"),
    ),
    Case("run_id-escape-step2", STEP2, args=("--run_id", "../escape"), expect=("'../escape'", "not a valid run id")),
    Case("sae_run_id-escape", STEP2, args=("--sae_run_id", "../../x"), expect=("'../../x'", "not a valid run id")),
    Case("RUN_ID-env-escape", STEP1, {"RUN_ID": "/tmp/abs"}, expect=("RUN_ID='/tmp/abs'", "not a valid run id")),
    Case(
        "run_id.txt-missing",
        STEP2,
        setup=_no_pointer,
        expect=("run_id.txt not found", "uv run python 01_save_activations.py", "--run_id <id>"),
    ),
    Case(
        "sae_run_id.txt-missing-step3",
        STEP3,
        expect=("sae_run_id.txt not found", "uv run python 02_train_sae.py", "--sae_run_id <id>"),
    ),
    Case("run_id.txt-empty", STEP2, setup=_pointer("\n"), expect=("run_id.txt is empty",)),
    Case("run_id.txt-ghost", STEP2, setup=_pointer("ghost\n"), expect=("run_id.txt names run 'ghost'",)),
    Case("run_id.txt-escape", STEP2, setup=_pointer("../good\n"), expect=("run_id.txt='../good'", "not a valid")),
    Case("run_id-ghost-step2", STEP2, args=("--run_id", "ghost"), expect=("'ghost' not found",)),
    # ---- runs that exist
    Case(
        "incomplete-run-step2",
        STEP2,
        args=("--run_id", "partial"),
        expect=("'partial' is incomplete", "2/3", "01_save_activations.py --run_id partial"),
    ),
    Case(
        "existing-run-other-settings",
        STEP1,
        {"MAX_LENGTH": "16"},
        args=("--run_id", "good"),
        expect=("run 'good' exists with other settings", "max_length", "another --run_id"),
    ),
]


@dataclass
class Outcome:
    result: subprocess.CompletedProcess | None
    before: dict[str, tuple]
    after: dict[str, tuple]
    failure: BaseException | None = None


def _run_case(case: Case, env: dict[str, str], src: Path, workdir: Path) -> Outcome:
    store = workdir / "store"
    shutil.copytree(src, store)  # copy2: sizes, contents and mtimes as in the golden store
    env = {**env, "STORE_DIR": str(store), **case.env}
    before: dict[str, tuple] = {}
    try:
        if case.setup is not None:
            case.setup(store, env)
        before = snapshot(workdir)
        if case.readonly_runs:
            _immutable(store / "runs", True)
        try:
            res = run_script(case.script, env, *case.args)
        finally:
            if case.readonly_runs:
                _immutable(store / "runs", False)
        return Outcome(res, before, snapshot(workdir))
    except BaseException as exc:  # reported by the case's own test
        return Outcome(None, before, {}, exc)


@pytest.fixture(scope="module")
def outcomes(golden, tmp_path_factory) -> dict[str, Outcome]:
    """Every case run once, a few at a time: each subprocess spends seconds importing torch, on its own store."""
    env, src = golden
    root = tmp_path_factory.mktemp("cases")
    workers = max(2, min(4, os.cpu_count() or 2))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {c.id: pool.submit(_run_case, c, env, src, root / c.id) for c in CASES}
        return {cid: f.result() for cid, f in futures.items()}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(outcomes, case: Case):
    out = outcomes[case.id]
    if out.failure is not None:
        raise out.failure
    res = out.result
    assert res.returncode != 0, f"exit 0\n{res.stderr[-3000:]}"
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-5000:]
    assert "Retrying" not in res.stderr and "thrown while requesting" not in res.stderr, res.stderr[-3000:]  # offline
    lines = res.stderr.splitlines()
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, res.stderr[-3000:]
    assert lines[-1] == errors[0], res.stderr[-3000:]  # the error is the last word
    for part in case.expect:
        assert part in errors[0], errors[0]
    assert out.before and out.after == out.before, {
        k: (out.before.get(k), out.after.get(k))
        for k in set(out.before) | set(out.after)
        if out.before.get(k) != out.after.get(k)
    }


def test_golden_store_is_what_the_cases_assume(golden):
    """The fixture's runs: 'good' complete and readable by mi_crow, 'partial' incomplete."""
    import torch
    from mi_crow.store.local_store import LocalStore
    from mi_crow.store.store_dataloader import StoreDataloader

    _, root = golden
    store = Store(root)
    good = ActivationRun(store, "good")
    meta = good.read_meta()
    assert good.status() == "complete" and [(x["signature"], x["d_model"]) for x in meta["layers"]] == [(SITE2, 64)]
    assert ActivationRun(store, "partial").status() != "complete"
    loader = StoreDataloader(LocalStore(base_path=root), "good", SITE2, batch_size=1000, dtype=torch.float32)
    acts = torch.cat(list(loader))
    assert acts.shape == (meta["n_tokens"], 64) and torch.isfinite(acts).all()
