"""The API: every endpoint and every error, through FastAPI's TestClient."""

import base64
import io
import json
import re

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from bonetumor.data.readers import load_tensor
from bonetumor.data.transforms import create_transforms
from bonetumor.data.writers import write_dicom, write_nifti
from bonetumor.explain.cam import compute_cams
from bonetumor.explain.panels import heatmap_rgba as _heatmap_rgba
from bonetumor.model.checkpoint import load_checkpoint
from bonetumor.predict import predict, predict_studies
from bonetumor.serve.app import create_app

TOKEN = "a-long-enough-test-token-123"
LOCAL = "http://localhost"  # the server answers loopback Host names only (DNS rebinding)


@pytest.fixture(scope="module")
def client(tiny_run):
    return TestClient(create_app(tiny_run / "best.pt", device="cpu"), base_url=LOCAL, raise_server_exceptions=False)


def _png(path) -> bytes:
    return open(path, "rb").read()


def _decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def test_predict_png_matches_the_predict_command(client, tiny_run, tiny_data):
    f = sorted(tiny_data.rglob("*.png"))[0]
    r = client.post("/api/predict", files={"file": ("scan.png", _png(f), "image/png")})
    assert r.status_code == 200, r.text
    body = r.json()
    ref = predict(tiny_run / "best.pt", [f], device="cpu")[0]
    assert body["kind"] == "image" and body["probability"] == pytest.approx(ref["probability"], abs=1e-5)
    assert body["label"] == ref["label"] and body["threshold"] == pytest.approx(ref["threshold"])
    assert body["model"]["checkpoint"] == "best.pt" and body["positive_class"] == "cancer"
    assert "not a diagnostic device" in body["disclaimer"]
    # the out-of-distribution check, as predict gives it
    assert body["ood"]["checked"] and body["ood"]["of"] == 1 and body["ood"]["flagged"] == int(ref["unlike_training"])
    assert body["images"][0]["ood_distance"] == pytest.approx(ref["ood_distance"], rel=1e-3)
    (im,) = body["images"]
    img, heat = _decode(im["image_png"]), _decode(im["heatmap_png"])
    assert img.shape[:2] == heat.shape[:2] == Image.open(f).size[::-1] and heat.shape[2] == 4  # RGBA, alpha = map
    ck = load_checkpoint(tiny_run / "best.pt")
    x = create_transforms(False, ck.image_size)(load_tensor(str(f)))[None]
    cam = compute_cams(ck.model, x, "backbone.layer4", "gradcam", "predicted", ck.classes, ck.threshold).maps[0]
    np.testing.assert_allclose(heat[..., 3] / 255, np.clip(cam.numpy() * 1.2, 0, 1), atol=1 / 255 + 1e-6)
    np.testing.assert_array_equal(img, (load_tensor(str(f)).permute(1, 2, 0).numpy() * 255).round())


def test_heatmap_colours_the_map_and_uses_it_as_opacity():
    cam = np.linspace(0, 1, 50).reshape(5, 10)
    rgba = _heatmap_rgba(cam)
    assert rgba.dtype == np.uint8 and rgba.shape == (5, 10, 4)
    assert rgba[0, 0, 3] == 0 and rgba[-1, -1, 3] == 255 and (np.diff(rgba[..., 3].ravel().astype(int)) >= 0).all()
    assert rgba[0, 0, 2] > rgba[0, 0, 0] and rgba[-1, -1, 0] > rgba[-1, -1, 2]  # jet: blue low, red high


def test_a_volume_gives_every_slice_and_the_study_score(client, tiny_run, tmp_path):
    rng = np.random.default_rng(2)
    vol = write_nifti(tmp_path / "v.nii.gz", [rng.random((32, 32)) for _ in range(5)])
    r = client.post("/api/predict", files={"file": ("anything.bin", vol.read_bytes(), "application/octet-stream")})
    assert r.status_code == 200, r.text
    body = r.json()
    rows, studies = predict_studies(tiny_run / "best.pt", [vol], device="cpu")
    assert body["kind"] == "study" and len(body["slices"]) == len(rows) == 5
    assert body["probability"] == pytest.approx(studies[0]["probability"], abs=1e-5)
    assert body["study"]["aggregate"] == "topk:3" and body["study"]["n_slices"] == 5
    by_slice = {s["slice"]: s["probability"] for s in body["slices"]}
    assert by_slice == pytest.approx({r["slice"]: r["probability"] for r in rows}, abs=1e-5)
    ranks = [im["probability"] for im in body["images"]]
    assert ranks == sorted(ranks, reverse=True) and len(ranks) == 5
    from bonetumor.data import nifti as volumes

    client.post("/api/predict", files={"file": ("v", vol.read_bytes(), "x")})
    assert not volumes._CACHE  # the request's decoded volume is not kept by the server


