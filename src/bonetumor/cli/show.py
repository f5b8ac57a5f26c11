"""What the commands print: tables and summary lines (rich), apart from the commands themselves."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bonetumor.evaluate.names import (
    THRESHOLD_NOT_CHOSEN,
    UNLIKE_WORDS,
    metric_name,
    sig3,
)

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def show_metrics(m: dict) -> None:
    iv = m.get("interval", {})
    kind = "EXTERNAL " if m.get("external") else ""
    t = Table(title=f"{kind}{m.get('split', '')} metrics (n={m['n']}; 95% CI, bootstrap over {iv.get('unit', 'image')}s)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    t.add_column("95% CI", justify="right")
    half = m.get("at_threshold_0.5")
    if half:
        t.add_column("at threshold 0.5", justify="right")
    for k in ("roc_auc", "pr_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity", "ppv", "npv", "f1",
              "brier", "ece"):
        if k in m:
            v = m[k]
            row = [metric_name(k), sig3(v["value"]), f"[{sig3(v['ci_low'])}, {sig3(v['ci_high'])}]"]
            t.add_row(*row, *([sig3(half[k]) if k in half else ""] if half else []))
    if "threshold" in m:
        t.add_row("threshold", sig3(float(m["threshold"])), "", *(["0.500"] if half else []))
    out.print(t)
    if m.get("threshold_source") == "default" and "threshold" in m:
        err.print(f"[bold yellow]warning:[/] {THRESHOLD_NOT_CHOSEN}")
    for note in m.get("notes", []):
        out.print(f"[yellow]note:[/] {note}")
    for how, pm in m.get("per_patient", {}).items():
        out.print(f"per patient ({m.get('n_patients')} patients, score = {how} over slices): ROC-AUC "
                  f"{sig3(pm['roc_auc']['value'])} [{sig3(pm['roc_auc']['ci_low'])}, {sig3(pm['roc_auc']['ci_high'])}], "
                  f"accuracy {sig3(pm['accuracy']['value'])}, sensitivity {sig3(pm['sensitivity']['value'])}, "
                  f"specificity {sig3(pm['specificity']['value'])}")
    o = m.get("ood")
    if o:
        out.print(f"{UNLIKE_WORDS} (out-of-distribution check): {o['flagged']} of {o['of']} images ({o['rate']:.1%}; "
                  f"images like the training data: about {o['expected_rate']:.0%})")
    b = m.get("memorisation_baseline")
    if b:
        part = f" (a random {b['n']:,} of {b['n_held']:,} images)" if b.get("n_held") else ""
        out.print(f"beside it, 1-nearest-neighbour look-up on training thumbnails{part}: accuracy {sig3(b['accuracy'])}, "
                  f"ROC-AUC {sig3(b['roc_auc'])} (when close to the model's, the split measures memory, not learning)")


def show_evaluation(m: dict, out_dir: Path) -> None:
    """``evaluate``'s metrics table, the copies-excluded line, the classification report."""
    show_metrics(m)
    if m.get("dropped_classes"):
        out.print(f"dropped (not in --class-map): {m['dropped_classes']}")
    ex = m.get("excluding_copies")
    if ex:
        r = ex["removed"]
        line = (f"without the {r['total']} images that copy a {ex['of']} image ({r['exact']} exact, {r['near']} near, "
                f"{r['source_name_only']} by export source name): n={ex['n']}")
        if "roc_auc" in ex:
            line += (f", ROC-AUC {sig3(ex['roc_auc']['value'])} [{sig3(ex['roc_auc']['ci_low'])}, "
                     f"{sig3(ex['roc_auc']['ci_high'])}], accuracy {sig3(ex['accuracy']['value'])} "
                     f"(all images: {sig3(m['roc_auc']['value'])}, {sig3(m['accuracy']['value'])})")
        out.print(line)
    out.print(m["classification_report"])
    out.print(f"results in {out_dir}")


def show_explain(r, method: str) -> None:
    if r.warning:
        err.print(f"[bold yellow]warning:[/] {r.warning}")
    if r.localization:
        t = Table(title=f"localization ({r.localization['n_with_lesion']} images with a lesion), 95% bootstrap CI")
        for col in ("score", method, "centred Gaussian baseline"):
            t.add_column(col)
        for k in ("pointing", "energy", "iou_top15"):
            a, b = r.localization["cam"][k], r.localization["baseline_centred_gaussian"][k]
            t.add_row(metric_name(k), f"{sig3(a['value'])} [{sig3(a['ci_low'])}, {sig3(a['ci_high'])}]",
                      f"{sig3(b['value'])} [{sig3(b['ci_low'])}, {sig3(b['ci_high'])}]")
        out.print(t)
        c = r.localization["correctly_classified_positive"]
        if c["n"]:
            a = c["cam"]["pointing"]
            b = c["baseline_centred_gaussian"]["pointing"]
            out.print(f"pointing game on the {c['n']} lesion images the model called positive: "
                      f"{a['value']:.3f} [{a['ci_low']:.3f}, {a['ci_high']:.3f}] (baseline {b['value']:.3f})")
    if r.faithfulness and r.faithfulness["deletion"]["n"]:
        out.print(f"faithfulness on {r.faithfulness['deletion']['n']} images: deletion AUC "
                  f"{r.faithfulness['deletion']['value']:.3f} (lower is better), insertion AUC "
                  f"{r.faithfulness['insertion']['value']:.3f} (higher is better)")


