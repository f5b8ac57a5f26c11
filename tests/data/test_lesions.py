import csv

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from bonetumor.data.lesions import (
    check_lesions,
    lesion_mask,
    mask_lookup,
    training_lesions,
)
from bonetumor.data.studies import Sample
from bonetumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, create_transforms
from bonetumor.errors import BonetumorError
from bonetumor.train.batches import ImageDataset

BOXES = {"a.png": (4, 6, 14, 20), "b.png": (20, 2, 30, 9)}  # x0, y0, x1, y1 of each image's lesion


def _box_data(root, size=32):
    """Two cancers with a box lesion (bright inside) and a normal, with masks as files and boxes."""
    (root / "img").mkdir(parents=True)
    (root / "masks").mkdir()
    scale = size / 32
    for name in ("a.png", "b.png", "c.png"):
        img = np.full((size, size), 40, np.uint8)
        if name in BOXES:
            x0, y0, x1, y1 = (int(v * scale) for v in BOXES[name])
            img[y0:y1, x0:x1] = 220
            m = np.zeros((size, size), np.uint8)
            m[y0:y1, x0:x1] = 255
            Image.fromarray(m).save(root / "masks" / name)
        Image.fromarray(img).save(root / "img" / name)
    with open(root / "boxes.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "x0", "y0", "x1", "y1"])
        for name, box in BOXES.items():
            w.writerow([f"img/{name}", *(v * scale for v in box)])
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "mask_path"])
        for name in ("a.png", "b.png", "c.png"):
            w.writerow([f"img/{name}", "normal" if name == "c.png" else "cancer",
                        f"masks/{name}" if name in BOXES else ""])
    samples = [Sample(str(root / "img" / n), "normal" if n == "c.png" else "cancer", mask_path=str(root / "masks" / n)
                      if n in BOXES else None) for n in ("a.png", "b.png", "c.png")]
    return samples


def test_manifest_folder_and_boxes_give_the_same_masks(tmp_path):
    samples = _box_data(tmp_path)
    expected = []
    for name in ("a.png", "b.png"):
        x0, y0, x1, y1 = BOXES[name]
        m = np.zeros((32, 32), bool)
        m[y0:y1, x0:x1] = True
        expected.append(m)
    for spec in ("manifest", str(tmp_path / "masks"), str(tmp_path / "boxes.csv")):
        sources = training_lesions(spec, samples, str(tmp_path))
        assert sources[2] is None, spec  # the normal has none
        assert check_lesions(sources) == 2
        for src, want in zip(sources[:2], expected):
            assert np.array_equal(lesion_mask(src, (32, 32)), want), spec


def test_a_mask_of_another_size_is_resized_nearest_to_its_image(tmp_path):
    m = np.zeros((16, 16), np.uint8)
    m[2:5, 3:9] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    got = lesion_mask(tmp_path / "m.png", (32, 32))
    want = np.zeros((32, 32), bool)
    want[4:10, 6:18] = True
    assert np.array_equal(got, want)


