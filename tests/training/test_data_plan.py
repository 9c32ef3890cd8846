"""The training data plan: which rows each rank trains on, epoch by epoch, fixed by the seed."""

from __future__ import annotations

import numpy as np

from pixfleet.training.data import DataPlan


def test_each_epoch_deals_a_fresh_shuffle_to_the_ranks_in_whole_batches():
    plan = DataPlan(num_rows=26, world_size=2, batch_size=4, seed=7)
    assert plan.batches_per_epoch == 3  # 13 rows a rank: 3 whole batches, one row left over
    epochs = [[plan.rows(rank, epoch * 3, 3) for rank in range(2)] for epoch in range(3)]
    for ranks in epochs:
        seen = np.concatenate(ranks)
        assert len(seen) == 24 and len(set(seen.tolist())) == 24  # no row twice in an epoch
    assert not np.array_equal(epochs[0][0], epochs[1][0])  # reshuffled every epoch
    assert not np.array_equal(epochs[0][0], epochs[0][1])  # ranks differ


def test_a_run_started_at_any_batch_continues_the_same_sequence():
    plan = DataPlan(num_rows=40, world_size=2, batch_size=4, seed=0)
    whole = plan.rows(1, 0, 12)
    np.testing.assert_array_equal(np.concatenate([plan.rows(1, 0, 7), plan.rows(1, 7, 5)]), whole)
    np.testing.assert_array_equal(DataPlan(40, 2, 4, 0).rows(1, 0, 12), whole)  # the seed fixes it
    assert not np.array_equal(DataPlan(40, 2, 4, 1).rows(1, 0, 12), whole)
