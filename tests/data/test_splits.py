import numpy as np
import pytest

from bonetumor.data.splits import assign_splits
from bonetumor.data.studies import Sample
from bonetumor.errors import BonetumorError


def _samples(n_patients=40, per=3, with_ids=True):
    out = []
    for p in range(n_patients):
        label = "cancer" if p % 3 == 0 else "normal"
        for k in range(per):
            out.append(Sample(f"/x/{p}_{k}.png", label, f"P{p}" if with_ids else None))
    return out


def test_grouped_stratified_and_seeded():
    s = assign_splits(_samples(), 0.15, 0.15, seed=1)
    by_patient = {}
    for x in s:
        by_patient.setdefault(x.patient_id, set()).add(x.split)
    assert all(len(v) == 1 for v in by_patient.values())
    for split in ("train", "valid", "test"):
        part = [x for x in s if x.split == split]
        frac = np.mean([x.label == "cancer" for x in part])
        assert 0.2 < frac < 0.5, (split, frac)  # about a third everywhere
    n = {sp: sum(x.split == sp for x in s) for sp in ("train", "valid", "test")}
    assert n["train"] > n["valid"] > 0 and n["test"] > 0
    assert [x.split for x in s] == [x.split for x in assign_splits(_samples(), 0.15, 0.15, seed=1)]
    assert [x.split for x in s] != [x.split for x in assign_splits(_samples(), 0.15, 0.15, seed=2)]


def test_image_level_when_no_patient_ids():
    s = assign_splits(_samples(with_ids=False), 0.2, 0.0, seed=0)
    assert {x.split for x in s} == {"train", "valid"}


def test_existing_splits_kept_and_valid_carved_from_train():
    base = [Sample(f"/t/{i}.png", "cancer" if i % 2 else "normal", None, "test") for i in range(6)]
    train = [Sample(x.path, x.label, x.patient_id, "train") for x in _samples(20, 1)]
    s = assign_splits(base + train, 0.2, 0.15, seed=0)
    assert sum(x.split == "test" for x in s) == 6
    assert sum(x.split == "valid" for x in s) > 0


def test_patient_in_two_splits_is_refused():
    s = [Sample("/a.png", "cancer", "P1", "train"), Sample("/b.png", "cancer", "P1", "valid"),
         Sample("/c.png", "normal", "P2", "train")]
    with pytest.raises(BonetumorError, match="P1 appears in both"):
        assign_splits(s, 0.2, 0.0, 0)
