"""Find the samples of a data set in any of the layouts users have: a ``DatasetIndex``.

Layouts (first match wins):
    manifest   ``--manifest file.csv`` (or ``DATA/manifest.csv``): path,label[,patient_id][,split][,mask_path]
               (a path may be an image, a DICOM file, a DICOM series folder or a NIfTI volume)
    dirs       ``--train-dir/--val-dir/--test-dir``, each ``<class>/*`` (any folder names)
    splits     ``DATA/{train,valid|val,test}/<class>/*``
    roboflow   ``DATA/<split>/_classes.csv`` with one-hot class columns, images beside it
    classes    ``DATA/<class>/*`` with no splits: the tool splits (stratified, seeded)

Files may be PNG/JPEG/TIFF/BMP/WebP, DICOM (also extension-less, and series in folders) or
NIfTI; each volume becomes its non-empty slices, which keep their volume as their study so
that they never straddle splits.
"""

from __future__ import annotations

import csv
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

from bonetumor.data.pixels import ReadOptions
from bonetumor.data.readers import is_image_file, read_image
from bonetumor.data.studies import Sample, expand_inputs, expand_volumes
from bonetumor.errors import BadImageError, BonetumorError, first_line
from bonetumor.progress import tracked


@dataclass
class DatasetIndex:
    """All samples found, the class list (binary: [negative, positive]), how they were found and
    how their pixels are read."""

    samples: list[Sample]
    classes: list[str]
    layout: str
    root: str | None = None
    patient_level: bool = False
    ignored_files: list[str] = field(default_factory=list)
    options: ReadOptions = field(default_factory=ReadOptions)
    dropped_classes: dict[str, int] = field(default_factory=dict)
    split_by: str = "given"
    facts: dict | None = None  # the audit's scan by sample ref, when splitting needed it first (--split-by cluster)

    def split(self, name: str) -> list[Sample]:
        """Samples of one split ('train', 'valid' or 'test')."""
        return [s for s in self.samples if s.split == name]

    def counts(self) -> dict[str, dict[str, int]]:
        """{split: {class: n}} for the record and the report."""
        out: dict[str, dict[str, int]] = {}
        for s in self.samples:
            out.setdefault(str(s.split), {c: 0 for c in self.classes})[s.label] += 1
        return out

    @property
    def split_level(self) -> str:
        """'cluster' when copies were kept together (--split-by cluster); else 'patient' when every
        sample has a patient id (splits keep patients apart), else 'image'."""
        return "cluster" if self.split_by == "cluster" else "patient" if self.patient_level else "image"


SPLIT_ALIASES = {"train": "train", "training": "train", "valid": "valid", "val": "valid",
                 "validation": "valid", "test": "test", "testing": "test"}


def _norm_split(value: str, where: str) -> str:
    v = value.strip().lower()
    if v not in SPLIT_ALIASES:
        raise BonetumorError(f"{where}: unknown split {value!r} (use train, valid or test)")
    return SPLIT_ALIASES[v]


def _images_under(folder: Path, ignored: list[str]) -> list[Path]:
    """Image files below ``folder`` (recursive, sorted, hidden files skipped); others noted."""
    out = []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or p.is_dir():
            continue
        if is_image_file(p):
            out.append(p)
        else:
            ignored.append(str(p))
    return out


def _class_folders(folder: Path, split: str | None, ignored: list[str]) -> list[Sample]:
    classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise BonetumorError(f"{folder}: no class folders found (expected {folder}/<class>/<images>)")
    samples = []
    for d in classes:
        files = _images_under(d, ignored)
        if not files:
            raise BonetumorError(f"{d}: class folder holds no images")
        samples += [Sample(str(f), d.name, None, split) for f in files]
    return samples


def _roboflow_split(folder: Path, split: str) -> list[Sample]:
    """Roboflow classification export: ``_classes.csv`` with filename and one-hot columns."""
    table = folder / "_classes.csv"
    with open(table, newline="", encoding="utf-8-sig") as f:
        rows = list(csv.reader(f))
    if not rows or len(rows[0]) < 3:
        raise BonetumorError(f"{table}: expected columns filename,<class>,<class>...")
    header = [h.strip() for h in rows[0]]
    classes = header[1:]
    samples = []
    for i, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        hot = [c for c, v in zip(classes, row[1:]) if v.strip() in ("1", "1.0")]
        if len(hot) != 1:
            raise BonetumorError(f"{table}, line {i}: expected exactly one class marked 1, found {len(hot)}")
        samples.append(Sample(str(folder / row[0].strip()), hot[0], None, split))
    return samples


