import os
import stat

from bonetumor.files import atomic_write_json, atomic_write_text, prepare_out_dir


def test_atomic_write_creates_folders_and_normal_permissions(tmp_path):
    atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}\n'
    mode = stat.S_IMODE(os.stat(tmp_path / "a" / "b.json").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask
    atomic_write_text(tmp_path / "a" / "b.json", "new")
    assert (tmp_path / "a" / "b.json").read_text() == "new" and len(list((tmp_path / "a").iterdir())) == 1


def test_prepare_out_dir_refuses_unwritable_and_file(tmp_path):
    import pytest

    from bonetumor.errors import BonetumorError

    (tmp_path / "f").write_text("x")
    with pytest.raises(BonetumorError, match="not a folder"):
        prepare_out_dir(tmp_path / "f")
    if os.geteuid() != 0:  # root can write anywhere
        (tmp_path / "ro").mkdir(mode=0o500)
        with pytest.raises(BonetumorError, match="cannot write"):
            prepare_out_dir(tmp_path / "ro" / "run")
