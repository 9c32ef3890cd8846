"""The near-duplicate index finds what comparing with every kept hash finds, first kept wins."""

from __future__ import annotations

import numpy as np
import pytest

from pixfleet.annotation.dedupe import MAX_DISTANCE, HashIndex


def with_near_copies(n: int, seed: int) -> np.ndarray:
    """n random hashes and n copies of them with up to 6 bits flipped, shuffled."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**63, n, dtype=np.uint64) | (rng.integers(0, 2, n, dtype=np.uint64) << np.uint64(63))
    near = base.copy()
    for i in range(n):
        for bit in rng.choice(64, int(rng.integers(0, 7)), replace=False):
            near[i] ^= np.uint64(1) << np.uint64(int(bit))
    return np.concatenate([base, near])[rng.permutation(2 * n)]


def brute_force(hashes: np.ndarray, distance: int) -> list[tuple[int, int]]:
    """(position kept at or matched, bits apart or -1) per hash, comparing with every kept one."""
    kept, out = [], []
    for value in hashes:
        if kept:
            apart = np.bitwise_count(np.array(kept, dtype=np.uint64) ^ value)
            nearest = int(np.argmin(apart))
            if apart[nearest] <= distance:
                out.append((nearest, int(apart[nearest])))
                continue
        out.append((len(kept), -1))
        kept.append(value)
    return out


@pytest.mark.parametrize(("distance", "batch"), [(0, 7), (4, 64), (6, 256), (9, 1), (MAX_DISTANCE, 100)])
def test_batches_find_what_one_by_one_comparison_finds(distance, batch):
    hashes = with_near_copies(600, seed=distance)
    index, found = HashIndex(distance), []
    for start in range(0, len(hashes), batch):
        positions, apart = index.keep_new(hashes[start : start + batch])
        found += [(int(p), int(d)) for p, d in zip(positions, apart, strict=True)]
    expected = brute_force(hashes, distance)
    assert [d for _, d in found] == [d for _, d in expected]
    kept = [p for p, d in found if d < 0]
    assert kept == list(range(len(kept))) == list(range(len(index)))
    # A match names a kept hash that close (the nearest; ties may name another at that distance).
    for value, (position, bits) in zip(hashes, found, strict=True):
        assert bits < 0 or int(np.bitwise_count(index.hashes[position] ^ value)) == bits


def test_a_copy_within_one_batch_matches_the_earlier_row_of_that_batch():
    index = HashIndex(4)
    positions, apart = index.keep_new(np.array([0b1111, 0b1110, 1 << 40], dtype=np.uint64))
    assert positions.tolist() == [0, 0, 1] and apart.tolist() == [-1, 1, -1]


def test_a_radius_the_index_cannot_search_is_refused():
    with pytest.raises(ValueError, match=r"distance must be within 0\.\.12"):
        HashIndex(13)
