"""The near-copy search: the hash index finds exactly the pairs that comparing all pairs finds."""

from dataclasses import dataclass

import numpy as np
import pytest

from bonetumor.data.copies import NEAR_CORRELATION, NEAR_THRESHOLD, near_pairs


@dataclass
class Facts:
    phash: int
    thumb: np.ndarray
    error: None = None


def _brute(fa, fb, threshold, same):
    """Every pair compared: the definition the index must reproduce."""
    out = []
    for i, a in enumerate(fa):
        for j, b in enumerate(fb):
            if same and i >= j:
                continue
            if bin(a.phash ^ b.phash).count("1") <= threshold:
                x, y = a.thumb.astype(float) - a.thumb.mean(), b.thumb.astype(float) - b.thumb.mean()
                if x @ y / (np.linalg.norm(x) * np.linalg.norm(y)) >= NEAR_CORRELATION:
                    out.append((i, j))
    return out


def _flip(h: int, bits) -> int:
    for b in bits:
        h ^= 1 << int(b)
    return h


def _planted(n_groups: int, rng) -> list[Facts]:
    """Groups of hashes 0..threshold+2 bits apart (the bits anywhere in the 64), with thumbnails
    that are either copies (slight noise) or unrelated, so both filters decide some pairs."""
    facts = []
    for _ in range(n_groups):
        h = int(rng.integers(0, 2**63)) | (int(rng.integers(0, 2)) << 63)
        thumb = rng.integers(0, 256, 1024)
        for d in range(NEAR_THRESHOLD + 3):
            t = thumb + rng.normal(0, 3, 1024) if rng.random() < 0.8 else rng.integers(0, 256, 1024)
            facts.append(Facts(_flip(h, rng.choice(64, d, replace=False)), np.clip(t, 0, 255).astype(np.uint8)))
    return facts


@pytest.mark.parametrize("threshold", [NEAR_THRESHOLD, 3, 9])
def test_index_finds_exactly_the_pairs_all_pairs_find(threshold):
    rng = np.random.default_rng(threshold)
    facts = _planted(25, rng)
    got = near_pairs(facts, facts, threshold, True)
    want = _brute(facts, facts, threshold, True)
    assert got == want
    # both filters were exercised: pairs at the threshold were kept and beyond it dropped
    assert len(want) >= 25
    dist = {bin(facts[i].phash ^ facts[j].phash).count("1") for i, j in want}
    assert max(dist) == threshold


def test_index_between_two_sets_matches_all_pairs():
    rng = np.random.default_rng(7)
    a, b = _planted(10, rng), _planted(10, rng)
    mixed = b[:40] + a[::3]  # some of a's images copied into b
    got = near_pairs(a, mixed, NEAR_THRESHOLD, False)
    assert got == _brute(a, mixed, NEAR_THRESHOLD, False)
    assert len(got) >= len(a[::3])


def test_empty_and_constant_thumbnails():
    flat = np.full(1024, 7, dtype=np.uint8)
    facts = [Facts(5, flat), Facts(5 ^ 3, flat.copy()), Facts(5, np.arange(1024) % 256)]
    assert near_pairs([], facts, NEAR_THRESHOLD, False) == []
    # two constant thumbnails are the same picture; a constant against a gradient is not
    assert near_pairs(facts, facts, NEAR_THRESHOLD, True) == [(0, 1)]


def test_a_cluster_split_and_its_audit_search_the_scan_once(tmp_path, monkeypatch):
    """``--split-by cluster`` groups the copies and the audit then counts them: one search of
    the scan serves both, and the pairs it gives again are the pairs a fresh search finds."""
    from dataclasses import replace

    from bonetumor.data import copies
    from bonetumor.data.audit import run_audit
    from bonetumor.data.synth import create_synthetic_dataset

    calls = []
    search = copies.near_pairs
    monkeypatch.setattr(copies, "near_pairs", lambda *a, **k: calls.append(1) or search(*a, **k))
    data = create_synthetic_dataset(tmp_path / "d", n_patients=6, size=32, seed=2)
    run_audit(str(data.root), split_by="cluster", baseline=False)
    assert len(calls) == 1
    facts = _planted(8, np.random.default_rng(1))
    first = copies.all_near_pairs(facts, NEAR_THRESHOLD)
    assert copies.all_near_pairs(list(facts), NEAR_THRESHOLD) == first and len(calls) == 2  # the same facts: kept
    assert copies.all_near_pairs([replace(f) for f in facts], NEAR_THRESHOLD) == first and len(calls) == 3  # others
    assert copies.all_near_pairs(facts[::-1], NEAR_THRESHOLD) != first and len(calls) == 4  # another order: searched
    assert len(first) >= 8
