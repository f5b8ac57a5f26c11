import numpy as np
import pytest
from PIL import Image

from bonetumor.data.io import read_image, write_png
from bonetumor.errors import BadImageError


@pytest.mark.parametrize("mode,channels", [("L", 1), ("RGB", 3), ("RGBA", 3), ("P", 3), ("LA", 1), ("1", 1), ("CMYK", 3)])
def test_every_mode_reads_as_float_in_unit_range(tmp_path, mode, channels):
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert(mode)
    p = tmp_path / ("x.tif" if mode == "CMYK" else "x.png")
    img.save(p)
    a = read_image(p)
    assert a.dtype == np.float32 and a.shape == (20, 30, channels)
    assert 0.0 <= a.min() and a.max() <= 1.0


def test_8bit_values_are_exact(tmp_path):
    arr = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(arr).save(tmp_path / "g.png")
    np.testing.assert_allclose(read_image(tmp_path / "g.png")[..., 0], arr / 255.0, atol=1e-7)


def test_16bit_png_keeps_its_precision(tmp_path):
    vals = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    write_png(tmp_path / "s.png", vals, bit_depth=16)
    with Image.open(tmp_path / "s.png") as im:
        assert im.mode.startswith("I")
    a = read_image(tmp_path / "s.png")[..., 0]
    # 16-bit quantisation step is 1/65535; 8-bit would be 1/255.
    assert np.abs(a - vals).max() <= 0.5 / 65535 + 1e-7
    assert len(np.unique(a)) > 1000


def test_rgb_jpeg(tmp_path):
    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "c.jpg")
    a = read_image(tmp_path / "c.jpg")
    assert a.shape == (10, 12, 3) and abs(a.mean() - 200 / 255) < 0.02


@pytest.mark.parametrize("content,problem", [
    (b"", "empty file"),
    (b"this is plain text, not a picture", "not an image"),
])
def test_bad_files_name_the_file(tmp_path, content, problem):
    p = tmp_path / "bad image.png"
    p.write_bytes(content)
    with pytest.raises(BadImageError) as e:
        read_image(p)
    assert str(p) in str(e.value) and problem in str(e.value)
    assert "\n" not in str(e.value)


def test_truncated_png(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="t.png: cannot decode"):
        read_image(tmp_path / "t.png")


def test_one_pixel_image_is_refused(tmp_path):
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "p.png")
    with pytest.raises(BadImageError, match="too small"):
        read_image(tmp_path / "p.png")


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="file not found"):
        read_image(tmp_path / "nope.png")