def test_a_bad_mask_file_is_one_line_naming_it(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(BonetumorError) as e:
        check_lesions([tmp_path / "bad.png"])
    assert "bad.png" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(BonetumorError, match="missing.png: lesion mask not found"):
        check_lesions([tmp_path / "missing.png"])
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1\na.png,1,2,three,4\n")
    with pytest.raises(BonetumorError, match=r"boxes.csv, line 2: expected path,x0,y0,x1,y1"):
        training_lesions(str(tmp_path / "boxes.csv"), [Sample(str(tmp_path / "a.png"), "cancer")], str(tmp_path))


def test_manifest_guidance_needs_mask_paths_and_an_unknown_source_is_refused(tmp_path):
    with pytest.raises(BonetumorError, match="no mask_path values"):
        training_lesions("manifest", [Sample("a.png", "cancer")], None)
    with pytest.raises(BonetumorError, match="--lesion-masks nowhere: use manifest"):
        training_lesions("nowhere", [Sample("a.png", "cancer")], None)


def test_explain_reads_a_folder_mask_named_by_stem(tmp_path):
    Image.fromarray(np.full((8, 8), 255, np.uint8)).save(tmp_path / "scan.png")
    lookup = mask_lookup(masks=tmp_path)
    assert lookup(tmp_path / "other" / "scan.jpg", (8, 8)).all()
    assert lookup(tmp_path / "none.jpg", (8, 8)) is None


def _image_of(x):
    """The first channel of a normalised image, back in [0, 1]."""
    return x[0] * IMAGENET_STD[0] + IMAGENET_MEAN[0]


def test_the_mask_follows_the_flip_of_its_image_pixel_for_pixel():
    x = torch.zeros(1, 32, 32)
    x[0, 4:12, 2:9] = 1.0  # off-centre, so that a flip moves it
    tf = create_transforms(True, 32, hflip=True, rotate_degrees=0, zoom=(1.0, 1.0))
    flipped = set()
    for seed in range(8):
        torch.manual_seed(seed)
        xi, mi = tf(x, tv_tensors.Mask((x > 0.5).to(torch.uint8)))
        assert torch.equal(mi[0] > 0, _image_of(xi) > 0.5)
        flipped.add(bool(mi[0, 5, 26]))
    assert flipped == {True, False}  # both a flipped and an unflipped draw were checked


def test_the_mask_follows_rotation_zoom_and_resize_in_the_dataset(tmp_path):
    samples = _box_data(tmp_path, size=48)
    sources = training_lesions("manifest", samples, str(tmp_path))
    tf = create_transforms(True, 32, hflip=True, rotate_degrees=30, zoom=(0.8, 1.2))
    ds = ImageDataset(samples, ["normal", "cancer"], tf, lesions=sources)
    for seed in range(4):
        torch.manual_seed(seed)
        x, y, i, m = ds[0]
        bright = _image_of(x) > 0.5
        iou = (bright & m).sum() / (bright | m).sum()
        assert m.shape == (32, 32) and m.dtype == torch.bool and y == 1
        assert iou > 0.85, (seed, float(iou))
    x, y, i, m = ds[2]  # the normal: an all-empty mask
    assert y == 0 and not m.any()


def test_boxes_match_by_relative_path_and_never_by_a_name_another_folder_shares(tmp_path):
    (tmp_path / "boxes.csv").write_text("path,x0,y0,x1,y1\ncancer/0.png,1,1,3,3\nbare.png,0,0,2,2\n")
    samples = [Sample(str(tmp_path / "cancer" / "0.png"), "cancer"), Sample(str(tmp_path / "normal" / "0.png"), "normal"),
               Sample(str(tmp_path / "x" / "bare.png"), "cancer")]
    from_root = training_lesions(str(tmp_path / "boxes.csv"), samples, str(tmp_path / "elsewhere"))
    assert from_root == [[(1.0, 1.0, 3.0, 3.0)], None, [(0.0, 0.0, 2.0, 2.0)]]  # relative to the CSV's folder


def test_the_image_cache_gives_the_same_images_and_masks_as_reading_each_time(tmp_path):
    from bonetumor.data.transforms import create_resize

    samples = _box_data(tmp_path, size=48)
    sources = training_lesions("manifest", samples, str(tmp_path))
    plain = ImageDataset(samples, ["normal", "cancer"], create_transforms(True, 32), lesions=sources)
    cached = ImageDataset(samples, ["normal", "cancer"], create_transforms(True, 32, resize=False),
                          resize=create_resize(32), lesions=sources)
    for i in (0, 1, 2, 0):  # image 0 twice: the second time from the cache
        torch.manual_seed(i)
        a = plain[i]
        torch.manual_seed(i)
        b = cached[i]
        assert torch.equal(a[0], b[0]) and torch.equal(a[3], b[3])
    assert int(cached[0][3].sum()) > 50 and len(cached._cache) == len(cached._masks) == 3
