"""The sbatch scripts on a real single-node SLURM cluster, submitted unmodified, as users submit them.

The cluster (tests/slurm/cluster.py) declares fake GPUs and a node bigger than this machine, so the scripts' own
``--gres=gpu:1 --mem=32G/64G --cpus-per-task=4/8 --time=24:00:00/48:00:00`` lines are accepted as they are. The
pipeline settings come from the environment of the submitting shell (sbatch's default --export=ALL), pointing at
the tiny offline model. ``sbatch --wait`` returning 0 proves nothing (a cancelled job returns 0 too): every test
checks the final JobState.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO, SAMPLE
from tests.slurm.cluster import SlurmCluster
from tests.slurm.conftest import base_env

pytestmark = pytest.mark.slurm

CAPTURE = str(REPO / "submit_save_activations.sh")
TRAIN = str(REPO / "submit_train_sae.sh")
PIPELINE = str(REPO / "submit_pipeline.sh")


# ------------------------------------------------------------------------------------------------ helpers
def read_meta(store: Path, run_id: str) -> dict:
    return json.loads((store / "runs" / run_id / "meta.json").read_text())


def provenance(store: Path, run_id: str) -> set[tuple[int, int, int]]:
    """(doc index, position, token id) of every stored token of an activation run."""
    out: set[tuple[int, int, int]] = set()
    n = 0
    for f in sorted((store / "runs" / run_id).glob("batch_*/tokens/provenance.safetensors")):
        t = load_file(str(f))["tensor"]
        n += t.shape[0]
        out.update(map(tuple, t.tolist()))
    assert n == len(out), "duplicate tokens in the run"
    return out


def logs(job_dir: Path, pattern: str) -> str:
    files = sorted(job_dir.glob(pattern))
    assert files, f"no log {pattern} in {job_dir}: {sorted(p.name for p in job_dir.iterdir())}"
    return "\n".join(f"==> {f.name}\n{f.read_text(errors='replace')}" for f in files)


def assert_completed(cluster: SlurmCluster, final: dict, job_dir: Path) -> None:
    bad = {k: (v.state, v.exit_code, v.reason) for k, v in final.items() if v.state != "COMPLETED"}
    if bad:
        text = "\n".join(f"==> {f.name}\n{f.read_text(errors='replace')[-3000:]}" for f in sorted(job_dir.glob("*")))
        pytest.fail(f"jobs not COMPLETED: {bad}\n{text}")


def local_capture(env: dict[str, str], run_id: str) -> subprocess.CompletedProcess:
    """Step 1 run directly (no SLURM): the reference a SLURM run must match."""
    env = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    return subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), str(REPO / "01_save_activations.py"), "--run_id", run_id],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


N_SAMPLE = sum(1 for _ in SAMPLE.open(encoding="utf-8"))  # 400 documents


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """Tokens of the whole sample captured outside SLURM; ``n_tokens``/``provenance`` for the default 200 docs.

    Documents are captured independently of their batch and shard, so the expected tokens of any prefix of the
    sample, or of the sample repeated, follow from this one run (provenance = (doc index, position, token id)).
    """
    store = tmp_path_factory.mktemp("ref_store")
    proc = local_capture(base_env(tiny_model, store, DATA_LIMIT=str(N_SAMPLE)), "ref_all")
    assert proc.returncode == 0, proc.stderr
    assert read_meta(store, "ref_all")["status"] == "complete"
    full = provenance(store, "ref_all")

    def expected(n_docs: int) -> set[tuple[int, int, int]]:
        return {
            (d + k * N_SAMPLE, p, t)
            for k in range(-(-n_docs // N_SAMPLE))
            for d, p, t in full
            if d + k * N_SAMPLE < n_docs
        }

    default = expected(int(base_env(tiny_model, store)["DATA_LIMIT"]))
    return {"n_tokens": len(default), "provenance": default, "expected": expected, "store": store}


# ------------------------------------------------------------------------------------------------ tests
def test_each_script_alone(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """sbatch --wait each script, unmodified, with the default python (`uv run` in the project) and a `module`."""
    store = tmp_path / "store"
    # A stand-in `module` command first on PATH: the scripts load the seed's modules through it.
    bindir = tmp_path / "bin"
    bindir.mkdir()
    (bindir / "module").write_text(f'#!/bin/sh\necho "$@" >> {tmp_path}/module_calls\n')
    (bindir / "module").chmod(0o755)
    env = base_env(tiny_model, store, PATH=f"{bindir}:{os.environ['PATH']}")
    del env["VENV"], env["SAE_MODULES"]  # the defaults: `uv run`, modules "python/3.10 cuda/11.8"

    proc = slurm_cluster.run(["sbatch", "--wait", "--parsable", CAPTURE], cwd=job_dir, env=env, timeout=300)
    job = proc.stdout.strip().splitlines()[0]
    assert proc.returncode == 0
    final = slurm_cluster.wait(job)
    assert_completed(slurm_cluster, final, job_dir)
    info = final[job]
    assert info.raw["TresPerNode"] == "gres:gpu:1" and info.raw["TimeLimit"] == "1-00:00:00"
    assert (job_dir / f"sae_save_activations_{job}.out").exists()
    assert (job_dir / f"sae_save_activations_{job}.err").exists()
    assert (tmp_path / "module_calls").read_text().split("\n")[:2] == ["load python/3.10", "load cuda/11.8"]
    run_id = (store / "run_id.txt").read_text().strip()
    assert run_id == f"act_saetest_{job}"
    meta = read_meta(store, run_id)
    assert meta["status"] == "complete" and meta["n_tokens"] == reference["n_tokens"]
    assert provenance(store, run_id) == reference["provenance"]

    job2 = slurm_cluster.sbatch([TRAIN], cwd=job_dir, env=env)
    final = slurm_cluster.wait(job2, timeout=300)
    assert_completed(slurm_cluster, final, job_dir)
    sae_run = (store / "sae_run_id.txt").read_text().strip()
    assert sae_run == f"sae_saetest_{job2}"
    for name in ("model.pt", "history.json", "meta.json"):
        assert (store / "runs" / sae_run / name).exists(), name
    assert "step 2 (train SAE): finished" in logs(job_dir, f"sae_train_{job2}.out")


def submit_pipeline(cluster: SlurmCluster, args: list[str], cwd: Path, env: dict[str, str]) -> dict[str, str]:
    proc = cluster.run([PIPELINE, *args], cwd=cwd, env=env)
    out = dict(line.split("=", 1) for line in proc.stdout.split() if "=" in line)
    assert {"run_id", "sae_run_id", "capture_job", "train_job", "eval_job"} <= out.keys(), proc.stdout
    return out


def test_pipeline_chained_with_overrides(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """submit_pipeline.sh: capture, training after it, evaluation after that (afterok), one run id; #SBATCH lines
    overridden."""
    store = tmp_path / "store"
    env = base_env(tiny_model, store)
    overrides = ["--time=5", "--mem=1G", "--cpus-per-task=1"]
    ids = submit_pipeline(slurm_cluster, [*overrides, "--", *overrides], job_dir, env)
    cap, train = ids["capture_job"], ids["train_job"]
    pending = slurm_cluster.job(train)[0]
    assert pending.raw["Dependency"].startswith(f"afterok:{cap}"), pending.raw["Dependency"]
    evaluation = ids["eval_job"]
    assert slurm_cluster.job(evaluation)[0].raw["Dependency"].startswith(f"afterok:{train}")
    final = slurm_cluster.wait([cap, train, evaluation], timeout=400)
    assert_completed(slurm_cluster, final, job_dir)
    assert final[evaluation].raw["StartTime"] >= final[train].raw["EndTime"]
    for job in (cap, train):
        raw = final[job].raw
        assert (raw["TimeLimit"], raw["MinMemoryNode"], raw["NumCPUs"]) == ("00:05:00", "1G", "1"), raw
    assert final[train].raw["StartTime"] >= final[cap].raw["EndTime"]

    run_id, sae_run_id = ids["run_id"], ids["sae_run_id"]
    assert read_meta(store, run_id)["n_tokens"] == reference["n_tokens"]
    sae_meta = read_meta(store, sae_run_id)
    assert run_id in json.dumps(sae_meta)  # trained on the pipeline's own run, by id
    assert (store / "runs" / sae_run_id / "model.pt").exists()
    assert (store / "sae_run_id.txt").read_text().strip() == sae_run_id
    assert (store / "runs" / sae_run_id / "evaluation" / "metrics.json").exists()


def test_array_capture_then_training(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """A 4-task capture array fills one run with exactly the tokens of a single job; training waits for all 4."""
    store = tmp_path / "store"
    env = base_env(tiny_model, store)  # 200 docs, 25 per shard: 8 shards, 2 per task
    ids = submit_pipeline(slurm_cluster, ["--array=0-3"], job_dir, env)
    cap, train, evaluation = ids["capture_job"], ids["train_job"], ids["eval_job"]
    final = slurm_cluster.wait([cap, train, evaluation], timeout=500, expect_tasks=6)
    assert_completed(slurm_cluster, final, job_dir)
    tasks = {k: v for k, v in final.items() if k.startswith(f"{cap}_")}
    assert sorted(tasks) == [f"{cap}_{i}" for i in range(4)]
    assert final[train].raw["StartTime"] >= max(t.raw["EndTime"] for t in tasks.values())
    for i in range(4):
        assert f"array {cap}_{i}" in logs(job_dir, f"sae_save_activations_{cap}_{i}.out")

    run_id = ids["run_id"]
    meta = read_meta(store, run_id)
    assert meta["status"] == "complete" and meta["n_shards"] == 8
    assert meta["n_tokens"] == reference["n_tokens"]
    assert provenance(store, run_id) == reference["provenance"]
    assert (store / "run_id.txt").read_text().strip() == run_id
    assert (store / "runs" / ids["sae_run_id"] / "model.pt").exists()


def test_failing_capture_never_starts_training(slurm_cluster, tiny_model, job_dir, tmp_path):
    """A capture that fails (LAYER_NUM past the last layer) exits non-zero; training is cancelled, never run."""
    env = base_env(tiny_model, tmp_path / "store", LAYER_NUM="99")
    ids = submit_pipeline(slurm_cluster, [], job_dir, env)
    cap, train = ids["capture_job"], ids["train_job"]
    final = slurm_cluster.wait([cap, train], timeout=200)
    assert (final[cap].state, final[cap].exit_code) == ("FAILED", "2:0")
    assert final[train].state == "CANCELLED"
    assert final[train].raw["NodeList"] in ("", "(null)")  # never given a node: it never ran
    assert not list(job_dir.glob("sae_train_*"))
    assert [(r["JobState"], r["NodeCnt"]) for r in slurm_cluster.jobcomp_records(train)] == [("CANCELLED", "0")]
    err = (job_dir / f"sae_save_activations_{cap}.err").read_text().strip().splitlines()
    assert err[-1].startswith("[sae-slurm") and "FAILED" in err[-1] and "exited with code 2" in err[-1], err[-3:]
    assert any(line.startswith("error:") and "99" in line for line in err[-3:]), err[-3:]
    out = (job_dir / f"sae_save_activations_{cap}.out").read_text().strip().splitlines()
    assert "FAILED" in out[-1]


def test_usr1_mid_capture_requeues_and_resumes(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """SLURM's warning signal to one task of a capture array, mid-run: the shard in progress is finished, the task
    requeues itself, resumes from its next shard, and the run ends with exactly the tokens of an uninterrupted
    run. Python through the default `uv run`, so the signal goes script -> uv -> Python."""
    data = tmp_path / "sample_x5.jsonl"
    data.write_text(SAMPLE.read_text(encoding="utf-8") * 5, encoding="utf-8")
    store = tmp_path / "store"
    n_docs = 5 * N_SAMPLE
    env = base_env(
        tiny_model, store, HF_DATASET=str(data), DATA_LIMIT=str(n_docs), BATCH_SIZE_SAVE="1", DOCS_PER_SHARD="20"
    )
    del env["VENV"]
    job = slurm_cluster.sbatch(
        ["--array=0-1", "--output=sae_save_activations_%A_%a.out", "--error=sae_save_activations_%A_%a.err", CAPTURE],
        cwd=job_dir,
        env=env,
    )
    run_id = f"act_saetest_{job}"
    first_shard = store / "runs" / run_id / "batch_0" / "tokens" / "provenance.safetensors"  # task 0's first
    wait_for(first_shard.exists, 120, "task 0's first shard", poll=0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"])
    final = slurm_cluster.wait(job, timeout=300, expect_tasks=2)
    assert_completed(slurm_cluster, final, job_dir)
    assert final[f"{job}_0"].restarts >= 1 and final[f"{job}_1"].restarts == 0
    out = logs(job_dir, f"sae_save_activations_{job}_0.out")
    assert "got SIGUSR1" in out and "requeueing job" in out and "restart 1" in out
    assert "resuming run" in logs(job_dir, f"sae_save_activations_{job}_0.err")
    meta = read_meta(store, run_id)
    assert meta["status"] == "complete" and meta["n_shards"] == n_docs // 20
    assert meta["n_tokens"] == len(reference["expected"](n_docs))
    assert provenance(store, run_id) == reference["expected"](n_docs)
    assert (store / "run_id.txt").read_text().strip() == run_id


def test_usr1_mid_training_requeues_and_resumes(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """SLURM's warning signal mid-training: a checkpoint is written, the job requeues itself, resumes from the
    checkpoint under the same SAE run id and trains exactly as many steps and tokens as an uninterrupted run."""
    store = tmp_path / "store"
    shutil.copytree(reference["store"] / "runs" / "ref_all", store / "runs" / "ref_all")
    env = base_env(tiny_model, store, RUN_ID="ref_all", EPOCHS="4", BATCH_SIZE_TRAIN="8", PROGRESS_EVERY_SECONDS="1")
    job = slurm_cluster.sbatch([TRAIN], cwd=job_dir, env=env)
    # the uninterrupted reference, meanwhile, outside SLURM
    ref = subprocess.Popen(
        [str(REPO / ".venv" / "bin" / "python"), str(REPO / "02_train_sae.py"), "--sae_run_id", "ref_sae"],
        env={**env, "SAE_MODULES": ""},
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    err_log = job_dir / f"sae_train_{job}.err"
    wait_for(lambda: err_log.exists() and "tokens/s" in err_log.read_text(errors="replace"), 120, "training to start")
    time.sleep(1.0)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    final = slurm_cluster.wait(job, timeout=300)
    stdout, stderr = ref.communicate(timeout=300)
    assert ref.returncode == 0, stderr
    assert_completed(slurm_cluster, final, job_dir)
    assert final[job].restarts >= 1
    text = logs(job_dir, f"sae_train_{job}.*")
    assert "requeueing job" in text and "resumed from step" in text
    assert "\r" not in text and re.search(r"^train \S+: [\d,]+/[\d,]+ tok \(\d+\.\d%\), [\d,]+ tokens/s", text, re.M)
    got, want = read_meta(store, f"sae_saetest_{job}"), read_meta(store, "ref_sae")
    assert (got["total_steps"], got["tokens_trained"]) == (want["total_steps"], want["tokens_trained"])
    history = json.loads((store / "runs" / f"sae_saetest_{job}" / "history.json").read_text())
    assert len(history["epochs"]) == 4


def _trained_in(log: str, sweep_id: str) -> list[str]:
    """The member suffixes a task's log says it trained, in order."""
    return [
        line.split(f"Trained SAE {sweep_id}.")[1].split(":")[0] for line in log.splitlines() if "Trained SAE" in line
    ]


