"""The heatmap grid: measured from the model, and flagged below 7x7 with the options that fix it."""

import pytest

from bonetumor.explain.grid import cam_grid, coarse_grid_warning
from bonetumor.model.backbones import create_model


@pytest.mark.parametrize("size,stride,grid", [(64, 32, (2, 2)), (224, 32, (7, 7)), (112, 16, (7, 7)), (96, 16, (6, 6)),
                                              (56, 8, (7, 7))])
def test_resnet50_grid_follows_size_and_output_stride(size, stride, grid):
    model = create_model("resnet50", "none", output_stride=stride)
    assert cam_grid(model, "backbone.layer4", size) == grid
    warning = coarse_grid_warning(grid, "backbone.layer4", size, "resnet50", stride)
    assert (warning is None) == (min(grid) >= 7)


def test_the_warning_names_only_finer_strides_and_other_backbones_get_the_image_size():
    w16 = coarse_grid_warning((6, 6), "backbone.layer4", 96, "resnet50", 16)
    assert "--image-size 112 or more" in w16 and "--output-stride 8 with --image-size 56" in w16
    assert "--output-stride 16" not in w16
    wd = coarse_grid_warning((2, 2), "backbone.features", 64, "densenet121", 32)
    assert "--image-size 224 or more" in wd and "output-stride" not in wd
    assert cam_grid(create_model("densenet121", "none"), "backbone.features", 64) == (2, 2)
