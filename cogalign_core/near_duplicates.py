"""Near-duplicate search on 64-bit perceptual hashes: block-permutation tables, sub-quadratic.

The 64 bits are cut into ``B`` blocks. Two hashes within ``r`` bits differ in at most ``r`` blocks,
so at least ``k = B - r`` blocks are equal (pigeonhole). One table per choice of ``k`` blocks (Manku,
Jain & Das Sarma, "Detecting near-duplicates for web crawling", WWW 2007) groups the hashes by those
blocks with one sort; only hashes sharing a group are compared, with an exact popcount. Every pair
within ``r`` is found, so the result equals a brute-force search, at ``C(B, k) * n log n`` plus
about ``C(B, k) * n**2 / 2**(bits of k blocks)`` comparisons instead of ``n**2 / 2``. ``B`` is chosen
per ``n`` and ``r`` to minimise that cost; memory is ``O(n)`` plus one table's candidate pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import combinations
from math import comb, log2

import numpy as np

BITS = 64
PAIR_BLOCK = 1 << 22  # candidate pairs compared at once (bounds memory)


def hashes_from_hex(phashes: Sequence[str]) -> np.ndarray:
    """uint64 array of 16-hex-character hashes."""
    if len(phashes) == 0:
        return np.zeros(0, dtype=np.uint64)
    return np.frombuffer(bytes.fromhex("".join(phashes)), dtype=">u8").astype(np.uint64)


def plan_tables(n: int, max_distance: int) -> tuple[int, int]:
    """(blocks B, blocks per key k) minimising sort work plus expected candidate pairs for ``n`` hashes."""
    best: tuple[float, int, int] | None = None
    for blocks in range(max_distance + 1, min(BITS, max_distance + 12) + 1):
        k = blocks - max_distance
        key_bits = (BITS * k) // blocks  # the narrowest choice of k blocks
        tables = comb(blocks, k)
        if tables > 5000:
            break
        cost = tables * n * (1 + log2(max(n, 2))) + tables * n * n / 2.0 ** (key_bits + 1) * 4
        if best is None or cost < best[0]:
            best = (cost, blocks, k)
    if best is None:
        return 1, 0  # radius too large for tables: one table with an empty key (brute force)
    return best[1], best[2]


def _block_bounds(blocks: int) -> list[tuple[int, int]]:
    widths = [BITS // blocks + (1 if i < BITS % blocks else 0) for i in range(blocks)]
    shifts = np.cumsum([0, *widths[:-1]])
    return [(int(sh), w) for sh, w in zip(shifts, widths, strict=True)]


def _narrow(key: np.ndarray, bits: int) -> np.ndarray:
    """``key`` in the narrowest unsigned dtype for ``bits`` (16-bit keys sort by radix sort)."""
    for dtype, width in ((np.uint16, 16), (np.uint32, 32)):
        if bits <= width:
            return key.astype(dtype)
    return key


def _close_pairs(sorted_keys: np.ndarray, sorted_hashes: np.ndarray, max_distance: int
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(p, q) positions in the sorted order, p < q, with equal keys and hashes within ``max_distance``.

    Members of a group are contiguous: every position is paired with each later member of its group,
    generated without a Python loop, in slices of about ``PAIR_BLOCK`` pairs.
    """
    n = sorted_keys.size
    if n < 2:
        return
    starts = np.flatnonzero(np.concatenate(([True], sorted_keys[1:] != sorted_keys[:-1])))
    ends = np.append(starts[1:], n)
    group_end = np.repeat(ends, ends - starts)
    later = group_end - np.arange(n) - 1  # members after each position in its group
    positions = np.flatnonzero(later)
    if positions.size == 0:
        return
    counts = later[positions]
    bounds = np.searchsorted(np.cumsum(counts), np.arange(PAIR_BLOCK, int(counts.sum()) + PAIR_BLOCK, PAIR_BLOCK))
    lo = 0
    for hi in np.unique(np.append(bounds + 1, positions.size)):
        hi = int(min(hi, positions.size))
        if hi <= lo:
            continue
        pos, cnt = positions[lo:hi], counts[lo:hi]
        first = np.repeat(pos, cnt)
        offset = np.arange(first.size) - np.repeat(np.cumsum(cnt) - cnt, cnt) + 1
        second = first + offset
        close = np.bitwise_count(sorted_hashes[first] ^ sorted_hashes[second]) <= max_distance
        if close.any():
            yield first[close], second[close]
        lo = hi


def earliest_neighbours(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """For each i, the smallest j < i with popcount(h[i] ^ h[j]) <= max_distance, else -1 (int64 array)."""
    n = hashes.size
    best = np.full(n, n, dtype=np.int64)
    if n < 2:
        return np.full(n, -1, dtype=np.int64)
    blocks, k = plan_tables(n, max_distance)
    bounds = _block_bounds(blocks)
    for chosen in combinations(range(blocks), k):
        key = np.zeros(n, dtype=np.uint64)
        for b in chosen:
            shift, width = bounds[b]
            key = (key << np.uint64(width)) | ((hashes >> np.uint64(shift)) & np.uint64((1 << width) - 1))
        key = _narrow(key, sum(bounds[b][1] for b in chosen))
        order = np.argsort(key, kind="stable")
        for p, q in _close_pairs(key[order], hashes[order], max_distance):
            i, j = order[p], order[q]
            np.minimum.at(best, np.maximum(i, j), np.minimum(i, j))
    best[best == n] = -1
    return best


def probes_per_query(n: int, max_distance: int) -> int:
    """How many tables one search builds (for benchmarks and docs)."""
    blocks, k = plan_tables(n, max_distance)
    return comb(blocks, k)


def near_duplicate_clusters(sample_ids: Sequence[str], hashes: np.ndarray | Sequence[str],
                            max_distance: int) -> list[str]:
    """Cluster id per sample, for samples given in (batch order, sample_id) order.

    A sample joins the cluster of the *earliest* earlier sample within ``max_distance`` bits
    (Hamming on the 64-bit phash), else starts its own cluster named by its sample_id. A sample's
    cluster depends only on samples before it, so appending a batch never changes an existing
    cluster id (the price: a new image close to two existing clusters joins the earlier one and
    does not merge them).
    """
    h = hashes if isinstance(hashes, np.ndarray) else hashes_from_hex(list(hashes))
    ids = np.asarray(sample_ids, dtype=object)
    return ids[cluster_roots(h, max_distance)].tolist()


def cluster_roots(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """Index of each hash's cluster root (see :func:`near_duplicate_clusters`), int64."""
    nearest = earliest_neighbours(hashes, max_distance)
    cluster = np.arange(hashes.size, dtype=np.int64)
    for i in np.flatnonzero(nearest >= 0):  # in increasing i: the neighbour's cluster is final already
        cluster[i] = cluster[nearest[i]]
    return cluster
