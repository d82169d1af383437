"""Launch plans and configs: when attention splits its work, and how configs are pinned, cached and tuned.

Pure Python: these run without Triton's interpreter or a GPU.
"""

import json

import pytest

from medformer_kernels import configs
from medformer_kernels.attention_plan import MAX_SPLITS, bwd_candidates, fwd_candidates, make_plan, splits_for
from medformer_kernels.configs import ConfigCache, LaunchConfig, length_class

H200_SMS = 132


def _plan(b, h, nq, nk, d=64, sms=H200_SMS):
    return make_plan(fwd_candidates(d, nq)[0], bwd_candidates(d)[0], b * h, nq, nk, sms)


def test_latents_over_many_tokens_split_the_keys_and_add_dq_atomically():
    plan = _plan(8, 6, 64, 4096)
    query_programs = 48  # one 64-row block per head: a third of the SMs
    assert plan.kv_splits > 1 and query_programs * plan.kv_splits >= H200_SMS
    assert plan.dq_atomic and plan.q_splits == 1


def test_many_queries_over_few_keys_split_dkdv_over_queries():
    plan = _plan(8, 6, 4096, 64)
    assert plan.q_splits > 1
    assert plan.kv_splits == 1 and not plan.dq_atomic


@pytest.mark.parametrize("shape", [(32, 6, 197, 197), (4, 12, 4096, 4096), (32, 6, 64, 343)])
def test_shapes_that_fill_the_gpu_are_not_split(shape):
    plan = _plan(*shape)
    assert (plan.kv_splits, plan.q_splits, plan.dq_atomic) == (1, 1, False)


def test_short_loops_are_not_split():
    """Two heads of 64 latents over 64 tokens: few programs, but nothing long to split."""
    plan = _plan(1, 2, 64, 64)
    assert (plan.kv_splits, plan.q_splits, plan.dq_atomic) == (1, 1, False)


@pytest.mark.parametrize("programs,blocks", [(1, 1000), (1, 5), (10, 64), (65, 64)])
def test_splits_leave_each_range_two_blocks_and_stay_bounded(programs, blocks):
    splits = splits_for(programs, blocks, H200_SMS)
    assert 1 <= splits <= max(1, min(blocks // 2, MAX_SPLITS))


def test_query_blocks_fit_the_latent_count():
    """32 latents fill a 32-row tile instead of wasting half of a 64-row one."""
    assert fwd_candidates(64, 32)[0]["BLOCK_M"] == 32
    assert fwd_candidates(64, 64)[0]["BLOCK_M"] == 64
    assert fwd_candidates(64, 4096)[0]["BLOCK_M"] == 128


def test_length_classes():
    assert [length_class(n) for n in (1, 16, 17, 50, 64, 65, 4096, 4097)] == [16, 16, 32, 64, 64, 128, 4096, 8192]


def test_launch_config_round_trips_through_json():
    config = LaunchConfig.of(8, 3, BLOCK_M=128, BLOCK_N=64)
    assert LaunchConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert config.launch_options() == {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 3}
    assert config["BLOCK_N"] == 64


CANDIDATES = [LaunchConfig.of(4, 3, BLOCK_M=64), LaunchConfig.of(8, 3, BLOCK_M=128)]


@pytest.fixture
def cache_file(tmp_path, monkeypatch):
    path = tmp_path / "kernel_configs.json"
    monkeypatch.setenv(configs.CACHE_ENV, str(path))
    monkeypatch.delenv(configs.AUTOTUNE_ENV, raising=False)
    return path


def test_without_autotune_the_pinned_default_runs_and_nothing_is_timed(cache_file):
    def run(config):
        raise AssertionError("timed without autotune mode")

    assert ConfigCache().choose("k", CANDIDATES, run) == CANDIDATES[0]
    assert not cache_file.exists()


def test_autotune_times_once_writes_the_file_and_later_runs_read_it(cache_file, monkeypatch):
    monkeypatch.setenv(configs.AUTOTUNE_ENV, "1")
    timed = []
    monkeypatch.setattr(configs, "_fastest", lambda candidates, run: timed.append(1) or candidates[1])
    cache = ConfigCache()
    assert cache.choose("k", CANDIDATES, lambda config: None) == CANDIDATES[1]
    assert cache.choose("k", CANDIDATES, lambda config: None) == CANDIDATES[1]
    assert timed == [1]
    assert json.loads(cache_file.read_text())["k"] == CANDIDATES[1].to_json()

    monkeypatch.delenv(configs.AUTOTUNE_ENV)
    assert ConfigCache().choose("k", CANDIDATES) == CANDIDATES[1]  # a new process reads the tuned choice


def test_a_damaged_cache_file_falls_back_to_the_default(cache_file):
    cache_file.write_text("{not json")
    assert ConfigCache().choose("k", CANDIDATES) == CANDIDATES[0]
