"""--overwrite removes what bonetumor wrote and nothing else: never the input data, never a user's file."""

import json
import shutil

import pytest
from conftest import tiny_config
from typer.testing import CliRunner

from bonetumor.cli import app
from bonetumor.errors import BonetumorError
from bonetumor.files import MARKER, RunDir, recorded_names

pytestmark = pytest.mark.bad_input  # the bad-input corpus: counted in the README

runner = CliRunner()


def _files(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _cli(*args):
    r = runner.invoke(app, [str(a) for a in args])
    assert r.exception is None or isinstance(r.exception, SystemExit), f"uncaught {r.exception!r}"
    return r.exit_code, " ".join(r.output.split())


@pytest.fixture
def data(tiny_data, tmp_path):
    """A private copy of the tiny data set: these tests try to destroy it."""
    shutil.copytree(tiny_data, tmp_path / "data")
    return tmp_path / "data"


def test_train_and_predict_refuse_the_data_folder_as_output(data, tmp_path):
    before = _files(data)
    assert len(before) == 73  # 48 images, the masks of the 24 with cancer, the manifest
    fake_checkpoint = tmp_path / "best.pt"
    fake_checkpoint.write_bytes(b"not read: the output folder is refused first")
    for args in (["train", data, "--out", data, "--overwrite", "--epochs", "1", "--image-size", "32"],
                 ["predict", fake_checkpoint, data, "--out", data, "--overwrite"],
                 ["evaluate", fake_checkpoint, data, "--out", data, "--overwrite"],
                 ["explain", fake_checkpoint, data, "--out", data, "--overwrite"],
                 ["audit", data, "--out", data, "--overwrite"],
                 ["cv", data, "--out", data, "--overwrite"]):
        code, out = _cli(*args)
        assert code != 0 and "the output folder is the input" in out and str(data) in out, (args, out)
        assert _files(data) == before, args


def test_a_folder_above_the_input_is_refused_too(data, tmp_path):
    from bonetumor import fit

    with pytest.raises(BonetumorError, match="the output folder holds the input"):
        fit(tiny_config(data), tmp_path, overwrite=True, verbose=False)
    with pytest.raises(BonetumorError, match="the output folder holds the input"):
        fit(tiny_config(None, manifest=str(data / "manifest.csv")), data.parent, overwrite=True, verbose=False)
    assert len(_files(data)) == 73


def test_overwrite_refuses_a_folder_that_bonetumor_did_not_write(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.docx").write_text("two years of work")
    with pytest.raises(BonetumorError, match="did not write .* will not touch it"):
        RunDir.create(tmp_path / "mine", overwrite=True)
    assert (tmp_path / "mine" / "thesis.docx").read_text() == "two years of work"
    RunDir.create(tmp_path / "empty")  # a new folder, and an empty one, need no flag
    (tmp_path / "empty2").mkdir()
    RunDir.create(tmp_path / "empty2")


def test_overwrite_removes_only_what_bonetumor_wrote(tmp_path):
    run = RunDir.create(tmp_path / "run")
    run.write_json(RunDir.METRICS, {"a": 1})
    run.write_json(RunDir.METRICS, {"a": 2})  # written twice, recorded once
    run.folder(RunDir.MAPS)
    run.save(f"{RunDir.MAPS}/x.npy", lambda tmp: tmp.write_bytes(b"map"))
    run.save(f"{RunDir.PANELS}/x.png", lambda tmp: tmp.write_bytes(b"png"))
    (run / RunDir.PANELS / "my_note.txt").write_text("keep")  # the user's, in a folder bonetumor made
    (run / "notes.md").write_text("keep")
    (run / ".metrics.json.abc.tmp").write_text("a kill's leftover")
    nested = RunDir.create(run / "fold_1")
    nested.write_text(RunDir.HISTORY, "epoch\n")
    assert recorded_names(run.path) == [RunDir.METRICS, "maps/x.npy", "panels/x.png"]

    RunDir.create(run.path, overwrite=True)
    assert _files(run.path) == [MARKER, "notes.md", "panels/my_note.txt"]
    assert recorded_names(run.path) == []  # a fresh record for the new run


def test_a_forged_record_cannot_reach_outside_the_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("x")
    run = RunDir.create(tmp_path / "run")
    run.write_text("a.txt", "a")
    with open(run / MARKER, "a") as f:
        for name in ("../precious.txt", str(tmp_path / "precious.txt"), "../", "not json"):
            f.write((json.dumps(name) if name != "not json" else name) + "\n")
    RunDir.create(run.path, overwrite=True)
    assert (tmp_path / "precious.txt").is_file() and _files(run.path) == [MARKER]
    # a subfolder bonetumor wrote into, since replaced by a link to the user's own folder
    run.save(f"{RunDir.MAPS}/x.npy", lambda tmp: tmp.write_bytes(b"map"))
    shutil.rmtree(run / RunDir.MAPS)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "x.npy").write_bytes(b"the user's")
    (run / RunDir.MAPS).symlink_to(tmp_path / "mine")
    RunDir.create(run.path, overwrite=True)
    assert (tmp_path / "mine" / "x.npy").read_bytes() == b"the user's"


def test_a_second_training_run_with_overwrite_keeps_the_users_file(tiny_data, tmp_path):
    from bonetumor import fit

    fit(tiny_config(tiny_data, epochs=1), tmp_path / "r", verbose=False)
    (tmp_path / "r" / "my_notes.txt").write_text("lr 1e-3 looked better")
    first = set(_files(tmp_path / "r"))
    assert {RunDir.BEST, RunDir.LAST, RunDir.CONFIG, RunDir.SPLITS, RunDir.CURVES, RunDir.AUDIT} <= first
    fit(tiny_config(tiny_data, epochs=1), tmp_path / "r", overwrite=True, verbose=False)
    assert set(_files(tmp_path / "r")) == first  # the audit too: it is run again, not lost
    assert (tmp_path / "r" / "my_notes.txt").read_text() == "lr 1e-3 looked better"


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_again(tiny_data, tmp_path):
    from bonetumor import fit
    from bonetumor.train.setup import start_run

    cfg = tiny_config(tiny_data, epochs=1, audit=False)
    start_run(cfg, RunDir(tmp_path / "r"), verbose=False)  # what a run killed in its first epoch leaves
    (tmp_path / "r" / "my_notes.txt").write_text("keep")
    left = set(_files(tmp_path / "r"))
    assert RunDir.CONFIG in left and RunDir.LAST not in left
    with pytest.raises(BonetumorError, match="already exists"):
        fit(cfg, tmp_path / "r", verbose=False)
    res = fit(cfg, tmp_path / "r", resume=True, verbose=False)
    assert [h["epoch"] for h in res.history] == [1] and (tmp_path / "r" / RunDir.LAST).is_file()
    assert (tmp_path / "r" / "my_notes.txt").read_text() == "keep"
    # a folder with neither a checkpoint nor bonetumor's record is still not resumed
    (tmp_path / "other").mkdir()
    with pytest.raises(BonetumorError, match="nothing to resume"):
        fit(cfg, tmp_path / "other", resume=True, verbose=False)


def test_export_and_report_never_write_over_their_input_or_an_unnamed_file(tiny_run, tmp_path):
    from bonetumor.model.export import export_onnx
    from bonetumor.report import build_report

    best = tmp_path / "best.pt"
    shutil.copy(tiny_run / RunDir.BEST, best)
    size = best.stat().st_size
    with pytest.raises(BonetumorError, match="is the input"):
        export_onnx(best, best, overwrite=True)
    with pytest.raises(BonetumorError, match="is a folder"):
        export_onnx(best, tmp_path, overwrite=True)
    assert best.stat().st_size == size
    (tmp_path / "figure.png").write_bytes(b"a user's figure")
    with pytest.raises(BonetumorError, match="already exists; pass --overwrite"):
        build_report(tiny_run, out=tmp_path / "figure.png")
    assert (tmp_path / "figure.png").read_bytes() == b"a user's figure"
    code, out = _cli("report", tiny_run, "--out", tmp_path / "figure.png")
    assert code != 0 and "already exists" in out
    code, out = _cli("report", tiny_run, "--out", tmp_path / "figure.png", "--overwrite")
    assert code == 0 and (tmp_path / "figure.png").read_text().startswith("<!doctype html>")


def test_the_refusal_offers_resume_only_to_training(tmp_path, tiny_data):
    from bonetumor import fit

    RunDir.create(tmp_path / "e").write_text(RunDir.METRICS, "{}")
    with pytest.raises(BonetumorError, match=r"already exists; pass --overwrite to replace it$"):
        RunDir.create(tmp_path / "e")
    with pytest.raises(BonetumorError, match="pass --overwrite to replace it or --resume to continue"):
        fit(tiny_config(tiny_data), tmp_path / "e", verbose=False)


def test_a_command_stopped_by_a_bad_file_leaves_no_folder_that_refuses_its_rerun(tiny_run, tiny_data, tmp_path):
    """predict makes its folder before it reads the images: one that stopped on a broken file
    holds bonetumor's record alone, so the same command with the file fixed needs no --overwrite;
    a folder with a recorded file is still refused."""
    files = tmp_path / "files"
    shutil.copytree(tiny_data / "test" / "cancer", files)
    (files / "zz_broken.png").write_text("not an image")
    code, said = _cli("predict", tiny_run / "best.pt", files, "--out", tmp_path / "p", "--device", "cpu")
    assert code == 2 and "zz_broken.png: not an image file" in said
    assert _files(tmp_path / "p") == [MARKER] and recorded_names(tmp_path / "p") == []
    (files / "zz_broken.png").unlink()
    code, said = _cli("predict", tiny_run / "best.pt", files, "--out", tmp_path / "p", "--device", "cpu")
    assert code == 0, said
    assert recorded_names(tmp_path / "p") == ["predictions.csv"]
    code, said = _cli("predict", tiny_run / "best.pt", files, "--out", tmp_path / "p", "--device", "cpu")
    assert code == 2 and "already exists; pass --overwrite" in said
