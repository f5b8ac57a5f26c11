"""One self-contained HTML report of a run, laid out like a model card and the CLAIM checklist.

Everything is embedded (figures as data URIs), so the file opens offline and can be sent on
its own. It only reads what train, evaluate and explain wrote; the failure gallery runs
Grad-CAM on the worst false negatives and false positives.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import yaml

from bonetumor.errors import BonetumorError
from bonetumor.evaluate.names import (
    THRESHOLD_NOT_CHOSEN,
    UNLIKE_WORDS,
    metric_meaning,
    metric_name,
    sig3,
)
from bonetumor.files import RunDir, refuse_existing_file

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;background:#f6f7f9;color:#1d2330}
main{max-width:1040px;margin:0 auto;padding:24px 20px 60px}
h1{font-size:1.6em;margin:0 0 4px}h2{margin-top:36px;border-bottom:2px solid #d9dde5;padding-bottom:4px}
section{background:#fff;border-radius:8px;padding:8px 20px 16px;margin-top:18px;box-shadow:0 1px 2px #0001}
table{border-collapse:collapse;margin:8px 0;max-width:100%}td,th{border:1px solid #d9dde5;padding:4px 8px;text-align:left;
overflow-wrap:anywhere;vertical-align:top}th{background:#eef1f6}
.grid{display:flex;flex-wrap:wrap;gap:12px}.grid figure{margin:0;flex:1 1 300px;max-width:480px}
figure img,img{max-width:100%;height:auto;display:block}figcaption{font-size:.85em;color:#555;overflow-wrap:anywhere}
.warn{background:#fff4e0;border-left:4px solid #e69500;padding:8px 12px;margin:10px 0}
.muted{color:#666;font-size:.9em}code{overflow-wrap:anywhere}abbr[title]{text-decoration:underline dotted;cursor:help}
"""


class Html(str):
    """A table cell that is already HTML (not escaped again)."""


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _figure(path: Path, caption: str) -> str:
    return f"<figure>{_img(path, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>" if path.is_file() else ""


