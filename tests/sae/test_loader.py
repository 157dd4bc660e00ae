"""The shuffled loader: every training token exactly once per epoch, new order each epoch, seeded, resumable."""

import pytest
import torch

from sae_pipeline.infra.errors import PipelineError
from sae_pipeline.sae.loader import TokenLoader
from tests.sae_fixtures import LAYER, make_run

SIZES = (700, 500, 900, 400, 300)


@pytest.fixture
def run(tmp_path):
    n = sum(SIZES)
    ids = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 8)  # column 0 = global token id
    return make_run(tmp_path, shard_sizes=SIZES, d=8, tokens=ids)


def _loader(run, seed=0, batch=128, buffer=1500, holdout=0.1):
    return TokenLoader(run, LAYER, 8, batch, holdout, seed, buffer)


def _ids(batches):
    return torch.cat([b[:, 0] for b in batches]).long()


def test_every_training_token_exactly_once_per_epoch_and_holdout_disjoint(run):
    loader = _loader(run)
    held = _ids(loader.iter_holdout(100))
    # the held-out slice is the last 10% of every shard
    starts = torch.tensor((0,) + SIZES).cumsum(0)
    expected_held = torch.cat([torch.arange(s + n - round(n * 0.1), s + n) for s, n in zip(starts, SIZES)])
    assert torch.equal(held, expected_held)
    for epoch in range(3):
        batches = list(loader.iter_epoch(epoch))
        assert len(batches) == loader.steps_per_epoch
        assert all(b.shape[0] == 128 for b in batches[:-1]) and 0 < batches[-1].shape[0] <= 128
        seen = _ids(batches)
        assert seen.numel() == loader.n_train == sum(SIZES) - held.numel()
        assert seen.unique().numel() == seen.numel()  # no duplicates
        assert not set(seen.tolist()) & set(held.tolist())  # never trains on held-out tokens


def test_order_changes_between_epochs_and_mixes_shards(run):
    loader = _loader(run)
    e0, e1 = _ids(loader.iter_epoch(0)), _ids(loader.iter_epoch(1))
    assert not torch.equal(e0, e1)
    assert not torch.equal(e0, e0.sort().values)
    starts = torch.tensor((0,) + SIZES).cumsum(0)
    shard_of_first_batch = torch.bucketize(e0[:128], starts[1:], right=True)
    assert shard_of_first_batch.unique().numel() > 1  # one batch draws from several shards


def test_seed_reproduces_and_another_seed_differs(run):
    a = _ids(_loader(run, seed=3).iter_epoch(2))
    b = _ids(_loader(run, seed=3).iter_epoch(2))
    c = _ids(_loader(run, seed=4).iter_epoch(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("world", [1, 2])
def test_a_remainder_of_a_few_tokens_joins_the_last_step_on_every_rank(run, world):
    """A step of one token would have no variance to normalise its FVU by (the SAE's weights would go NaN)."""
    n_train = _loader(run).n_train
    batch = 2 * ((n_train - 1) // 4)  # two full steps, then 1 to 4 tokens
    for rank in range(world):
        loader = TokenLoader(run, LAYER, 8, batch, 0.1, 0, 1500, rank, world)
        batches = list(loader.iter_epoch(0))
        assert loader.steps_per_epoch == len(batches) == 2
        assert batches[0].shape[0] == batch // world < batches[1].shape[0] <= (batch + 4) // world
        rest = list(loader.iter_epoch(0, start_step=1))
        assert len(rest) == 1 and torch.equal(rest[0], batches[1])
    every_rank = [TokenLoader(run, LAYER, 8, batch, 0.1, 0, 1500, r, world).iter_epoch(0) for r in range(world)]
    assert sum(_ids(list(b)).numel() for b in every_rank) == n_train


# (shard sizes, SHUFFLE_BUFFER_TOKENS, batch, world size): a smaller last group, one shard per group, several shards
# per group, groups of each rank's range; batches that do and do not divide the groups
RESUME_LAYOUTS = {
    "smaller-last-group": ((300, 950, 950, 700, 350), 1000, 256, 1),
    "one-shard-per-group": ((300, 500, 900, 400, 300), 10, 100, 1),
    "several-shards-per-group": ((120, 80, 200, 90, 150, 60, 110), 400, 64, 1),
    "group-per-rank-2": ((300, 950, 950, 700, 350), 700, 128, 2),
    "group-per-rank-3": ((150, 260, 440, 205, 165, 300, 220), 250, 96, 3),
}


@pytest.mark.parametrize("layout", sorted(RESUME_LAYOUTS))
def test_a_resume_at_any_step_of_any_epoch_replays_exactly_the_rest(tmp_path, layout):
    """What a killed and resumed run trains on: from every start step of several epochs, the very batches the
    uninterrupted epoch yields from that step on, for every rank, whatever the groups look like."""
    sizes, buffer, batch, world = RESUME_LAYOUTS[layout]
    ids = torch.arange(sum(sizes), dtype=torch.float32)[:, None].repeat(1, 8)
    run = make_run(tmp_path, shard_sizes=sizes, d=8, tokens=ids)
    for rank in range(world):
        loader = TokenLoader(run, LAYER, 8, batch, 0.1, 0, buffer, rank, world)
        group_sizes = [sum(p.n_train for p in g) for g in loader.groups(0)]
        assert len(group_sizes) > 1
        for epoch in range(3):
            full = list(loader.iter_epoch(epoch))
            assert len(full) == loader.steps_per_epoch
            for start in range(len(full) + 1):
                rest = list(loader.iter_epoch(epoch, start_step=start))
                assert len(rest) == len(full) - start, (rank, epoch, start)
                for step, (a, b) in enumerate(zip(rest, full[start:])):
                    assert torch.equal(a, b), (rank, epoch, start, step)


def test_memory_is_bounded_by_the_shuffle_buffer(run):
    loader = _loader(run, buffer=1000)
    for epoch in range(3):
        for group in loader.groups(epoch):
            assert len(group) == 1 or sum(s.n_train for s in group) <= 1000
    # a buffer smaller than a shard still works: one shard per group
    small = _loader(run, buffer=10)
    assert all(len(g) == 1 for g in small.groups(0))
    assert _ids(small.iter_epoch(0)).sort().values.tolist() == _ids(loader.iter_epoch(0)).sort().values.tolist()


def test_bf16_shards_and_sample(tmp_path):
    run = make_run(tmp_path, shard_sizes=(300, 200), d=16, dtype=torch.bfloat16)
    loader = TokenLoader(run, LAYER, 16, 64, 0.2, 0, 10_000)
    batch = next(loader.iter_epoch(0))
    assert batch.dtype == torch.bfloat16 and batch.shape == (64, 16)
    assert loader.sample(100).shape == (100, 16)


def test_bad_inputs_are_named(run, tmp_path):
    with pytest.raises(PipelineError, match="HOLDOUT_FRACTION"):
        _loader(run, holdout=0.6)
    with pytest.raises(PipelineError, match="HOLDOUT_FRACTION"):
        _loader(run, holdout=0.0)
    shard = run.shard_dir(2) / LAYER / "activations.safetensors"
    shard.write_bytes(shard.read_bytes()[:100])  # truncated
    with pytest.raises(PipelineError, match="batch_2"):
        list(_loader(run).iter_epoch(0))
    tiny = make_run(tmp_path / "tiny", shard_sizes=(3,), d=8)
    with pytest.raises(PipelineError, match="too few"):
        TokenLoader(tiny, LAYER, 8, 4, 0.1, 0, 100)
