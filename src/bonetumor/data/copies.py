"""Which file copies which: the audit's pairs as ``duplicates.csv`` and each image's duplicate
cluster as ``clusters.csv``, so that a user can see the copies and clean the data.

Three kinds of pair: ``exact`` (the same bytes, or for a slice the same pixels), ``near`` (64-bit
perceptual hashes within the audit's threshold and correlated thumbnails; ``distance`` is the
number of differing hash bits) and ``same-source`` (an export tool's renamed files that keep the
same source name). A group of k identical files is listed as k - 1 pairs against its first file,
not all k(k-1)/2. Clusters are the connected components of all pairs (scipy's csgraph).
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from typing import Sequence

import numpy as np

NEAR_THRESHOLD = 6  # of 64 pHash bits; re-encoded or slightly resized copies differ by 0-4
# Scans of one body part look alike, so distinct images can share a pHash within a few bits;
# a candidate pair must also correlate this well on 32x32 thumbnails to count as a near copy
# (distinct synthetic slices, even of one patient, reach 0.93; re-encoded copies exceed 0.99).
NEAR_CORRELATION = 0.97

PAIR_FIELDS = ("file_a", "split_a", "file_b", "split_b", "kind", "distance")
CLUSTER_FIELDS = ("file", "split", "label", "cluster", "cluster_size", "splits_in_cluster")


def copy_pairs(samples: Sequence, facts: Sequence, near: Sequence[tuple[int, int]],
               source_name) -> list[tuple[int, int, str, int | None]]:
    """(i, j, kind, distance) for every exact, near and same-source pair (indices into ``samples``)."""
    pairs: list[tuple[int, int, str, int | None]] = []
    by_sha: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(facts):
        if f.error is None:
            by_sha[f.sha256].append(i)
    for group in by_sha.values():
        pairs += [(group[0], j, "exact", 0) for j in group[1:]]
    for i, j in near:
        if facts[i].sha256 != facts[j].sha256:
            pairs.append((i, j, "near", int(np.bitwise_count(np.uint64(facts[i].phash) ^ np.uint64(facts[j].phash)))))
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(samples):
        name = source_name(s.path)
        if name:
            by_source[name].append(i)
    listed = {(min(i, j), max(i, j)) for i, j, _, _ in pairs}
    for group in by_source.values():
        pairs += [(group[0], j, "same-source", None) for j in group[1:] if (min(group[0], j), max(group[0], j)) not in listed]
    return pairs


def pair_rows(samples: Sequence, pairs: Sequence[tuple[int, int, str, int | None]]) -> list[dict]:
    """``duplicates.csv``'s rows: cross-split pairs first (the ones that inflate held-out figures)."""
    rows = [{"file_a": samples[i].ref, "split_a": samples[i].split or "", "file_b": samples[j].ref,
             "split_b": samples[j].split or "", "kind": kind, "distance": "" if d is None else d}
            for i, j, kind, d in pairs]
    return sorted(rows, key=lambda r: (r["split_a"] == r["split_b"], r["kind"], r["file_a"], r["file_b"]))