def _table(rows: list[list], head: list[str] | None = None) -> str:
    def cell(c) -> str:
        return c if isinstance(c, Html) else html.escape(str(c))
    h = "".join(f"<th>{cell(c)}</th>" for c in head) if head else ""
    body = "".join("<tr>" + "".join(f"<td>{cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table>{'<tr>' + h + '</tr>' if h else ''}{body}</table>"


def _read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _fmt(v) -> str:
    return sig3(v)


def _ci(d: dict) -> str:
    return f"{sig3(d['value'])} [{sig3(d['ci_low'])}, {sig3(d['ci_high'])}]"


def _name(key: str, classes: list[str]) -> Html:
    """The metric's plain name, its meaning on hover."""
    return Html(f'<abbr title="{html.escape(metric_meaning(key, classes))}">{html.escape(metric_name(key))}</abbr>')


def _data_section(run: Path, cfg: dict) -> str:
    data = _read_json(run / RunDir.DATA) or {}
    counts = data.get("counts", {})
    classes = data.get("classes", [])
    rows = [[split, *[counts[split].get(c, 0) for c in classes], sum(counts[split].values())] for split in counts]
    out = [f"<p>Source: <code>{html.escape(str(cfg.get('data') or cfg.get('manifest') or cfg.get('train_dir')))}</code>; "
           f"layout {html.escape(str(data.get('layout')))}; SHA-256 fingerprint <code>{html.escape(str(data.get('fingerprint', ''))[:16])}…</code></p>",
           _table(rows, ["split", *classes, "total"]),
           f"<p>Split level: <b>{html.escape(str(data.get('split_level')))}</b>"
           + (" (no patient ids: images of one patient may fall in different splits)" if data.get("split_level") == "image" else "")
           + "</p>"]
    audit = _read_json(run / RunDir.AUDIT)
    if audit is None:
        out.append('<p class="warn">No leakage audit was run for this training run.</p>')
    else:
        from bonetumor.data.audit import leakage_summary
        from bonetumor.data.confounds import PURE, confound_summary

        summary = leakage_summary(audit)
        out.append(f'<p class="warn">Leakage found: {html.escape(summary)}. Held-out figures below are optimistic.</p>'
                   if summary else "<p>Leakage audit: no copies across splits, no patient in two splits, no image under two labels.</p>")
        rows = [[s, r["n"], r.get("exact_copies_of_train", ""), r.get("near_copies_of_train", ""),
                 r.get("same_source_name_as_train", "")] for s, r in audit["duplicates"].items()]
        out.append(_table(rows, ["split", "images", "exact copies of train", "exact or near copies", "same export source name"]))
        confound = confound_summary(audit)
        if confound:
            out.append(f'<p class="warn"><strong>{html.escape(confound[0].upper() + confound[1:])}.</strong> '
                       "Figures measured inside this data set do not say how the model does elsewhere.</p>")
        names = audit.get("confounds", {}).get("file_names")
        if names and names.get("cv_auc") is not None:
            out.append(f"<p>File names alone (cross-validated classifier on their tokens): ROC-AUC {sig3(names['cv_auc'])}; "
                       f"{names['share_in_pure_patterns']:.0%} of the images follow a naming pattern that one class holds "
                       f"at {PURE:.0%} or more.</p>")
        style = audit.get("confounds", {}).get("style")
        if style and style.get("cv_auc") is not None:
            out.append(f"<p>Image style alone (size, framing, outer-band grey levels and noise, JPEG quality, corner "
                       f"markers; cross-validated classifier): ROC-AUC {sig3(style['cv_auc'])}.</p>")
        flagged = audit.get("shortcuts_flagged", [])
        out.append(f"<p>Possible shortcuts (a property that alone separates the classes): "
                   f"{html.escape(', '.join(flagged)) if flagged else 'none flagged'}.</p>")
        for split, b in audit.get("memorisation_baseline", {}).items():
            part = f" (a random {b['n']:,} of its {b['n_held']:,} images)" if b.get("n_held") else ""
            out.append(f"<p>1-nearest-neighbour look-up on training thumbnails, {split}{part}: accuracy "
                       f"{sig3(b['accuracy'])}, ROC-AUC {sig3(b['roc_auc'])}.</p>")
    return "".join(out)


def _method_section(run: Path, cfg: dict) -> str:
    env = _read_json(run / RunDir.ENVIRONMENT) or {}
    pre = [["image size", cfg.get("image_size")], ["normalisation", "ImageNet mean/std, grey repeated to 3 channels"],
           ["augmentation (training only)", f"horizontal flip {cfg.get('hflip')}, rotation ±{cfg.get('rotate_degrees')}°, "
                                            f"zoom {cfg.get('zoom_min')}–{cfg.get('zoom_max')}"]]
    model = [["backbone", cfg.get("backbone")], ["weights", cfg.get("weights")], ["frozen", cfg.get("freeze")],
             ["fine-tuned blocks", ", ".join(cfg.get("unfreeze") or []) or "-"], ["output stride", cfg.get("output_stride")],
             ["head", f"global average pooling → Linear(256) → ReLU → Dropout({cfg.get('dropout')}) → Linear"]]
    train = [[k, cfg.get(k)] for k in ("epochs", "batch_size", "lr", "lr_schedule", "weight_decay", "patience", "precision",
                                        "threshold_rule", "calibrate", "seed")] + [["lesion guidance", guidance(cfg)]]
    ood = _read_json(run / RunDir.OOD)
    train.append(["out-of-distribution check", f"{ood['method']}, on the backbone stages' features of {ood['n_train']} "
                  f"training images; flags beyond the {ood['quantile']:g} quantile of {ood['n_valid']} validation "
                  "images' scores" if ood else "none"])
    pk = env.get("packages", {})
    sw = ", ".join(f"{k} {v}" for k, v in pk.items())
    return (f"<h3>Preprocessing</h3>{_table(pre)}<h3>Model</h3>{_table(model)}<h3>Training</h3>{_table(train)}"
            f"<p class='muted'>Device {html.escape(str(env.get('device')))}; {html.escape(sw)}</p>"
            + _figure(run / RunDir.CURVES, "Accuracy and loss per epoch, training vs validation"))


def _metrics_section(ev: Path | None, run: Path) -> str:
    m = _read_json(ev / RunDir.METRICS) if ev else None
    if m is None:
        return "<p class='warn'>No evaluation folder given: run <code>bonetumor evaluate</code> and pass --eval.</p>"
    names = [k for k in ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv",
                         "f1", "brier", "ece") if k in m]
    half = m.get("at_threshold_0.5", {})
    classes = m.get("confusion_matrix", {}).get("labels") or ["normal", "cancer"]
    rows = [[_name(k, classes), _ci(m[k]), _fmt(half.get(k, ""))] for k in names]
    iv = m.get("interval", {})
    kind = "External data set" if m.get("external") else f"Internal {m.get('split')} split"
    default_threshold = m.get("threshold_source") == "default"
    out = [f"<p><b>{kind}</b>, n = {m['n']} ({m.get('n_positive', '?')} positive). 95% CIs: {iv.get('method', '')} "
           f"over {iv.get('unit', '')}s, {iv.get('resamples', '')} resamples. Operating threshold "
           f"<b>{sig3(m.get('threshold', 0.5))}</b>, "
           + ("the default (see the warning). " if default_threshold
              else "chosen on validation (rule in the training table). ")
           + "Hover over a metric's name for what it means.</p>",
           _table(rows, ["metric", "value [95% CI] at the operating threshold", "at threshold 0.5"])]
    if default_threshold:
        out.insert(1, _warning(THRESHOLD_NOT_CHOSEN))
    o = m.get("ood")
    if o:
        out.append(f"<p>{UNLIKE_WORDS.capitalize()} (out-of-distribution check): {o['flagged']} of {o['of']} images "
                   f"({o['rate']:.1%}; by class: {html.escape(', '.join(f'{c} {r:.1%}' for c, r in o['by_class'].items()))}"
                   f"), where images like the training data give about {o['expected_rate']:.0%}.</p>")
    for note in m.get("notes", []):
        out.append(_warning(note.rstrip(".")))
    b = m.get("memorisation_baseline")
    if b:
        out.append(f"<p>Beside it, 1-NN look-up on training thumbnails: accuracy {sig3(b['accuracy'])}, ROC-AUC {sig3(b['roc_auc'])}. "
                   "When look-up comes near the model, the split measures memory rather than learning.</p>")
    ex = m.get("excluding_copies")
    if ex and "roc_auc" in ex:
        out.append(f"<p>Without the {ex['removed']['total']} images that copy a {ex['of']} image (n = {ex['n']}): "
                   f"ROC-AUC {_ci(ex['roc_auc'])}, accuracy {_ci(ex['accuracy'])}.</p>")
    for how, pm in m.get("per_patient", {}).items():
        out.append(f"<p>Per patient ({m.get('n_patients')} patients, score = {how} of the slices): ROC-AUC {_ci(pm['roc_auc'])}, "
                   f"sensitivity {sig3(pm['sensitivity']['value'])}, specificity {sig3(pm['specificity']['value'])}.</p>")
    figs = [(RunDir.ROC, "ROC curve with 95% bootstrap band"), (RunDir.PR, "Precision-recall curve"),
            (RunDir.CONFUSION, "Confusion matrix at the operating threshold"),
            (RunDir.SCORES, "Score histogram per class")]
    out.append('<div class="grid">' + "".join(_figure(ev / f, c) for f, c in figs) + "</div>")
    op = _read_json(run / RunDir.OPERATING_POINT) or {}
    cal = (f"<p>Temperature scaling on validation: T = {sig3(op['temperature'])}, calibration error (ECE) "
           f"{sig3(op['ece_before'])} → {sig3(op['ece_after'])}.</p>") if op.get("temperature") else "<p>No temperature scaling (train with --calibrate).</p>"
    out.append(f"<h3>Calibration</h3>{cal}" + _figure(ev / RunDir.RELIABILITY, "Reliability diagram"))
    return "".join(out)


def _failure_gallery(ck, ev: Path, k: int = 4) -> str:
    """Top false negatives and false positives of the loaded model ``ck``, with their Grad-CAM panels."""
    pred = ev / RunDir.PREDICTIONS
    m = _read_json(ev / RunDir.METRICS)
    if not pred.is_file() or m is None or "positive_class" not in m:
        return "<p class='muted'>No binary predictions to show failures from.</p>"
    pos = m["positive_class"]
    with open(pred, newline="", encoding="utf-8", errors="surrogateescape") as f:  # paths as written
        rows = list(csv.DictReader(f))
    fn = sorted((r for r in rows if r["label"] == pos and r["prediction"] != pos), key=lambda r: float(r["probability"]))[:k]
    fp = sorted((r for r in rows if r["label"] != pos and r["prediction"] == pos), key=lambda r: -float(r["probability"]))[:k]
    if not fn and not fp:
        return "<p>No misclassified images.</p>"
    base = Path(m.get("paths_relative_to", "."))
    for r in fn + fp:  # paths as evaluate was given them, relative to where it ran
        if not Path(r["path"]).is_file() and (base / r["path"]).is_file():
            r["path"] = str(base / r["path"])
    missing = next((r["path"] for r in fn + fp if not Path(r["path"]).is_file()), None)
    if missing:
        return (f"<p class='warn'>The failure gallery needs the evaluated images, and {html.escape(missing)} is not "
                "found from here: run the report where the images are, or evaluate again.</p>")
    from bonetumor.explain.run import explain

    out = []
    with tempfile.TemporaryDirectory() as tmp:
        # Each group gets its own fixed folder: explain refuses to write into one that exists.
        for folder, title, group in (("false_negatives", f"False negatives (missed {pos}), lowest P first", fn),
                                     ("false_positives", "False positives, highest P first", fp)):
            if not group:
                continue
            res = explain(ck, [r["path"] for r in group], Path(tmp) / folder, target="predicted",
                          faithfulness_samples=0)
            out.append(f"<h3>{html.escape(title)}</h3><div class='grid'>"
                       + "".join(_figure(Path(tmp) / folder / r["panel"], f"{Path(r['path']).name}: P = {r['probability']:.3f}")
                                 for r in res.rows if r.get("panel")) + "</div>")
    return "".join(out)


def _margins(explain_dir: Path | None) -> str:
    """Where the heatmaps' mass lies: the outer band and burned-in markers, against their area."""
    m = (_read_json(explain_dir / RunDir.EXPLAIN) or {}).get("margins") if explain_dir else None
    if not m:
        return ""
    text = (f"<p>Heatmap mass in the outer {m['band']:.0%} band of the image: {m['margin_share']:.0%} "
            f"(the band covers {m['margin_area']:.0%} of the image)")
    if "marker_share" in m:
        text += (f"; on burned-in markers, over the {m['n_with_markers']} images that have them: {m['marker_share']:.0%} "
                 f"(they cover {m['marker_area']:.0%})")
    text += ".</p>"
    if m["warning"]:
        text += f'<p class="warn"><strong>{html.escape(m["warning"][0].upper() + m["warning"][1:])}.</strong></p>'
    return text


def guidance(cfg: dict) -> str:
    """How a run used lesion masks in training, in words: "none", or what guided it."""
    if not cfg.get("lesion_masks"):
        return "none"
    return (f"guided: one minus the lesion's share of the positive class's Grad-CAM as a loss (GAIN-style "
            f"attention supervision), weight {cfg.get('guidance_weight', 1.0):g}, masks from {cfg['lesion_masks']}")


def _localization_section(explain_dir: Path | None, cfg: dict | None = None) -> str:
    margins = _margins(explain_dir)
    if (cfg or {}).get("lesion_masks"):
        margins += ("<p><b>This model is lesion-guided</b>: its training pushed the cancer class's Grad-CAM into the "
                    "training images' lesion masks, so these scores measure what that training carried over to the "
                    "explained images, not evidence found unaided.</p>")
    loc = _read_json(explain_dir / RunDir.LOCALIZATION) if explain_dir else None
    if not loc or "cam" not in loc:
        return margins + "<p class='muted'>No lesion masks were given to explain, so the heatmaps are not scored.</p>"
    base = loc["baseline_centred_gaussian"]
    rows = [[_name(k, []), _ci(loc["cam"][k]), _ci(base[k])] for k in loc["cam"]]
    beats = loc["cam"]["pointing"]["ci_low"] > base["pointing"]["value"]
    verdict = ("The heatmaps point at the lesion more often than a centred blob does." if beats else
               "<b>The heatmaps do not point at the lesion more reliably than a centred blob</b>: do not read them as "
               "locating the tumour.")
    return margins + (f"<p>{loc['method']} at {html.escape(loc['layer'])}, {loc['n_with_lesion']} images with a lesion.</p>"
            + _table(rows, ["score", "heatmap [95% CI]", "centred Gaussian baseline"]) + f"<p>{verdict}</p>")


def _other_evaluations(evals: list[Path]) -> str:
    """Key figures of further evaluations (another split, external data), each labelled."""
    rows = []
    for ev in evals:
        m = _read_json(ev / RunDir.METRICS)
        if m is None:
            raise BonetumorError(f"{ev}: no metrics.json (run bonetumor evaluate first)")
        kind = "external" if m.get("external") else "internal"
        ood = m.get("ood")
        rows.append([f"{kind}: {m.get('data', '')} ({m.get('split')})", m["n"],
                     *(_ci(m[k]) if k in m else "" for k in ("roc_auc", "accuracy", "sensitivity", "specificity")),
                     f"{ood['rate']:.1%}" if ood else "not checked"])
    return ("<h3>Other evaluations</h3><p>A model can score well inside its own data set and near chance outside it; "
            "external figures are labelled as such.</p>"
            + _table(rows, ["evaluation", "n", "ROC-AUC", "accuracy", "sensitivity", "specificity", UNLIKE_WORDS]))


LIMITS = """<ul>
<li>Intended use: research on retrospective images; not a medical device and not for clinical decisions.</li>
<li>The figures hold for data like the evaluated split only: other scanners, sites, populations or
preprocessing can change them; an external evaluation is labelled as such above when there is one.</li>
<li>With image-level splits, or when the audit finds copies across splits, held-out figures are optimistic.</li>
<li>Heatmaps show where the model's evidence lies, not where a tumour is; read their localization scores.</li>
</ul>"""


def _title(run: Path, cfg: dict) -> str:
    """What the model is, on what data, when: "resnet50, 112 px, on bone-cancer-xray-v1, trained 2026-12-02"."""
    data = cfg.get("data") or cfg.get("manifest") or cfg.get("train_dir") or ""
    data_name = Path(str(data)).name if data else "unknown data"
    if data_name.lower() in ("train", "training", "manifest.csv") and data:
        data_name = Path(str(data)).parent.name or data_name
    when = datetime.fromtimestamp((run / RunDir.BEST).stat().st_mtime, timezone.utc).strftime("%Y-%m-%d")
    guided = ", lesion-guided" if cfg.get("lesion_masks") else ""
    return f"{cfg.get('backbone', 'model')}, {cfg.get('image_size', '?')} px{guided}, on {data_name}, trained {when}"


def _heatmap_warning(ck) -> str:
    """A warning box when the model's Grad-CAM grid is too coarse to localise (explain/grid.py)."""
    from bonetumor.explain.grid import model_grid
    from bonetumor.model.backbones import BACKBONES

    _, text = model_grid(ck, BACKBONES[ck.config.backbone]["cam_layer"])
    return _warning(text) if text else ""


def _warning(text: str) -> str:
    """A warning box: one sentence, escaped."""
    return f'<p class="warn"><b>Warning:</b> {html.escape(text)}.</p>'


def build_report(run: str | Path, eval_dir: str | Path | None = None, explain_dir: str | Path | None = None,
                 out: str | Path | None = None, more_evals: list[str | Path] | None = None,
                 overwrite: bool = False) -> Path:
    """Write the report (default ``RUN/report.html``, replaced each time) and return its path.
    ``eval_dir`` is the main evaluation; ``more_evals`` (another split, external data) are
    tabulated beside it. An ``out`` that exists is replaced only with ``overwrite``."""
    run = Path(run)
    refuse_existing_file(out, overwrite)
    if not (run / RunDir.CONFIG).is_file() or not (run / RunDir.BEST).is_file():
        raise BonetumorError(f"{run}: not a run folder (config.yaml and best.pt expected)")
    ev = Path(eval_dir) if eval_dir else None
    if ev is not None and not (ev / RunDir.METRICS).is_file():
        raise BonetumorError(f"{ev}: no metrics.json (run bonetumor evaluate first)")
    cfg = yaml.safe_load((run / RunDir.CONFIG).read_text()) or {}
    from bonetumor.model.checkpoint import load_checkpoint
    from bonetumor.runtime.device import select_device

    ck = load_checkpoint(run / RunDir.BEST, select_device("auto"))  # once, for the grid and the gallery
    grid = _heatmap_warning(ck)
    parts = [("1. Data", _data_section(run, cfg)), ("2. Methods", _method_section(run, cfg)),
             ("3. Results", _metrics_section(ev, run)
              + (_other_evaluations([Path(e) for e in more_evals]) if more_evals else "")),
             ("4. Failure gallery", grid + (_failure_gallery(ck, ev) if ev else "<p class='muted'>Needs --eval.</p>")),
             ("5. Heatmap localization", grid + _localization_section(Path(explain_dir) if explain_dir else None, cfg)),
             ("6. Intended use and limitations", LIMITS)]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join(f"<section><h2>{html.escape(t)}</h2>{c}</section>" for t, c in parts)
    title = html.escape(_title(run, cfg))
    page = (f"<!doctype html><html lang='en'><head><meta charset='utf-8'><meta name='viewport' "
            f"content='width=device-width,initial-scale=1'><title>{title}</title>"
            f"<style>{CSS}</style></head><body><main><h1>{title}</h1>"
            f"<p class='muted'>Run folder <code>{html.escape(run.name)}</code>. Written {when} by bonetumor from the run "
            f"folder and its evaluation.</p>{body}</main></body></html>")
    path = Path(out) if out else run / RunDir.REPORT
    RunDir(path.parent).write_text(path.name, page)
    from bonetumor.tracking import reopen

    tracker = reopen(run)  # a run tracked in MLflow keeps its report too
    if tracker is not None:
        tracker.log_file(path, "report")
        tracker.close()
    return path
