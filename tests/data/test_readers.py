import numpy as np
import pytest
from PIL import Image

from bonetumor.data.pixels import ReadOptions, parse_window
from bonetumor.data.readers import read_image
from bonetumor.data.writers import write_png
from bonetumor.errors import BadImageError, BonetumorError


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


def _bars(h, w, levels=4):
    """Vertical bars of ``levels`` grey levels, each bar wide enough to survive shrinking."""
    x = np.arange(w)[None, :].repeat(h, 0)
    return (x * levels // w).astype(np.float64) / (levels - 1)


def test_4000px_16bit_tiff_and_png_are_shrunk_while_read(tmp_path):
    # A 4000x4000 16-bit radiograph: read at most max_side wide, with its grey levels kept.
    img = _bars(4000, 4000)
    write_png(tmp_path / "big.png", img, bit_depth=16)
    Image.fromarray(np.round(img * 65535).astype(np.uint16)).save(tmp_path / "big.tif")
    for name in ("big.png", "big.tif"):
        a = read_image(tmp_path / name)
        assert a.shape == (1024, 1024, 1) and a.dtype == np.float32
        # Bar interiors keep their exact value (area averaging only mixes the 3 bar edges).
        cols = [128, 384, 640, 896]
        np.testing.assert_allclose(a[512, cols, 0], [0, 1 / 3, 2 / 3, 1], atol=1e-4)
    assert read_image(tmp_path / "big.png", options=ReadOptions(max_side=4000)).shape == (4000, 4000, 1)


def test_16bit_png_windows(tmp_path):
    # A 12-bit image stored in a 16-bit PNG looks black at full range; a window fixes that.
    vals = np.linspace(0, 4095, 64 * 64).reshape(64, 64) / 65535
    write_png(tmp_path / "t.png", vals, bit_depth=16)
    raw = np.round(vals * 65535)
    full = read_image(tmp_path / "t.png")[..., 0]
    assert full.max() < 0.07
    pct = read_image(tmp_path / "t.png", options=ReadOptions(window="p0,p100"))[..., 0]
    np.testing.assert_allclose(pct, raw / raw.max(), atol=1e-6)
    cw = read_image(tmp_path / "t.png", options=ReadOptions(window="2048,4096"))[..., 0]
    np.testing.assert_allclose(cw, np.clip((raw - 2047.5) / 4095 + 0.5, 0, 1), atol=1e-6)


@pytest.mark.parametrize("text, problem", [("40", "expected CENTRE,WIDTH"), ("40,-1", "width must be positive"),
                                           ("p99,p1", "percentiles must satisfy"), ("a,b", "expected CENTRE,WIDTH")])
def test_bad_window_text(text, problem):
    with pytest.raises(BonetumorError, match=problem):
        parse_window(text)


def test_decompression_bomb_guard_is_answered(tmp_path, monkeypatch):
    write_png(tmp_path / "wide.png", np.zeros((100, 300)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 30,000 pixels: above it (and above twice it)
    with pytest.raises(BadImageError) as e:
        read_image(tmp_path / "wide.png")
    msg = str(e.value)
    assert "wide.png: 300x100 = 30,000 pixels is above Pillow's decompression-bomb limit of 10,000" in msg
    assert "--allow-large-images" in msg and "\n" not in msg
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # between the limit and twice it: Pillow only warns
    with pytest.raises(BadImageError, match="decompression-bomb"):
        read_image(tmp_path / "wide.png")
    assert read_image(tmp_path / "wide.png", options=ReadOptions(allow_large=True)).shape == (100, 300, 1)


def test_content_decides_not_the_extension(tmp_path):
    arr = (np.arange(20 * 30).reshape(20, 30) % 256).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "really_png.jpg", format="PNG")
    np.testing.assert_allclose(read_image(tmp_path / "really_png.jpg")[..., 0], arr / 255, atol=1e-7)