def test_sweep_split_over_an_array(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """TOP_K=4,8 SEED=1,2 (4 SAEs) through submit_train_sae.sh as a 2-task array: task t trains SAEs t and t+2 of
    the grid under one sweep id (the array's job id); the last task to finish completes sweep.json and points
    sae_run_id.txt to the sweep."""
    store = tmp_path / "store"
    shutil.copytree(reference["store"] / "runs" / "ref_all", store / "runs" / "ref_all")
    env = base_env(tiny_model, store, RUN_ID="ref_all", TOP_K="4,8", SEED="1,2", EPOCHS="1")
    job = slurm_cluster.sbatch(
        ["--array=0-1", "--output=sae_train_%A_%a.out", "--error=sae_train_%A_%a.err", TRAIN], cwd=job_dir, env=env
    )
    final = slurm_cluster.wait(job, timeout=400, expect_tasks=2)
    assert_completed(slurm_cluster, final, job_dir)
    sweep_id = f"sae_saetest_{job}"
    assert _trained_in(logs(job_dir, f"sae_train_{job}_0.out"), sweep_id) == ["L2.k4.x2.topk.s1", "L2.k8.x2.topk.s1"]
    assert _trained_in(logs(job_dir, f"sae_train_{job}_1.out"), sweep_id) == ["L2.k4.x2.topk.s2", "L2.k8.x2.topk.s2"]
    sweep = json.loads((store / "runs" / sweep_id / "sweep.json").read_text())
    assert sweep["status"] == "complete" and len(sweep["members"]) == 4
    for member in sweep["members"]:
        assert read_meta(store, member["sae_run_id"])["status"] == "complete"
        assert (store / "runs" / member["sae_run_id"] / "model.pt").is_file()
    assert (store / "sae_run_id.txt").read_text().strip() == sweep_id
    assert sorted(p.name for p in (store / "runs" / sweep_id).iterdir()) == [
        "frontier.png",
        "sweep.json",
    ]  # no checkpoints left


def test_pipeline_with_a_sweep_array(slurm_cluster, tiny_model, job_dir, tmp_path, reference):
    """submit_pipeline.sh with LAYER_NUM=1,2 and TOP_K=4,8, training as a 2-task array: one capture of both layers,
    then both training tasks (afterok on capture), then evaluation of the whole sweep after the whole training array,
    all under one run id and sweep id: it ends with the sweep's evaluation report and frontier."""
    store = tmp_path / "store"
    env = base_env(tiny_model, store, LAYER_NUM="1,2", TOP_K="4,8", EPOCHS="1")
    ids = submit_pipeline(slurm_cluster, ["--", "--array=0-1"], job_dir, env)
    cap, train, evaluation = ids["capture_job"], ids["train_job"], ids["eval_job"]
    assert slurm_cluster.job(evaluation)[0].raw["Dependency"].startswith(f"afterok:{train}")
    final = slurm_cluster.wait([cap, train], timeout=500, expect_tasks=3)
    assert_completed(slurm_cluster, final, job_dir)
    tasks = {k: v for k, v in final.items() if k.startswith(f"{train}_")}
    assert sorted(tasks) == [f"{train}_0", f"{train}_1"]
    assert min(t.raw["StartTime"] for t in tasks.values()) >= final[cap].raw["EndTime"]
    sweep_id = ids["sae_run_id"]
    shares = [_trained_in(logs(job_dir, f"sae_train_{train}_{t}.out"), sweep_id) for t in (0, 1)]
    assert [len(share) for share in shares] == [2, 2]  # each task trains its half of the grid
    assert sorted(shares[0] + shares[1]) == [f"L{layer}.k{k}.x2.topk.s42" for layer in (1, 2) for k in (4, 8)]
    sweep = json.loads((store / "runs" / sweep_id / "sweep.json").read_text())
    assert sweep["status"] == "complete" and sweep["activation_run_id"] == ids["run_id"]
    assert (store / "sae_run_id.txt").read_text().strip() == sweep_id
    evaluated = slurm_cluster.wait(evaluation, timeout=300)
    assert_completed(slurm_cluster, evaluated, job_dir)
    assert evaluated[evaluation].raw["StartTime"] >= max(t.raw["EndTime"] for t in tasks.values())
    # the evaluation job got the sweep's id: one report of both SAEs, the frontier, each SAE's own metrics
    report = json.loads((store / "runs" / sweep_id / "evaluation" / "sweep.json").read_text())
    assert report["sweep_id"] == sweep_id
    assert [(m["layer_num"], m["top_k"]) for m in report["members"]] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    assert (store / "runs" / sweep_id / "evaluation" / "frontier.png").read_bytes()[:4] == b"\x89PNG"
    for member in report["members"]:
        assert (store / "runs" / member["sae_run_id"] / "evaluation" / "metrics.json").is_file()
    assert f"Evaluated sweep {sweep_id}: 4 SAEs at 2 layer(s)" in logs(job_dir, f"sae_eval_{evaluation}.out")


def test_streamed_pipeline_trains_without_a_capture_then_evaluates(slurm_cluster, tiny_model, job_dir, tmp_path):
    """STREAM=1 submit_pipeline.sh: training starts at once (no capture to wait for), a small capture for step 3
    runs beside it, evaluation waits for both."""
    store = tmp_path / "store"
    env = base_env(tiny_model, store, STREAM="1", EVAL_CAPTURE_LIMIT="50", EPOCHS="1")
    ids = submit_pipeline(slurm_cluster, [], job_dir, env)
    cap, train, evaluation = ids["capture_job"], ids["train_job"], ids["eval_job"]
    assert "afterok" not in (slurm_cluster.job(train)[0].raw.get("Dependency") or "")
    waits = slurm_cluster.job(evaluation)[0].raw["Dependency"]
    assert f"afterok:{train}" in waits and f"afterok:{cap}" in waits, waits
    final = slurm_cluster.wait([cap, train, evaluation], timeout=400)
    assert_completed(slurm_cluster, final, job_dir)
    assert read_meta(store, ids["run_id"])["n_documents"] == 50  # the small capture, not the training's 200
    sae = read_meta(store, ids["sae_run_id"])
    assert sae["activation_run_id"] is None and sae["streamed"]["dataset"]["limit"] == 200
    assert "streamed from" in logs(job_dir, f"sae_train_{train}.*")
    metrics = json.loads((store / "runs" / ids["sae_run_id"] / "evaluation" / "metrics.json").read_text())
    assert metrics["activation_run_id"] == ids["run_id"]