def cluster_rows(samples: Sequence, pairs: Sequence[tuple[int, int, str, int | None]]) -> list[dict]:
    """``clusters.csv``'s rows: every image with its cluster (numbered largest first; an image with
    no copy is a cluster of one) and the splits its cluster spans."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(samples)
    i = np.array([p[0] for p in pairs], dtype=int)
    j = np.array([p[1] for p in pairs], dtype=int)
    _, comp = connected_components(coo_matrix((np.ones(len(pairs)), (i, j)), shape=(n, n)), directed=False)
    sizes = np.bincount(comp)
    order = sorted(range(len(sizes)), key=lambda c: (-sizes[c], c))
    number = {c: k + 1 for k, c in enumerate(order)}
    spans: dict[int, set] = defaultdict(set)
    for s, c in zip(samples, comp):
        spans[c].add(s.split or "")
    return [{"file": s.ref, "split": s.split or "", "label": s.label, "cluster": number[c], "cluster_size": int(sizes[c]),
             "splits_in_cluster": "+".join(sorted(spans[c]))} for s, c in zip(samples, comp)]


def near_pairs(fa: list, fb: list, threshold: int, same: bool) -> list[tuple[int, int]]:
    """Index pairs (i in fa, j in fb) of near copies: 64-bit pHashes within ``threshold`` bits
    and thumbnails correlated at least NEAR_CORRELATION. ``same``: fa is fb, pairs with i < j.

    The hashes go into faiss's multi-index hash (four tables of 16 bits): two hashes within
    ``threshold`` bits differ by at most ``threshold // 4`` bits in one of their four quarters
    (pigeonhole), so probing each quarter with that many flipped bits finds every pair, exactly
    as comparing all pairs would, while the work grows with the images and their near pairs
    rather than with the square of the images."""
    if not fa or not fb:
        return []
    import faiss

    a, b = _codes(fa), _codes(fb)
    index = faiss.IndexBinaryMultiHash(64, 4, 16)
    index.nflip = threshold // 4
    index.add(b)
    qi, qj = [], []
    for start in range(0, len(a), 16384):  # bounded result buffers
        lims, _, ids = index.range_search(a[start:start + 16384], threshold + 1)  # faiss: distance < radius
        qi.append(np.repeat(np.arange(start, start + len(lims) - 1), np.diff(lims).astype(np.int64)))
        qj.append(ids.astype(np.int64))
    i, j = np.concatenate(qi), np.concatenate(qj)
    if same:
        i, j = i[i < j], j[i < j]
    keep = _correlations(fa, fb, i, j) >= NEAR_CORRELATION
    order = np.lexsort((j[keep], i[keep]))
    return [(int(x), int(y)) for x, y in zip(i[keep][order], j[keep][order])]


def _codes(facts: list) -> np.ndarray:
    """The facts' pHashes as faiss's binary codes (n x 8 bytes)."""
    return np.array([f.phash for f in facts], dtype=np.uint64).view(np.uint8).reshape(-1, 8)


def _correlations(fa: list, fb: list, i: np.ndarray, j: np.ndarray, chunk: int = 4096) -> np.ndarray:
    """Pearson correlation of the thumbnails of each pair (fa[i], fb[j]), in bounded chunks (a
    constant thumbnail correlates 1 with another constant one, 0 with anything else)."""
    out = np.empty(len(i), dtype=np.float64)
    for start in range(0, len(i), chunk):
        x = np.stack([fa[k].thumb for k in i[start:start + chunk]]).astype(np.float64)
        y = np.stack([fb[k].thumb for k in j[start:start + chunk]]).astype(np.float64)
        x -= x.mean(1, keepdims=True)
        y -= y.mean(1, keepdims=True)
        nx, ny = np.linalg.norm(x, axis=1), np.linalg.norm(y, axis=1)
        both = (nx > 0) & (ny > 0)
        r = np.where(both, (x * y).sum(1) / np.where(both, nx * ny, 1), (nx == ny).astype(np.float64))
        out[start:start + len(r)] = r
    return out


# The last search's facts (weakly: a scan is not kept alive for this), threshold and pairs.
# ``--split-by cluster`` groups copies, then the audit counts them, in the same scan.
_last_search: dict = {}


def all_near_pairs(facts: list, threshold: int) -> list[tuple[int, int]]:
    """Every near-copy pair (i < j, indices into ``facts``) among the readable images, found once
    and then read by the duplicate and the label-conflict counts, and by cluster splitting; asked
    again for the same facts in the same order, the pairs already found."""
    seen = _last_search.get("facts")
    if (_last_search.get("threshold") == threshold and seen is not None and len(seen) == len(facts)
            and all(ref() is f for ref, f in zip(seen, facts))):
        return list(_last_search["pairs"])
    ok = [i for i, f in enumerate(facts) if f.error is None]
    pairs = [(ok[i], ok[j]) for i, j in near_pairs([facts[i] for i in ok], [facts[i] for i in ok], threshold, True)]
    _last_search.update(facts=[weakref.ref(f) for f in facts], threshold=threshold, pairs=pairs)
    return list(pairs)
