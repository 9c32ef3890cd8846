"""Near-duplicates among 64-bit perceptual hashes: multi-index hashing (Norouzi et al., 2012).

Two hashes at most `d` bits apart agree, on at least one of three slices of 21 or 22 bits, to
within `d // 3` bits (pigeonhole). The index keeps one direct-address table per slice: for
each slice value, the head of a chain through the kept hashes with that value. A query probes,
in each table, every value within `d // 3` bits of its own slice, follows the chains and
compares whole hashes; a batch of queries runs as a few numpy operations. A query's cost is
the number of probes (232 per slice at d = 6) plus the hashes in their chains, about N / 2**21
each: nearly flat up to millions of kept rows, where comparing against every kept hash grew
with N (quadratic in all).

Rows of one batch are checked against the index and then against the batch's earlier kept
rows, in order, so the first kept copy wins exactly as if rows came one by one.
"""

from __future__ import annotations

import itertools

import numpy as np

SLICES = ((0, 21), (21, 42), (42, 64))  # bit ranges of the three tables
MAX_DISTANCE = 12  # beyond it the probes per query grow past tens of thousands
_NONE = np.iinfo(np.int64).max


def _masks(width: int, radius: int) -> np.ndarray:
    """Every `width`-bit value with at most `radius` bits set: the XORs a probe applies."""
    masks = [0]
    for bits in range(1, radius + 1):
        masks += [sum(1 << b for b in chosen) for chosen in itertools.combinations(range(width), bits)]
    return np.array(masks, dtype=np.int64)


class HashIndex:
    """Kept hashes, searchable for the nearest one within `distance` bits."""

    def __init__(self, distance: int, capacity: int = 1 << 12):
        if not 0 <= distance <= MAX_DISTANCE:
            raise ValueError(f"distance must be within 0..{MAX_DISTANCE}, got {distance}")
        self.distance = distance
        radius = distance // len(SLICES)
        self.masks = [_masks(hi - lo, radius) for lo, hi in SLICES]
        self.heads = [np.full(1 << (hi - lo), -1, dtype=np.int32) for lo, hi in SLICES]
        self.hashes = np.zeros(capacity, dtype=np.uint64)
        self.next = [np.full(capacity, -1, dtype=np.int32) for _ in SLICES]
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def add(self, hashes: np.ndarray) -> None:
        """Append hashes; they get the next positions, in order."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        first, count = self.size, len(hashes)
        if not count:
            return
        self._reserve(first + count)
        self.hashes[first : first + count] = hashes
        positions = np.arange(first, first + count, dtype=np.int32)
        for table, (lo, hi) in enumerate(SLICES):
            keys = ((hashes >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)
            order = np.argsort(keys, kind="stable")
            keys, placed = keys[order], positions[order]
            starts_run = np.r_[True, keys[1:] != keys[:-1]]
            # Each hash links to the one before it with the same key, the first to the old head.
            previous = np.r_[-1, placed[:-1]].astype(np.int32)
            self.next[table][placed] = np.where(starts_run, self.heads[table][keys], previous)
            ends_run = np.r_[keys[1:] != keys[:-1], True]
            self.heads[table][keys[ends_run]] = placed[ends_run]
        self.size += count

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each query, the position of the nearest kept hash within `distance` bits and
        how far it is; position -1 where there is none. Ties go to the earliest kept."""
        queries = np.asarray(queries, dtype=np.uint64)
        best = np.full(len(queries), _NONE, dtype=np.int64)  # distance << 32 | position
        for table, (lo, hi) in enumerate(SLICES):
            keys = ((queries >> np.uint64(lo)) & np.uint64((1 << (hi - lo)) - 1)).astype(np.int64)
            probes = (keys[:, None] ^ self.masks[table][None, :]).ravel()
            owner = np.repeat(np.arange(len(queries)), len(self.masks[table]))
            node = self.heads[table][probes]
            while True:
                live = node >= 0
                node, owner = node[live], owner[live]
                if not node.size:
                    break
                apart = np.bitwise_count(self.hashes[node] ^ queries[owner]).astype(np.int64)
                close = apart <= self.distance
                np.minimum.at(best, owner[close], (apart[close] << 32) | node[close].astype(np.int64))
                node = self.next[table][node]
        found = best != _NONE
        return np.where(found, best & 0xFFFFFFFF, -1), np.where(found, best >> 32, -1)

    def keep_new(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Add the queries that have no kept hash within `distance` bits, in order (an earlier
        query of the batch counts as kept once added); for each query, the position it was
        kept at or matched, and the distance (-1 for a kept one)."""
        queries = np.asarray(queries, dtype=np.uint64)
        positions, distances = self.nearest(queries)
        within = np.bitwise_count(queries[:, None] ^ queries[None, :]).astype(np.int64)
        earlier_close = np.tril(within <= self.distance, k=-1)
        kept = positions < 0
        # Rows close to an earlier row of the batch depend on whether that one was kept: in order.
        for i in np.flatnonzero(earlier_close.any(axis=1)):
            candidates = np.flatnonzero(earlier_close[i] & kept)
            if not candidates.size:
                continue
            nearest = candidates[np.argmin(within[i, candidates])]
            if positions[i] < 0 or within[i, nearest] < distances[i]:
                kept[i], positions[i], distances[i] = False, -2 - nearest, within[i, nearest]  # resolved below
        new = np.flatnonzero(kept)
        positions[new], distances[new] = self.size + np.arange(len(new)), -1
        in_batch = positions <= -2
        positions[in_batch] = positions[-2 - positions[in_batch]]
        self.add(queries[new])
        return positions, distances

    def _reserve(self, size: int) -> None:
        if size <= len(self.hashes):
            return
        capacity = max(size, 2 * len(self.hashes))
        self.hashes = np.concatenate([self.hashes, np.zeros(capacity - len(self.hashes), dtype=np.uint64)])
        self.next = [np.concatenate([n, np.full(capacity - len(n), -1, dtype=np.int32)]) for n in self.next]