def test_a_long_volume_is_scored_in_batches_and_its_best_slices_explained(client, tiny_run, tmp_path, monkeypatch):
    from bonetumor.serve import app as app_mod

    monkeypatch.setattr(app_mod, "MAX_HEATMAPS", 2)
    rng = np.random.default_rng(5)
    vol = write_nifti(tmp_path / "v.nii.gz", [rng.random((32, 32)) for _ in range(6)])
    body = client.post("/api/predict", files={"file": ("v", vol.read_bytes(), "x")}).json()
    rows, studies = predict_studies(tiny_run / "best.pt", [vol], device="cpu")
    assert [s["probability"] for s in body["slices"]] == pytest.approx([r["probability"] for r in rows], abs=1e-5)
    assert body["probability"] == pytest.approx(studies[0]["probability"], abs=1e-5)
    best = sorted(rows, key=lambda r: -r["probability"])[:2]
    assert [im["slice"] for im in body["images"]] == [r["slice"] for r in best]
    assert [im["probability"] for im in body["images"]] == pytest.approx([r["probability"] for r in best], abs=1e-5)
    assert [s["ood_distance"] for s in body["slices"]] == pytest.approx([r["ood_distance"] for r in rows], rel=1e-3)
    assert [im["ood_distance"] for im in body["images"]] == pytest.approx([r["ood_distance"] for r in best], rel=1e-3)
    assert body["ood"]["of"] == 6 and body["ood"]["flagged"] == sum(r["unlike_training"] for r in rows)


def test_dicom_files_of_one_series_are_one_study_in_slice_order(client, tiny_run, tmp_path):
    rng = np.random.default_rng(3)
    files = []
    for k, pos in enumerate([30.0, 10.0, 20.0]):  # sent out of order
        files.append(write_dicom(tmp_path / f"s{k}.dcm", rng.random((32, 32)), series_uid="1.2.3.4", instance=k + 1,
                                 position=pos))
    r = client.post("/api/predict", files=[("file", (f"x{k}", f.read_bytes(), "application/dicom")) for k, f in enumerate(files)])
    assert r.status_code == 200, r.text
    body = r.json()
    rows, studies = predict_studies(tiny_run / "best.pt", [tmp_path], device="cpu")  # the same series from disk
    assert body["kind"] == "study" and [s["slice"] for s in body["slices"]] == [0, 1, 2]
    assert [s["probability"] for s in body["slices"]] == pytest.approx([r["probability"] for r in rows], abs=1e-5)
    assert body["probability"] == pytest.approx(studies[0]["probability"], abs=1e-5)
    one = client.post("/api/predict", files={"file": ("a.dcm", files[0].read_bytes(), "application/dicom")}).json()
    assert one["kind"] == "image" and "slices" not in one  # a single-frame file alone is an image
    other = write_dicom(tmp_path / "o.dcm", rng.random((32, 32)), series_uid="9.9.9", position=0.0)
    r = client.post("/api/predict", files=[("file", ("a", files[0].read_bytes(), "x")), ("file", ("b", other.read_bytes(), "x"))])
    assert r.status_code == 422 and "2 series; send one series per request" in r.json()["detail"]
    r = client.post("/api/predict", files=[("file", ("a", files[0].read_bytes(), "x")),
                                           ("file", ("b", b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "x"))])
    assert r.status_code == 422 and "must be the DICOM files of one series" in r.json()["detail"]


def test_health_and_model(client, tiny_run):
    h = client.get("/api/health").json()
    assert h["status"] == "ok" and h["device"] == "cpu"
    m = client.get("/api/model").json()
    op = json.loads((tiny_run / "operating_point.json").read_text())
    assert m["classes"] == ["normal", "cancer"] and m["threshold"] == pytest.approx(op["threshold"])
    assert m["training_data"]["classes"] == ["normal", "cancer"]  # data.json of the run
    assert m["heatmap_grid"] == [1, 1] and "too coarse to localise" in m["heatmap_warning"]  # 32 px, stride 32
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]
    docs = client.get("/docs")
    assets = re.findall(r'(?:src|href)="([^"]+)"', docs.text)
    assert docs.status_code == 200 and len(assets) >= 2 and "http" not in docs.text  # Swagger UI from here, no CDN
    assert all(client.get(a).status_code == 200 for a in assets)
    page = client.get("/")
    assert page.status_code == 200 and "not a diagnostic device" in page.text
    assert "http://" not in page.text and "https://" not in page.text  # nothing fetched from elsewhere


def test_model_reports_the_evaluation_with_its_intervals_and_no_server_paths(tiny_run, tiny_data, tmp_path):
    import shutil

    from bonetumor import evaluate

    run = tmp_path / "run"
    run.mkdir()
    for name in ("best.pt", "data.json"):
        shutil.copy(tiny_run / name, run / name)
    evaluate(run / "best.pt", str(tiny_data), run / "eval", "test", n_boot=50)
    m = TestClient(create_app(run / "best.pt", device="cpu"), base_url=LOCAL).get("/api/model").json()
    saved = json.loads((run / "eval" / "metrics.json").read_text())
    assert m["metrics"]["from"] == "eval" and m["metrics"]["roc_auc"] == saved["roc_auc"]
    assert {"value", "ci_low", "ci_high"} <= set(m["metrics"]["roc_auc"])
    assert str(tmp_path) not in json.dumps(m) and str(tiny_data) not in json.dumps(m)