def show_explained(r, method: str) -> None:
    """``explain``'s tables, its margins line and where its pages are."""
    show_explain(r, method)
    show_margins(r.margins)
    if r.note:
        out.print(f"note: {r.note}")
    out.print(f"{len(r.rows)} images explained; open {r.out / 'index.html'}")


def show_audit(r: dict, out_dir: Path | None) -> None:
    """``audit``'s duplicate and shortcut tables, the look-up baseline and the leakage line."""
    from bonetumor.data.audit import leakage_summary

    t = Table(title=f"duplicates ({r['n_images']} images, {r['split_level']}-level splits)")
    for col in ("split", "n", "exact within", "near within", "exact copies of train", "exact or near copies of train",
                "same source name as train"):
        t.add_column(col, justify="right")
    for split, row in r["duplicates"].items():
        cp = (f"{row['exact_copies_of_train']} ({row['exact_rate']:.1%})", f"{row['near_copies_of_train']} ({row['near_rate']:.1%})") \
            if "exact_copies_of_train" in row else ("", "")
        src = row.get("same_source_name_as_train")
        t.add_row(split, str(row["n"]), str(row["exact_duplicates_within"]), str(row["near_duplicates_within"]), *cp,
                  "" if src is None else f"{src} ({src / max(row['n'], 1):.1%})")
    out.print(t)
    t = Table(title="shortcuts (numbers: single-feature ROC-AUC; categories: total variation distance)")
    for col in ("feature", "effect", "flag", "per class"):
        t.add_column(col)
    for name, v in r["shortcuts"].items():
        eff = f"AUC {v['auc']:.3f}" if v["kind"] == "numeric" else f"TVD {v['tvd']:.3f}"
        per = "; ".join(f"{c}: {x['mean']:.3g}" if v["kind"] == "numeric" else f"{c}: {next(iter(x), '')}"
                        for c, x in v["per_class"].items())
        t.add_row(name, eff, "[yellow]yes[/]" if v["flag"] else "", per)
    out.print(t)
    for split, b in r.get("memorisation_baseline", {}).items():
        out.print(f"1-NN memorisation baseline on {split}: accuracy {b['accuracy']:.3f}, ROC-AUC {b['roc_auc']:.3f} (n={b['n']})")
    if r["unreadable"]:
        out.print(f"[yellow]{len(r['unreadable'])} unreadable files[/], e.g. {r['unreadable'][0]['path']}: {r['unreadable'][0]['error']}")
    if r.get("listed_twice"):
        first = r["listed_twice"][0]
        out.print(f"[yellow]{len(r['listed_twice'])} listings repeat an image[/] (train and evaluate refuse them; "
                  f"--skip-bad-files drops them), e.g. {first['path']}: {first['problem']}")
    _show_confounds(r)
    summary = leakage_summary(r)
    out.print(f"[bold yellow]leakage:[/] {summary}" if summary else "no leakage found")
    c = r.get("copies")
    if c and c["pairs"]:
        where = f" (listed in {out_dir / 'duplicates.csv'}, clusters in {out_dir / 'clusters.csv'})" if out_dir else \
            " (pass --out DIR to list them in duplicates.csv and clusters.csv)"
        out.print(f"copies: {c['pairs']} pairs ({c['exact']} exact, {c['near']} near, {c['same-source']} same source), "
                  f"{c['cross_split_pairs']} across splits, in {c['clusters_with_copies']} clusters{where}")
    if out_dir is not None:
        out.print(f"audit written to {out_dir / 'audit.json'}")


