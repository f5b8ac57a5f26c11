"""The web API and page: one model loaded once, uploads checked by their bytes, never a traceback.

``create_app`` builds the FastAPI application (the CLI's ``serve`` runs it with uvicorn):

- ``GET /``: the page (static files shipped in the package: no CDN, no external fonts).
- ``POST /api/predict``: one uploaded file -> probability, label at the operating point,
  Grad-CAM heatmaps; a volume or series -> the per-slice table and the study score.
- ``GET /api/health``, ``GET /api/model``; OpenAPI docs at ``/docs``.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import secrets
import shutil
import tempfile
import threading
import time
from dataclasses import replace
from importlib import resources
from pathlib import Path

import numpy as np
import torch
from fastapi import Depends, FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from fastapi_offline import FastAPIOffline
from PIL import Image

from bonetumor import __version__
from bonetumor.data.nifti import forget_volumes
from bonetumor.data.readers import load_tensor
from bonetumor.data.studies import expand_inputs
from bonetumor.errors import BonetumorError
from bonetumor.explain.cam import compute_cams
from bonetumor.explain.grid import model_grid
from bonetumor.explain.panels import heatmap_rgba, to_rgb8
from bonetumor.inference import model_batch, open_model, prediction_rows, top_slices
from bonetumor.model.backbones import BACKBONES
from bonetumor.model.ood import OOD_FIELDS, image_distances, ood_summary
from bonetumor.predict import DEFAULT_AGGREGATE, slice_score, study_scores
from bonetumor.runtime.device import release_free_memory
from bonetumor.serve.guard import Guard, ServeLimits, security_headers
from bonetumor.serve.sniff import ACCEPTED, SUFFIXES, sniff

log = logging.getLogger("bonetumor.serve")
DISCLAIMER = "Research tool, not a diagnostic device: not for clinical decisions."
MAX_HEATMAPS = 12  # a volume's top-scoring slices get images and heatmaps; every slice gets a score


# Record entries that name places on the server's disk: not for the clients.
SERVER_PATHS = ("root", "checkpoint", "data")


def _read_json(path: Path) -> dict | None:
    """A JSON record of the run, or None if missing or unreadable."""
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def _png_b64(arr: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Unavailable(Exception):
    """The request cannot be served now (503): the server is stopping, or the request ran out of time."""


class Service:
    """The loaded model and what every request needs; ``lock`` runs one request's model work at a
    time (two at once would only share the same cores and double the memory)."""

    def __init__(self, checkpoint: str | Path, device: str = "auto"):
        self.ck, self.device = open_model(checkpoint, device)
        self.ck.model.eval()
        self.path = Path(checkpoint)
        # Heatmaps need gradients: a quantised folder's come from the float checkpoint it was made from.
        self.cam, self.cam_path = self.ck, self.path
        if self.path.is_dir():
            from bonetumor.model.checkpoint import load_checkpoint
            from bonetumor.model.quantized import float_checkpoint

            self.cam_path = float_checkpoint(self.path)
            self.cam = load_checkpoint(self.cam_path, self.device)
        self.layer = BACKBONES[self.ck.config.backbone]["cam_layer"]
        self.grid, self.grid_warning = model_grid(self.cam, self.layer)
        self.lock = threading.Lock()
        self.stop = threading.Event()  # set on SIGTERM: work in progress ends at its next batch
        self.info = self._model_info()

    def check(self, deadline: float | None) -> None:
        """Raise ``Unavailable`` once the server is stopping or the request is past its deadline."""
        if self.stop.is_set():
            raise Unavailable("the server is shutting down; try again when it is back")
        if deadline is not None and time.monotonic() > deadline:
            raise Unavailable("the request took longer than the server's time limit (serve --request-timeout); "
                              "send fewer slices or try again when the server is less busy")

    def acquire(self, deadline: float | None) -> None:
        """Wait for the model (one request's work at a time) until ``deadline``, or raise ``Unavailable``."""
        while not self.lock.acquire(timeout=0.2):
            self.check(deadline)

    def _model_info(self) -> dict:
        ck = self.ck
        info = {"name": f"{ck.config.backbone} ({self.path.parent.name or self.path.stem})", "bonetumor": __version__,
                "checkpoint": self.path.name, "epoch": ck.epoch, "classes": ck.classes, "positive_class": ck.positive_class,
                "threshold": ck.threshold, "image_size": ck.image_size, "backbone": ck.config.backbone,
                "operating_point": ck.raw.get("operating_point"), "heatmap_grid": self.grid,
                "heatmap_warning": self.grid_warning, "ood": ck.ood, "precision": ck.precision_on(self.device)}
        if self.cam is not ck:
            info["heatmaps_from"] = (f"the float checkpoint {self.cam_path.name} it was quantised from (an "
                                     f"{info['precision']} model has no gradients)")
        run = self.path.parent
        data = _read_json(run / "data.json")
        if data is not None:
            info["training_data"] = {k: v for k, v in data.items() if k not in SERVER_PATHS}
        for f in sorted(run.glob("*/metrics.json")):  # an evaluation written into the run folder
            m = _read_json(f)
            if m is not None:
                info["metrics"] = {"from": f.parent.name, **{k: v for k, v in m.items() if k not in SERVER_PATHS}}
                break
        # NaN (an undefined metric) becomes null: JSON responses allow no NaN.
        return json.loads(json.dumps(info, default=str), parse_constant=lambda c: None)

    def predict_file(self, path: Path, deadline: float | None = None) -> dict:
        """Scores for every slice of ``path``, heatmaps for the best ones; the study score for a
        volume. Stops with ``Unavailable`` between batches once past ``deadline`` or stopping."""
        ck, opts = self.ck, self.ck.read_options
        refs = expand_inputs([path], opts)
        self.check(deadline)
        if len({r.study for r in refs}) > 1:
            raise BonetumorError(f"the files form {len({r.study for r in refs})} series; send one series per request")
        is_study = len(refs) > 1 or refs[0].frame is not None  # one single-frame DICOM file is an image
        # Few slices: Grad-CAM's own forward pass scores them all. Many: score every slice in
        # batches (not all held in memory), keeping the highest-scoring ones to explain.
        rows, distances = None, None
        if len(refs) > MAX_HEATMAPS or self.cam is not ck:  # a quantised model scores; the float one explains
            chosen, probs, distances = top_slices(ck, refs, MAX_HEATMAPS, self.device, batch_size=16,
                                                  before_batch=lambda: self.check(deadline))
            rows = prediction_rows(ck, refs, probs, distances)
        else:
            chosen = [(r, load_tensor(r.path, r.frame, opts, rgb=False)) for r in refs]
        self.check(deadline)
        x = model_batch(ck, [image for _, image in chosen], self.device)
        cams = compute_cams(self.cam.model, x, self.layer, "gradcam", "predicted", ck.classes, ck.threshold,
                            self.cam.precision_on(self.device))
        index = {r: k for k, r in enumerate(refs)}
        if self.cam is not ck:  # the quantised model's own scores beside the float model's heatmaps
            cam_rows = [rows[index[r]] for r, _ in chosen]
        else:
            chosen_distances = (image_distances(ck.model, x) if distances is None
                                else distances[[index[r] for r, _ in chosen]])
            cam_rows = prediction_rows(ck, [r for r, _ in chosen], cams.probs.cpu(), chosen_distances)
        rows = rows or cam_rows
        for k, row in enumerate(rows):  # a series' files are numbered in slice order (as expand_inputs sorts them)
            row.update(slice=(refs[k].frame if refs[k].frame is not None else k) if is_study else None,
                       study=refs[k].study or "upload")
        images = []
        for j, (ref, image) in enumerate(chosen):
            h, w = image.shape[-2:]
            cam = torch.nn.functional.interpolate(cams.maps[j][None, None], size=(h, w), mode="bilinear",
                                                  align_corners=False)[0, 0].clamp(0, 1).cpu().numpy()
            images.append({"slice": rows[index[ref]]["slice"],
                           **{k: cam_rows[j][k] for k in cam_rows[j] if k.startswith("prob") or k in OOD_FIELDS},
                           "label": cam_rows[j]["label"], "explained_class": ck.classes[int(cams.target_index[j])],
                           "image_png": _png_b64(to_rgb8(image.permute(1, 2, 0).numpy())),
                           "heatmap_png": _png_b64(heatmap_rgba(cam))})
        images.sort(key=lambda im: -slice_score(im))
        for rank, im in enumerate(images, 1):
            im["rank"] = rank
        out = {"kind": "study" if is_study else "image", "threshold": ck.threshold, "positive_class": ck.positive_class,
               "classes": ck.classes, "model": {k: self.info[k] for k in ("name", "bonetumor", "checkpoint", "epoch")},
               "images": images, "disclaimer": DISCLAIMER, "ood": ood_summary(rows, ck.ood)}
        if is_study:
            study = study_scores(rows, DEFAULT_AGGREGATE, ck.label_for)[0]
            out.update(study={k: v for k, v in study.items() if k != "study"},
                       slices=[{k: r[k] for k in r if k not in ("path", "study", "threshold")} for r in rows])
            out.update({k: study[k] for k in ("probability", "probabilities", "label") if k in study})
        else:
            out.update({k: rows[0][k] for k in ("probability", "probabilities", "label") if k in rows[0]})
        return out


def create_app(checkpoint: str | Path, token: str | None = None, max_upload_mb: float | None = None,
               device: str = "auto", limits: ServeLimits | None = None) -> FastAPI:
    """The application serving ``checkpoint``; with ``token`` every API call needs
    ``Authorization: Bearer <token>``; uploads above ``max_upload_mb`` (or ``limits.max_upload_mb``)
    get 413. ``limits`` also sets the answered Host names and the body and request time limits."""
    limits = limits or ServeLimits()
    if max_upload_mb is not None:
        limits = replace(limits, max_upload_mb=max_upload_mb)
    service = Service(checkpoint, device)
    max_upload_mb, limit = limits.max_upload_mb, int(limits.max_upload_mb * 2**20)
    # FastAPIOffline serves the /docs page's Swagger UI from the package, not from a CDN: offline too.
    app = FastAPIOffline(title="bonetumor", version=__version__,
                         description="Bone-tumour image classifier with Grad-CAM heatmaps. " + DISCLAIMER)
    app.state.service = service
    authorised = _bearer(token)  # also checked by Guard before any body is read; here for the API docs
    app.add_middleware(Guard, limits=limits, token=token)
    _errors(app)
    _pages(app)

    @app.get("/api/health", dependencies=[Depends(authorised)])
    def health() -> dict:
        """Liveness, and which model is loaded on which device."""
        return {"status": "ok", "model": service.info["name"], "device": str(service.device)}

    @app.get("/api/model", dependencies=[Depends(authorised)])
    def model_info() -> dict:
        """Classes, operating point, training data summary and evaluation metrics (with CIs) when present."""
        return service.info

    @app.post("/api/predict", dependencies=[Depends(authorised)])
    def predict_upload(request: Request, file: list[UploadFile] = File(..., description=f"One {ACCEPTED} file, or the DICOM files "
                                                      "of one series")) -> dict:
        """Probability of the positive class, the label at the operating point and Grad-CAM
        heatmaps (base64 PNG: the image, and the coloured map with its value as opacity). Several
        files in one request are the DICOM slices of one series: one study."""
        return _predict_upload(service, file, limit, max_upload_mb, getattr(request.state, "deadline", None))

    return app


def _bearer(token: str | None):
    """The dependency every API route needs: the bearer token, when one is set."""
    bearer = HTTPBearer(auto_error=False)

    def authorised(cred: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        if token is None:
            return
        if cred is None or not secrets.compare_digest(cred.credentials.encode(), token.encode()):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return authorised


def _errors(app: FastAPI) -> None:
    """503 for work the server cannot do now; never a traceback sent to a client."""
    @app.exception_handler(Unavailable)
    async def unavailable(request: Request, exc: Unavailable):
        return JSONResponse({"detail": str(exc)}, status_code=503, headers={"Retry-After": "10"})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):  # outside Guard: its headers are added here
        log.exception("unexpected error on %s", request.url.path)
        return JSONResponse({"detail": "internal error; the server log has the details"}, status_code=500,
                            headers=security_headers(request.url.path))


def _pages(app: FastAPI) -> None:
    """The page and its two static files, shipped in the package."""
    static = resources.files("bonetumor.serve") / "static"

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(str(static / "index.html"), media_type="text/html")

    @app.get("/static/{name}", include_in_schema=False)
    def static_file(name: str):
        if name not in ("app.js", "style.css"):  # a fixed list: a request never names a path
            raise HTTPException(404, "not found")
        return FileResponse(str(static / name))


def _predict_upload(service: Service, file: list[UploadFile], limit: int, max_upload_mb: float,
                    deadline: float | None) -> dict:
    """Check uploads by their bytes, save them under fixed names in a private folder, predict."""
    kinds, total = [], 0
    for up in file:
        head = up.file.read(4096)
        up.file.seek(0, 2)
        total += up.file.tell()
        kinds.append(sniff(head))
    if total > limit:
        raise HTTPException(413, f"upload too large: {total / 2**20:.1f} MB; the limit is {max_upload_mb:g} MB")
    if None in kinds:
        raise HTTPException(415, f"not a {ACCEPTED} file (judged by its content, not its name)")
    if len(file) > 1 and set(kinds) != {"dicom"}:
        raise HTTPException(422, "several files in one request must be the DICOM files of one series")
    kind = kinds[0]
    tmp = Path(tempfile.mkdtemp(prefix="bonetumor-upload-"))
    try:
        for n, up in enumerate(file):  # fixed names: a client's file name never becomes a path
            up.file.seek(0)
            with open(tmp / f"upload{n:05d}{SUFFIXES[kind]}" if len(file) > 1 else tmp / f"upload{SUFFIXES[kind]}",
                      "wb") as f:
                shutil.copyfileobj(up.file, f)
        service.acquire(deadline)
        try:
            return service.predict_file(tmp if len(file) > 1 else tmp / f"upload{SUFFIXES[kind]}", deadline)
        finally:
            forget_volumes()  # the upload is gone after this request: so is its decoded volume
            release_free_memory()  # a long-running server must not look as if it grew
            service.lock.release()
    except BonetumorError as e:
        msg = str(e).replace(str(tmp) + "/", "").replace(str(tmp), "upload")
        raise HTTPException(422, f"cannot read the {kind.replace('-gz', '')} file: {msg}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
