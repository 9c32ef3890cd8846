"""Ray Data blocks of a set number of rows, from operators that emit many rows at once."""

from __future__ import annotations

import ray.data


def in_blocks(dataset: ray.data.Dataset, rows_per_block: int, num_cpus: float) -> ray.data.Dataset:
    """`dataset`'s rows cut into blocks of `rows_per_block` as they stream out of its last
    operator (a reader of a whole chunk or listing combines its output into blocks of up to
    128 MiB, which would reach the next stage as one task's work).

    Ray Data's streaming repartition runs tasks of a whole CPU and takes no resource options:
    beside actors holding the CPUs they would never run (the silent deadlock), so its tasks get
    `num_cpus` on the operator it has just made, which no other dataset shares.
    """
    dataset = dataset.repartition(target_num_rows_per_block=rows_per_block)
    object.__setattr__(dataset._logical_plan.dag, "ray_remote_args", {"num_cpus": num_cpus})
    return dataset
