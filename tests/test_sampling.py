"""MultiDatasetSampler: temperature convention, epochs, DDP shards, determinism, exact resume."""

import itertools
import json

import numpy as np
import pytest

from medformer_core.api.data import DatasetInfo, ImageSplit
from medformer_core.api.errors import UsageError
from medformer_core.engine.sampling import MultiDatasetSampler


def take(sampler, steps):
    return [(name, idx.tolist()) for name, idx in itertools.islice(sampler, steps)]


def test_probabilities_follow_size_to_the_one_over_temperature():
    sizes = {"big": 900, "small": 100}
    assert MultiDatasetSampler(sizes, 4, temperature=1.0).probabilities["big"] == pytest.approx(0.9)
    assert MultiDatasetSampler(sizes, 4, temperature=2.0).probabilities["big"] == pytest.approx(30 / 40)
    assert MultiDatasetSampler(sizes, 4, temperature=1e9).probabilities["big"] == pytest.approx(0.5)


def test_empirical_frequencies_match():
    sampler = MultiDatasetSampler({"a": 300, "b": 100}, 4, temperature=1.0, seed=1)
    names = [name for name, _ in take(sampler, 4000)]
    assert names.count("a") / len(names) == pytest.approx(0.75, abs=0.03)


def test_one_epoch_is_a_permutation_and_epochs_differ():
    sampler = MultiDatasetSampler({"a": 10}, 3)  # drop_last: 3 batches of 3 per epoch, 1 sample skipped
    first = [i for _, idx in take(sampler, 3) for i in idx]
    second = [i for _, idx in take(sampler, 3) for i in idx]
    assert len(set(first)) == 9 and len(set(second)) == 9 and first != second
    assert all(0 <= i < 10 for i in first + second)


def test_without_drop_last_every_sample_is_seen_in_even_batches():
    sampler = MultiDatasetSampler({"a": 10}, 3, drop_last=False)
    batches = take(sampler, 4)
    assert [len(idx) for _, idx in batches] == [2, 3, 2, 3]
    assert sorted(i for _, idx in batches for i in idx) == list(range(10))
    assert sampler.steps_per_epoch() == 4


def test_without_drop_last_ddp_ranks_get_the_same_batch_sizes():
    ranks = [MultiDatasetSampler({"a": 11}, 4, drop_last=False, rank=r, world_size=2) for r in range(2)]
    streams = [take(s, 2) for s in ranks]  # 11 padded to 12: 6 per rank, batches of 3 and 3
    assert [[len(idx) for _, idx in st] for st in streams] == [[3, 3], [3, 3]]
    seen = {i for st in streams for _, idx in st for i in idx}
    assert seen == set(range(11))


def test_ddp_ranks_pick_the_same_dataset_and_disjoint_shards():
    sizes = {"a": 60, "b": 31}
    ranks = [MultiDatasetSampler(sizes, 5, temperature=1.0, seed=3, rank=r, world_size=3) for r in range(3)]
    streams = [take(s, 40) for s in ranks]
    assert all([n for n, _ in st] == [n for n, _ in streams[0]] for st in streams)
    per_epoch = ranks[0].batches_per_epoch("a")  # 60 / 3 ranks / 5 = 4 batches
    assert per_epoch == 4
    seen = [[i for n, idx in st if n == "a" for i in idx][: per_epoch * 5] for st in streams]
    assert all(len(set(s)) == 20 for s in seen)
    assert set(seen[0]).isdisjoint(seen[1]) and set(seen[1]).isdisjoint(seen[2])
    assert set().union(*map(set, seen)) == set(range(60))


def test_seeded_and_deterministic():
    sizes = {"a": 50, "b": 20, "c": 7}
    assert take(MultiDatasetSampler(sizes, 4, 2.0, seed=5), 60) == take(MultiDatasetSampler(sizes, 4, 2.0, seed=5), 60)
    assert take(MultiDatasetSampler(sizes, 4, 2.0, seed=5), 60) != take(MultiDatasetSampler(sizes, 4, 2.0, seed=6), 60)


def test_resume_continues_exactly():
    sizes = {"a": 50, "b": 20, "c": 7}
    reference = MultiDatasetSampler(sizes, 4, 2.0, seed=9)
    expected = take(reference, 100)
    first = MultiDatasetSampler(sizes, 4, 2.0, seed=9)
    head = take(first, 37)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint
    resumed = MultiDatasetSampler(sizes, 4, 2.0, seed=9)
    resumed.load_state_dict(state)
    assert head + take(resumed, 63) == expected


def test_resume_with_other_settings_is_refused():
    state = MultiDatasetSampler({"a": 50}, 4, seed=1).state_dict()
    with pytest.raises(UsageError, match="its sizes was"):
        MultiDatasetSampler({"a": 51}, 4, seed=1).load_state_dict(state)
    with pytest.raises(UsageError, match="its batch_size was 4, this run has 8"):
        MultiDatasetSampler({"a": 50}, 8, seed=1).load_state_dict(state)


def test_accepts_splits_and_indices_fit_them():
    info = DatasetInfo("tiny", 2, 1, (4, 4))
    split = ImageSplit(info, np.zeros((9, 1, 4, 4), np.uint8), np.arange(9)[:, None])
    name, idx = next(MultiDatasetSampler({"tiny": split}, 4))
    assert name == "tiny" and idx.dtype == np.int64 and len(idx) == 4
    assert split.batch(idx)["image"].shape == (4, 1, 4, 4)


def test_bad_configurations():
    with pytest.raises(UsageError, match="'a' has 6 samples, 3 per rank: fewer than the batch size 4"):
        MultiDatasetSampler({"a": 6}, 4, world_size=2)
    with pytest.raises(UsageError, match="no dataset"):
        MultiDatasetSampler({}, 4)
    with pytest.raises(ValueError):
        MultiDatasetSampler({"a": 6}, 2, temperature=0.0)
    with pytest.raises(ValueError):
        MultiDatasetSampler({"a": 6}, 2, rank=2, world_size=2)