def read_manifest(path: Path) -> list[Sample]:
    """Samples listed in a manifest CSV (paths relative to its folder; none may lie outside it)."""
    base = path.parent.resolve()
    if path.is_dir():
        raise BonetumorError(f"{path}: is a folder; --manifest names a CSV file (path,label,...)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            missing = {"path", "label"} - set(cols)
            if missing:
                raise BonetumorError(f"{path}: manifest lacks column(s) {', '.join(sorted(missing))}")
            rows = list(reader)
    except FileNotFoundError:
        raise BonetumorError(f"{path}: manifest not found") from None
    except UnicodeDecodeError as e:
        raise BonetumorError(f"{path}: manifest is not UTF-8 text (byte {e.start}); save it as a UTF-8 CSV") from None
    except (OSError, csv.Error) as e:
        raise BonetumorError(f"{path}: manifest cannot be read ({first_line(e)})") from None
    samples = []
    for i, r in enumerate(rows, start=2):
        r = {k.strip(): (v or "").strip() for k, v in r.items() if k}
        if not r.get("path") or not r.get("label"):
            raise BonetumorError(f"{path}, line {i}: empty path or label")
        p = _listed(base, r["path"], f"{path}, line {i}")
        mask = str(_listed(base, r["mask_path"], f"{path}, line {i}, mask_path")) if r.get("mask_path") else None
        split = _norm_split(r["split"], f"{path}, line {i}") if r.get("split") else None
        sample = Sample(str(p), r["label"], r.get("patient_id") or None, split, mask)
        if p.is_dir():  # a DICOM series (or any folder of slices): one study
            try:
                refs = expand_inputs([p])
            except BonetumorError:
                raise BonetumorError(f"{path}, line {i}: {r['path']} is a folder with no image files") from None
            samples += [replace(sample, path=x.path, frame=x.frame, study=x.study or str(p)) for x in refs]
        else:
            samples.append(sample)
    if not samples:
        raise BonetumorError(f"{path}: manifest lists no images")
    return samples


def _listed(base: Path, name: str, where: str) -> Path:
    """A path a manifest lists, resolved; refused when it lies outside the manifest's folder (a
    manifest must not reach a system file) or loops through symbolic links."""
    try:
        p = (base / name).resolve()
    except (RuntimeError, OSError) as e:  # Python 3.11 raises RuntimeError for a symlink loop
        raise BonetumorError(f"{where}: {name} cannot be resolved ({first_line(e)})") from None
    if not p.is_relative_to(base):
        raise BonetumorError(f"{where}: {name} lies outside the manifest's folder")
    return p


def _find(data, manifest, train_dir, val_dir, test_dir, ignored) -> tuple[list[Sample], str, str | None]:
    if manifest:
        return read_manifest(Path(manifest)), "manifest", str(Path(manifest).parent)
    if train_dir:
        samples = []
        for split, d in (("train", train_dir), ("valid", val_dir), ("test", test_dir)):
            if d:
                if not Path(d).is_dir():
                    raise BonetumorError(f"{d}: folder not found")
                samples += _class_folders(Path(d), split, ignored)
        return samples, "dirs", None
    root = Path(data)
    if not root.exists():
        raise BonetumorError(f"{root}: data folder not found")
    if not root.is_dir():
        raise BonetumorError(f"{root}: expected a folder of images (or pass --manifest FILE.csv)")
    if (root / "manifest.csv").is_file():
        return read_manifest(root / "manifest.csv"), "manifest", str(root)
    split_dirs = {SPLIT_ALIASES[d.name.lower()]: d for d in sorted(root.iterdir())
                  if d.is_dir() and d.name.lower() in SPLIT_ALIASES}
    if split_dirs:
        samples, layout = [], "splits"
        for split, d in split_dirs.items():
            if (d / "_classes.csv").is_file():
                samples += _roboflow_split(d, split)
                layout = "roboflow"
            else:
                samples += _class_folders(d, split, ignored)
        return samples, layout, str(root)
    return _class_folders(root, None, ignored), "classes", str(root)


def order_classes(labels: Sequence[str], positive_class: str | None) -> list[str]:
    """Class list with the positive class last for binary tasks, so output 1 = P(positive).

    Sorted alphabetically, "cancer" would come first and a sigmoid output would be P(normal)
    under a report that calls it cancer; the positive class is therefore put last explicitly.
    """
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise BonetumorError(f"need at least two classes, found only {classes or 'none'}")
    if len(classes) > 2:
        return classes
    pos = positive_class or ("cancer" if "cancer" in classes else None)
    if pos is None:
        raise BonetumorError(f"no class named 'cancer' among {classes}; pass --positive-class NAME")
    if pos not in classes:
        raise BonetumorError(f"--positive-class {pos!r} is not one of the classes {classes}")
    return [c for c in classes if c != pos] + [pos]


def discover(data=None, manifest=None, train_dir=None, val_dir=None, test_dir=None,
             positive_class=None, classes: Sequence[str] | None = None,
             options: ReadOptions | None = None, class_map: dict[str, str] | None = None) -> DatasetIndex:
    """Find every sample under the given data arguments (see the module docstring for layouts).

    Args:
        classes: a fixed class list (from a checkpoint); samples of other classes are an error.
        options: how volumes are sliced (``slice_axis``).
        class_map: the data's class names -> the names used from here on (``malignant=cancer``);
            applied before the classes are ordered or checked. Unmapped classes are dropped and
            counted in ``dropped_classes``.
    """
    ignored: list = []
    samples, layout, root = _find(data, manifest, train_dir, val_dir, test_dir, ignored)
    samples = expand_volumes(samples, options)
    dropped: dict[str, int] = {}
    if class_map:
        for s in samples:
            if s.label not in class_map:
                dropped[s.label] = dropped.get(s.label, 0) + 1
        samples = [replace(s, label=class_map[s.label]) for s in samples if s.label in class_map]
    if classes is None:
        classes = order_classes([s.label for s in samples], positive_class)
    else:
        unknown = sorted({s.label for s in samples} - set(classes))
        if unknown:
            raise BonetumorError(f"classes {unknown} are not among the model's classes {list(classes)}")
    patient_level = bool(samples) and all(s.patient_id for s in samples)
    return DatasetIndex(samples, list(classes), layout, root, patient_level, [str(p) for p in ignored],
                        options or ReadOptions(), dropped)


def check_files(samples: Sequence[Sample], skip_bad: bool, workers: int = 4,
                problems: Sequence[str | None] | None = None,
                options: ReadOptions | None = None) -> tuple[list[Sample], list[tuple[str, str]]]:
    """Decode every image once; stop at the first bad one, or with ``skip_bad`` drop and list them.
    ``problems`` (one per sample, None when readable) reuses a decoding pass already made. An
    image listed twice, or under two labels (``listing_problems``), is a bad one too.

    Returns:
        (good samples, [(path, problem), ...] of skipped ones).

    Raises:
        BadImageError: a file cannot be read and ``skip_bad`` is False (one line naming it).
    """
    if problems is None:
        problems = image_problems(samples, workers, options)
    listed = listing_problems(samples)
    good, bad = [], []
    for i, (s, prob) in enumerate(zip(samples, problems)):
        prob = listed.get(i, prob)
        if prob is None:
            good.append(s)
        elif skip_bad:
            bad.append((s.ref, prob))
        else:
            raise BadImageError(s.ref, f"{prob} (pass --skip-bad-files to skip such files)")
    return good, bad


def image_problems(samples: Sequence[Sample], workers: int = 4, options: ReadOptions | None = None,
                   progress: bool = True) -> list[str | None]:
    """Each sample's problem as an image (None when it decodes), decoding every one once."""
    def probe(s: Sample) -> str | None:
        try:
            read_image(s.path, s.frame, options)
        except BadImageError as e:
            return e.problem
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as ex:
        return list(tracked(ex.map(probe, samples), len(samples), "checking images", enabled=progress))


def listing_problems(samples: Sequence[Sample]) -> dict[int, str]:
    """{index: problem} for images listed more than once: a repeat under the same label (it would
    count twice in training and in every metric), and every listing of one under two labels
    (which label is right cannot be told)."""
    seen: dict[tuple[str, int | None], list[int]] = {}
    for i, s in enumerate(samples):
        seen.setdefault((s.path, s.frame), []).append(i)
    out: dict[int, str] = {}
    for at in seen.values():
        labels = sorted({samples[i].label or "" for i in at})
        if len(labels) > 1:
            out.update({i: f"listed under {len(labels)} labels ({', '.join(labels)})" for i in at})
        else:
            out.update({i: f"listed {len(at)} times" for i in at[1:]})
    return out


def fingerprint(samples: Sequence[Sample], root: str | None = None) -> str:
    """SHA-256 over (relative path, slice, label, split, file content) of every sample, in a fixed order."""
    h = hashlib.sha256()
    contents: dict[str, str] = {}  # a volume's slices share one file: hash it once
    for s in sorted(samples, key=lambda s: (s.path, s.frame or 0)):
        rel = str(Path(s.path).relative_to(root)) if root and Path(s.path).is_relative_to(root) else Path(s.path).name
        if s.path not in contents:
            with open(s.path, "rb") as f:
                contents[s.path] = hashlib.sha256(f.read()).hexdigest()
        frame = "" if s.frame is None else f"#{s.frame}"
        h.update(f"{rel}{frame}\t{s.label}\t{s.split}\t{contents[s.path]}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
