"""sweep.py: the grid and its order, member ids, a task's share, the layers chosen, the memory estimate's verdicts."""

from __future__ import annotations

import pytest

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.lm.layers import LayerSpec
from sae_pipeline.sae.sweep import (
    GIB,
    MemoryEstimate,
    SaeSpec,
    build_grid,
    member_ids,
    seed_groups,
    select_layers,
    task_share,
)
from sae_pipeline.settings import TrainSettings

L8 = LayerSpec("llamaforcausallm_model_layers_8_post_attention_layernorm", 64, "model.layers.8.x", 8)
L16 = LayerSpec("llamaforcausallm_model_layers_16_post_attention_layernorm", 64, "model.layers.16.x", 16)


def _settings(**kw) -> TrainSettings:
    return TrainSettings(device="cpu", **kw)


def test_grid_order_and_ids_follow_the_settings():
    s = _settings(top_k=(16, 32), seed=(1, 2), n_latents_multiplier=(4, 8))
    grid = build_grid(s, [L8, L16])
    assert len(grid) == 2 * 2 * 2 * 2
    assert [(g.layer.layer_num, g.n_latents_multiplier, g.top_k, g.seed) for g in grid[:5]] == [
        (8, 4, 16, 1),
        (8, 4, 16, 2),
        (8, 4, 32, 1),
        (8, 4, 32, 2),
        (8, 8, 16, 1),
    ]
    ids = member_ids("sw", grid, s)
    assert ids[0] == "sw.L8.k16.x4.topk.s1" and ids[-1] == "sw.L16.k32.x8.topk.s2"
    assert len(set(ids)) == len(ids)
    assert member_ids("one", build_grid(_settings(), [L16]), _settings()) == ["one"]  # one SAE: the plain id


def test_ids_name_the_learning_rate_only_when_it_varies_and_the_signature_when_numbers_clash():
    s = _settings(lr=(1e-3, 6e-3))
    assert member_ids("sw", build_grid(s, [L8]), s) == ["sw.L8.k8.x4.topk.s42.lr0.001", "sw.L8.k8.x4.topk.s42.lr0.006"]
    other = LayerSpec("llamaforcausallm_model_layers_8_mlp", 64, None, 8)  # another module of block 8
    s2 = _settings()
    assert member_ids("sw", build_grid(s2, [L8, other]), s2) == [
        f"sw.{L8.signature}.k8.x4.topk.s42",
        "sw.llamaforcausallm_model_layers_8_mlp.k8.x4.topk.s42",
    ]


def test_top_k_of_any_member_is_checked_against_its_latents():
    with pytest.raises(PipelineError, match=r"TOP_K=256 is not valid: use 1\.\.255 .* x N_LATENTS_MULTIPLIER 4\)"):
        build_grid(_settings(top_k=(8, 256), n_latents_multiplier=(4, 8)), [L8])


def test_task_share_strides_over_the_grid():
    assert task_share(6, 0, 3) == [0, 3] and task_share(6, 2, 3) == [2, 5]
    assert task_share(2, 3, 4) == []
    assert sorted(i for t in range(4) for i in task_share(10, t, 4)) == list(range(10))


def test_layers_default_to_the_run_and_an_explicit_subset_must_be_in_it(monkeypatch):
    assert select_layers(_settings(), [L8, L16], "r") == [L8, L16]
    assert select_layers(_settings(layer_num=(16,)), [L8, L16], "r") == [L16]
    assert select_layers(_settings(layer_signature=(L8.signature,)), [L8, L16], "r") == [L8]
    with pytest.raises(PipelineError, match=r"LAYER_NUM=16,24 is not valid: activation run 'r' holds LAYER_NUM 8, 16"):
        select_layers(_settings(layer_num=(16, 24)), [L8, L16], "r")


def _estimate(n_saes: int, latents: int = 16384, d: int = 2048, batch: int = 4096) -> MemoryEstimate:
    spec = SaeSpec(LayerSpec("x", d), latents // d, 32, "topk", 1e-3, 0)
    return MemoryEstimate.of([spec] * n_saes, batch, host=2 * GIB, staging=0, device_is_host=False)


def test_memory_estimate_fits_or_says_how_many_array_tasks_would():
    one = _estimate(1)
    assert one.states == 16 * (2 * 16384 * 2048 + 16384 + 2048) + 24 * 16384  # float32 x (param, grad, 2 Adam)
    assert one.batch == 4 * 10 * 4096 * 16384
    free = one.batch + 3 * one.states + one.states // 2  # room for 3.5 SAEs
    _estimate(3).check(free, 64 * GIB, "cuda:0", 1)  # fits: no error
    with pytest.raises(PipelineError) as info:
        _estimate(12).check(free, 64 * GIB, "cuda:0", 1)
    message = str(info.value)
    assert message.startswith("the 12 SAE(s) this process trains need about") and "on cuda:0" in message
    assert "SLURM array of 4 tasks (sbatch --array=0-3 submit_train_sae.sh)" in message and "\n" not in message
    with pytest.raises(PipelineError, match="SLURM array of 8 tasks"):  # already a task of 2: 4 x 2
        _estimate(12).check(free, 64 * GIB, "cuda:0", 2)
    with pytest.raises(PipelineError, match="lower BATCH_SIZE_TRAIN, N_LATENTS_MULTIPLIER"):  # one SAE alone
        _estimate(1).check(one.batch, 64 * GIB, "cuda:0", 1)
    with pytest.raises(PipelineError, match=r"on the host .* lower BATCH_SIZE_TRAIN"):  # loader buffers
        _estimate(1).check(10 * one.device, GIB, "cuda:0", 1)


def test_seed_groups_average_over_seeds_only():
    """Members differing only in SEED form a group (mean, sample std); a null for any seed makes the group null;
    a single seed has no std; other values (k, layer) separate groups, in grid order."""
    base = dict(layer_signature="L", layer_num=2, n_latents_multiplier=4, architecture="topk", lr=1e-3)
    members = [
        {**base, "top_k": 8, "seed": 1, "fvu": 0.2, "ce": 0.9},
        {**base, "top_k": 8, "seed": 2, "fvu": 0.4, "ce": None},
        {**base, "top_k": 16, "seed": 1, "fvu": 0.1, "ce": 0.95},
        {**base, "top_k": 8, "seed": 3, "fvu": 0.3, "ce": 0.8, "layer_num": 5, "layer_signature": "M"},
    ]
    groups = seed_groups(members, ("fvu", "ce"))
    assert [(g["top_k"], g["layer_num"], g["seeds"], g["n_seeds"]) for g in groups] == [
        (8, 2, [1, 2], 2),
        (16, 2, [1], 1),
        (8, 5, [3], 1),
    ]
    assert groups[0]["fvu"]["mean"] == pytest.approx(0.3) and groups[0]["fvu"]["std"] == pytest.approx(0.1414, 1e-3)
    assert groups[0]["ce"] == {"mean": None, "std": None}
    assert groups[1]["fvu"] == {"mean": 0.1, "std": None} and groups[1]["ce"]["mean"] == 0.95