@pytest.mark.bad_input
def test_wrong_content_is_415_whatever_its_name(client):
    for name, data in (("scan.png", b"GIF89a" + b"\0" * 200), ("x.dcm", b"just text"), ("v.nii.gz", b"\x1f\x8bnope")):
        r = client.post("/api/predict", files={"file": (name, data, "image/png")})
        assert r.status_code == 415 and "PNG, JPEG, TIFF, DICOM" in r.json()["detail"], r.text


@pytest.mark.bad_input
def test_corrupt_file_is_422_with_a_message(client, tiny_data):
    good = _png(sorted(tiny_data.rglob("*.png"))[0])
    r = client.post("/api/predict", files={"file": ("a.png", good[:60], "image/png")})  # header, then cut
    assert r.status_code == 422 and r.json()["detail"].startswith("cannot read the png file: upload.png")
    assert "/tmp" not in r.text and "Traceback" not in r.text
    header = bytearray((348).to_bytes(4, "little") + bytes(340) + b"n+1\0" + bytes(10))  # datatype code 0
    r = client.post("/api/predict", files={"file": ("v.nii", bytes(header), "application/octet-stream")})
    assert r.status_code == 422 and r.json()["detail"].startswith("cannot read the nifti file: upload.nii: truncated or corrupt")


@pytest.mark.bad_input
def test_oversized_upload_is_413(tiny_run):
    client = TestClient(create_app(tiny_run / "best.pt", max_upload_mb=0.01, device="cpu"), base_url=LOCAL)
    r = client.post("/api/predict", files={"file": ("big.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 200_000, "image/png")})
    assert r.status_code == 413 and "limit is 0.01 MB" in r.json()["detail"]


@pytest.mark.bad_input
def test_token_is_required_on_every_api_call(tiny_run, tiny_data):
    client = TestClient(create_app(tiny_run / "best.pt", token=TOKEN, device="cpu"), base_url=LOCAL)
    good = _png(sorted(tiny_data.rglob("*.png"))[0])
    for call in (lambda h: client.get("/api/health", headers=h), lambda h: client.get("/api/model", headers=h),
                 lambda h: client.post("/api/predict", files={"file": ("a.png", good, "image/png")}, headers=h)):
        assert call({}).status_code == 401
        assert call({"Authorization": "Bearer wrong-token-wrong-token"}).status_code == 401
        assert call({"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert client.get("/").status_code == 200  # the page itself holds no data; it asks for the token


@pytest.mark.bad_input
def test_one_bad_request_does_not_affect_the_next(client, tiny_data, monkeypatch):
    from bonetumor.serve import app as app_mod

    good = _png(sorted(tiny_data.rglob("*.png"))[0])
    first = client.post("/api/predict", files={"file": ("a.png", good, "image/png")}).json()
    real = app_mod.Service.predict_file
    monkeypatch.setattr(app_mod.Service, "predict_file", lambda self, p: 1 / 0)
    r = client.post("/api/predict", files={"file": ("a.png", good, "image/png")})
    assert r.status_code == 500 and r.json() == {"detail": "internal error; the server log has the details"}
    monkeypatch.setattr(app_mod.Service, "predict_file", real)
    assert client.post("/api/predict", files={"file": ("a.png", good, "image/png")}).json()["probability"] == first["probability"]


@pytest.mark.bad_input
def test_temporary_files_are_removed_and_names_never_become_paths(client, tiny_data, tmp_path, monkeypatch):
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    good = _png(sorted(tiny_data.rglob("*.png"))[0])
    for name in ("../../etc/passwd", "/abs/evil.png", "a\x00b.png"):
        r = client.post("/api/predict", files={"file": (name, good, "image/png")})
        assert r.status_code == 200
    client.post("/api/predict", files={"file": ("bad.png", good[:60], "image/png")})
    assert list(tmp_path.iterdir()) == []


def _noise_png(path) -> bytes:
    """Colour noise: nothing like the grey synthetic scans the tiny model learnt from."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(path)
    return _png(path)


def test_an_image_unlike_the_training_data_says_so(client, tmp_path):
    body = client.post("/api/predict", files={"file": ("noise.png", _noise_png(tmp_path / "n.png"), "image/png")}).json()
    assert body["ood"]["checked"] and body["ood"]["flagged"] == 1 and body["images"][0]["unlike_training"] is True
    assert 0 <= body["probability"] <= 1  # still given, with the flag beside it