def _show_confounds(r: dict) -> None:
    """The naming patterns' and style clusters' classes, each classifier's AUC, and the verdict."""
    from rich.markup import escape

    from bonetumor.data.confounds import confound_summary

    names = r.get("confounds", {}).get("file_names")
    if not names:
        return
    t = Table(title=f"file-name patterns ({names['n_patterns']} patterns; those of {names['frequent_at_least']}+ images)")
    for col in ("pattern", "images", "by class", "purity"):
        t.add_column(col, justify="left" if col in ("pattern", "by class") else "right")
    for row in names["patterns"]:
        t.add_row(escape(row["pattern"]), str(row["n"]), ", ".join(f"{c} {n}" for c, n in row["by_class"].items()), f"{row['purity']:.0%}")
    out.print(t)
    auc = "n/a (too few images per class)" if names["cv_auc"] is None else f"{names['cv_auc']:.3f}"
    out.print(f"file names alone: cross-validated ROC-AUC {auc}; {names['share_in_pure_patterns']:.1%} of the images "
              "in a pattern one class holds at 95% or more")
    style = r.get("confounds", {}).get("style")
    if style and style.get("cv_auc") is not None:
        t = Table(title="acquisition style: clusters of images by size, framing, outer-band grey levels and noise, "
                        "JPEG quality, corner markers")
        for col in ("cluster", "images", "by class", "purity", "size", "dark band", "JPEG quality"):
            t.add_column(col, justify="left" if col == "by class" else "right")
        for c in style["clusters"]:
            lk = c["looks"]
            t.add_row(str(c["cluster"]), str(c["n"]), ", ".join(f"{k} {n}" for k, n in c["by_class"].items()),
                      f"{c['purity']:.0%}", f"{lk['width']}x{lk['height']}", f"{lk['dark_band']:.0%}", f"{lk['jpeg_quality']:.0f}")
        out.print(t)
        out.print(f"image style alone: cross-validated ROC-AUC {style['cv_auc']:.3f}; "
                  f"{style['share_in_pure_clusters']:.1%} of the images in a cluster one class holds at 95% or more")
    verdict = confound_summary(r)
    out.print(f"[bold yellow]confound:[/] {escape(verdict)}" if verdict else
              "no confound found: neither file names nor image style alone predict the class")


def show_predictions(rows: list[dict], studies: list[dict], aggregate: str) -> None:
    """``predict``'s table of images (and of studies), and a count of files skipped."""
    t = Table()
    checked = any("unlike_training" in r for r in rows)
    for col in ("file", "slice", "probability", "label") + (("input check",) if checked else ()):
        t.add_column(col, justify="right" if col in ("slice", "probability") else "left")
    for r in rows:
        p = r.get("probability")
        shown = r.get("error") and f"[red]{r['error']}[/]" or (f"{p:.4f}" if p is not None else json.dumps(r["probabilities"]))
        cells = [r["path"], "" if r["slice"] is None else str(r["slice"]), shown, r.get("label", "")]
        if checked:
            cells.append(f"[bold red]{UNLIKE_WORDS}[/]" if r.get("unlike_training") else "")
        t.add_row(*cells)
    out.print(t)
    far = sum(bool(r.get("unlike_training")) for r in rows)
    if far:
        err.print(f"[bold yellow]warning:[/] {far} of {sum('unlike_training' in r for r in rows)} image(s) are "
                  f"{UNLIKE_WORDS} (the model's out-of-distribution check): their probabilities cannot be trusted")
    if studies:
        t = Table(title=f"studies (score = {aggregate} of the slice scores)")
        for col in ("study", "slices", "probability", "label", "top slices") + (("unlike training",) if checked else ()):
            t.add_column(col)
        for s in studies:
            p = s.get("probability")
            t.add_row(s["study"], str(s["n_slices"]), f"{p:.4f}" if p is not None else json.dumps(s["probabilities"]),
                      s["label"], " ".join(map(str, s["top_slices"][:3])),
                      *([f"{s.get('unlike_training_slices', 0)} slices"] if checked else []))
        out.print(t)
    bad = sum("error" in r for r in rows)
    if bad:
        err.print(f"[yellow]{bad} unreadable file(s) skipped[/]")


def show_cv(r: dict, folds: int, out_dir: Path) -> None:
    """``cv``'s per-fold table with mean and sd, and the pooled out-of-fold ROC-AUC."""
    t = Table(title=f"{folds}-fold cross-validation ({r['n_images']} images, {r['split_level']}-level folds)")
    # The main columns fit a terminal; every metric is in cv_folds.csv and cv.json.
    names = [n for n in ("roc_auc", "accuracy", "sensitivity", "specificity", "ece") if n in r["mean_sd"]]
    for col in ("fold", "n", *names):
        t.add_column(col, justify="right")
    for f in r["per_fold"]:
        t.add_row(str(f["fold"]), str(f["n"]), *(f"{f[n]:.3f}" for n in names))
    t.add_row("mean", "", *(f"{r['mean_sd'][n]['mean']:.3f}" for n in names))
    t.add_row("sd", "", *(f"{r['mean_sd'][n]['sd']:.3f}" for n in names))
    out.print(t)
    auc = r["pooled_out_of_fold"].get("roc_auc")
    if auc:
        out.print(f"pooled out-of-fold ROC-AUC {sig3(auc['value'])} [{sig3(auc['ci_low'])}, {sig3(auc['ci_high'])}]")
    out.print(f"out-of-fold predictions: {out_dir / 'oof_predictions.csv'}; summary: {out_dir / 'cv.json'}")


def show_margins(m: dict | None) -> None:
    """``explain``'s line on the heatmaps' mass in the margins and on markers, and its warning."""
    if not m:
        return
    out.print(f"heatmap mass in the outer {m['band']:.0%} band: {m['margin_share']:.0%} (its area: {m['margin_area']:.0%})"
              + (f"; on burned-in markers ({m['n_with_markers']} images): {m['marker_share']:.0%} (their area: "
                 f"{m['marker_area']:.0%})" if "marker_share" in m else ""))
    if m["warning"]:
        out.print(f"[bold yellow]warning:[/] {m['warning']}")
