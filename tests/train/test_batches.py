"""Training's image Dataset: tensors, the image cache, seeded training."""

import os

import pytest
import torch
from conftest import make_class_tree

from bonetumor.data.layouts import discover
from bonetumor.data.transforms import create_resize, create_transforms
from bonetumor.train.batches import ImageDataset


def test_dataset_gives_3_channel_normalised_tensors(tmp_path):
    make_class_tree(tmp_path, n=2, size=40)
    idx = discover(tmp_path)
    ds = ImageDataset(idx.samples, idx.classes, create_transforms(False, 32))
    x, y, i = ds[0]
    assert x.shape == (3, 32, 32) and y in (0, 1) and i == 0
    assert x.dtype.is_floating_point


def test_image_cache_decodes_once_and_matches_the_uncached_path(tmp_path):
    data = make_class_tree(tmp_path / "d", n=3, size=40)
    index = discover(str(data))
    plain = ImageDataset(index.samples, index.classes, create_transforms(False, 32))
    cached = ImageDataset(index.samples, index.classes, create_transforms(False, 32, resize=False), resize=create_resize(32))
    first = [cached[i][0] for i in range(len(cached))]
    for s in index.samples:  # the cache no longer needs the files
        os.remove(s.path)
    for i in range(len(cached)):
        assert torch.allclose(cached[i][0], first[i]) and cached[i][1] == plain.class_to_idx[index.samples[i].label]
    assert all(c.shape[0] == 1 for c in cached._cache.values()) and len(cached._cache) == 6  # grey: one channel
    data2 = make_class_tree(tmp_path / "e", n=3, size=40)
    index2 = discover(str(data2))
    plain = ImageDataset(index2.samples, index2.classes, create_transforms(False, 32))
    cached = ImageDataset(index2.samples, index2.classes, create_transforms(False, 32, resize=False), resize=create_resize(32))
    for i in range(len(plain)):
        assert torch.equal(cached[i][0], plain[i][0])
    small = ImageDataset(index2.samples, index2.classes, None, resize=create_resize(32), cache_mb=3 * 32 * 32 * 4 / 2**20)
    assert all(small[i][0].shape == (3, 32, 32) for i in range(len(small))) and len(small._cache) == 3  # budget kept


@pytest.mark.slow
def test_training_with_the_image_cache_is_seeded(tmp_path):
    from conftest import tiny_config

    from bonetumor import fit
    from bonetumor.data.synth import create_synthetic_dataset

    root = create_synthetic_dataset(tmp_path / "d", n_patients=8, size=32, seed=2).root
    a = fit(tiny_config(root, cache_images=True, epochs=2), tmp_path / "a", verbose=False)
    b = fit(tiny_config(root, cache_images=True, epochs=2), tmp_path / "b", verbose=False)
    c = fit(tiny_config(root, cache_images=False, epochs=2), tmp_path / "c", verbose=False)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert strip(a.history) == strip(c.history)  # the cache changes the speed, not the numbers
