import torch

from bonetumor.data.transforms import IMAGENET_MEAN, IMAGENET_STD, create_transforms


def test_eval_resizes_and_normalises_exactly():
    x = torch.full((3, 50, 70), 0.5)
    y = create_transforms(False, 32)(x)
    assert y.shape == (3, 32, 32)
    for c in range(3):
        torch.testing.assert_close(y[c], torch.full((32, 32), (0.5 - IMAGENET_MEAN[c]) / IMAGENET_STD[c]))


def test_train_augmentation_is_random_but_seeded():
    x = torch.rand(3, 40, 40)
    tf = create_transforms(True, 32)
    torch.manual_seed(0)
    a = tf(x)
    torch.manual_seed(0)
    b = tf(x)
    c = tf(x)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(b, c)


def test_augmentation_can_be_turned_off():
    x = torch.rand(3, 32, 32)
    tf = create_transforms(True, 32, hflip=False, rotate_degrees=0, zoom=(1.0, 1.0))
    torch.testing.assert_close(tf(x), create_transforms(False, 32)(x))
