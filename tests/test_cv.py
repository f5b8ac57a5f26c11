import csv
import json

import numpy as np
import pytest
from conftest import tiny_config
from sklearn import metrics as skm

from bonetumor.cv import cross_validate
from bonetumor.errors import BonetumorError


@pytest.mark.slow
def test_every_image_gets_one_out_of_fold_prediction(tmp_path, tiny_data):
    r = cross_validate(tiny_config(tiny_data, epochs=1), tmp_path / "cv", folds=3, verbose=False, n_boot=50)
    rows = list(csv.DictReader(open(tmp_path / "cv" / "oof_predictions.csv")))
    # tiny_data has a test split (2 patients), left out; the other 10 patients x 4 slices are pooled
    assert r["n_images"] == 40 and r["left_out_test_images"] == 8 and len(rows) == 40
    assert len({row["path"] for row in rows}) == 40
    folds_of_patient = {}
    for row in rows:
        folds_of_patient.setdefault(row["patient_id"], set()).add(row["fold"])
    assert all(len(f) == 1 for f in folds_of_patient.values()), "a patient was split across folds"
    assert [f["fold"] for f in r["per_fold"]] == [1, 2, 3] and sum(f["n"] for f in r["per_fold"]) == 40
    # the per-fold AUC is recomputed from the saved out-of-fold predictions
    for f in r["per_fold"]:
        sub = [row for row in rows if int(row["fold"]) == f["fold"]]
        y = [row["label"] == "cancer" for row in sub]
        if 0 < sum(y) < len(y):
            assert f["roc_auc"] == pytest.approx(skm.roc_auc_score(y, [float(row["probability"]) for row in sub]), abs=1e-5)
    aucs = [f["roc_auc"] for f in r["per_fold"]]
    assert r["mean_sd"]["roc_auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert r["mean_sd"]["roc_auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))
    saved = json.loads((tmp_path / "cv" / "cv.json").read_text())
    assert saved["pooled_out_of_fold"]["interval"]["unit"] == "patient"
    assert all((tmp_path / "cv" / f"fold_{k}" / "best.pt").is_file() for k in (1, 2, 3))


def test_too_many_folds_is_a_clear_error(tmp_path, tiny_data):
    with pytest.raises(BonetumorError, match="--folds 9: need 2 to 5"):
        cross_validate(tiny_config(tiny_data), tmp_path / "cv", folds=9, verbose=False)
