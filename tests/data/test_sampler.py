"""Sampling by global position: determinism, epochs, and the same samples for any rank/accumulation split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from data.sampler import TokenWindows, eval_indices, sample_indices

SEQ_LEN = 8
TOKENS = np.arange(10 * SEQ_LEN + 5, dtype=np.uint16)  # 10 windows, 4 tokens left over


def _step_samples(windows, step, *, world_size, micro_batch, grad_accum):
    """Rows seen in one optimizer step, gathered over all ranks and micro-steps, as sorted tuples."""
    rows = []
    for micro_step in range(grad_accum):
        for rank in range(world_size):
            indices = sample_indices(step=step, micro_step=micro_step, rank=rank, world_size=world_size,
                                     micro_batch=micro_batch, grad_accum=grad_accum)
            assert len(indices) == micro_batch
            rows.extend(tuple(row) for row in windows.batch(indices).tolist())
    return sorted(rows)


def test_windows_are_non_overlapping_with_shifted_targets():
    windows = TokenWindows(TOKENS, SEQ_LEN, seed=0, shuffle=False)
    assert windows.num_windows == 10
    for index in range(windows.num_windows):
        window = windows.window(index)
        assert window.tolist() == list(range(index * SEQ_LEN, index * SEQ_LEN + SEQ_LEN + 1))
    # Stride seq_len: each window's last token (a target only) is the next window's first input.
    assert windows.window(0)[-1] == windows.window(1)[0]
    assert windows.window(10).tolist() == windows.window(0).tolist()  # epoch 1 wraps around


def test_batch_shape_dtype_and_matches_window():
    windows = TokenWindows(TOKENS, SEQ_LEN, seed=3)
    batch = windows.batch(range(5, 9))
    assert batch.dtype == torch.long and batch.shape == (4, SEQ_LEN + 1)
    for row, index in zip(batch, range(5, 9)):
        assert row.tolist() == windows.window(index).tolist()


def test_each_epoch_visits_every_window_once_in_a_new_order():
    windows = TokenWindows(TOKENS, SEQ_LEN, seed=7)
    orders = []
    for epoch in range(3):
        starts = [windows.window(epoch * 10 + i)[0] // SEQ_LEN for i in range(10)]
        assert sorted(starts) == list(range(10))
        orders.append(starts)
    assert orders[0] != orders[1] != orders[2]
    expected = np.random.default_rng([7, 1]).permutation(10).tolist()
    assert orders[1] == expected


def test_deterministic_across_instances_and_seed_dependent():
    indices = [0, 13, 4, 27, 9, 9]
    first = TokenWindows(TOKENS, SEQ_LEN, seed=11).batch(indices)
    again = TokenWindows(TOKENS, SEQ_LEN, seed=11)
    again.window(25)  # a cached later epoch must not change what earlier positions return
    assert torch.equal(first, again.batch(indices))
    other = TokenWindows(TOKENS, SEQ_LEN, seed=12).batch(range(10))
    assert not torch.equal(TokenWindows(TOKENS, SEQ_LEN, seed=11).batch(range(10)), other)


def test_too_short_corpus():
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenWindows(np.arange(SEQ_LEN, dtype=np.int32), SEQ_LEN, seed=0)
    assert TokenWindows(np.arange(SEQ_LEN + 1, dtype=np.int32), SEQ_LEN, seed=0).num_windows == 1


@pytest.mark.parametrize("step", [0, 1, 2, 7])
def test_ranks_and_accumulation_see_the_same_samples_per_step(step):
    windows = TokenWindows(TOKENS, SEQ_LEN, seed=5)
    reference = _step_samples(windows, step, world_size=1, micro_batch=8, grad_accum=1)
    assert len(reference) == 8
    for world_size, micro_batch, grad_accum in [(2, 4, 1), (1, 4, 2), (2, 2, 2), (4, 1, 2), (8, 1, 1)]:
        split = _step_samples(windows, step, world_size=world_size, micro_batch=micro_batch, grad_accum=grad_accum)
        assert split == reference, (world_size, micro_batch, grad_accum)


def test_positions_partition_the_run():
    seen = []
    for step in range(3):
        for micro_step in range(2):
            for rank in range(2):
                seen.extend(sample_indices(step=step, micro_step=micro_step, rank=rank, world_size=2,
                                           micro_batch=3, grad_accum=2))
    assert sorted(seen) == list(range(3 * 12))
    assert list(sample_indices(step=1, micro_step=1, rank=0, world_size=2, micro_batch=3, grad_accum=2)) == [18, 19, 20]


def test_sample_indices_rejects_bad_positions():
    with pytest.raises(ValueError):
        sample_indices(step=0, micro_step=0, rank=2, world_size=2, micro_batch=1, grad_accum=1)
    with pytest.raises(ValueError):
        sample_indices(step=0, micro_step=1, rank=0, world_size=1, micro_batch=1, grad_accum=1)
    with pytest.raises(ValueError):
        sample_indices(step=-1, micro_step=0, rank=0, world_size=1, micro_batch=1, grad_accum=1)


def test_eval_indices_disjoint_across_ranks_and_wrap():
    per_rank = [set(eval_indices(batch_index=b, rank=r, world_size=2, micro_batch=3))
                for b in range(2) for r in range(2)]
    assert set().union(*per_rank) == set(range(12)) and sum(map(len, per_rank)) == 12
    windows = TokenWindows(TOKENS, SEQ_LEN, seed=0, shuffle=False)
    # Position 12 of a 10-window split wraps to window 2.
    assert windows.batch(eval_indices(batch_index=2, rank=0, world_size=2, micro_batch=3))[0, 0] == 2 * SEQ_LEN
