import pytest
import yaml

from bonetumor.config import (
    TrainConfig,
    config_from_dict,
    config_to_dict,
    load_config,
    save_config,
)
from bonetumor.errors import BonetumorError


def test_defaults_follow_the_original():
    c = TrainConfig()
    assert (c.image_size, c.backbone, c.weights, c.freeze, c.patience, c.hidden, c.dropout) == (
        224, "resnet50", "imagenet", "auto", 5, 256, 0.5)
    assert (c.rotate_degrees, c.zoom_min, c.zoom_max, c.hflip) == (15.0, 0.9, 1.1, True)


def test_yaml_overrides_defaults_and_flags_override_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 7\nlr: 0.01\nunfreeze: layer4,layer3\nimage-size: 128\n")
    c = load_config(tmp_path / "c.yaml", {"lr": 0.5, "seed": None})
    assert c.epochs == 7 and c.lr == 0.5 and c.image_size == 128 and c.seed == 42
    assert c.unfreeze == ["layer4", "layer3"]


@pytest.mark.parametrize("text,msg", [("epochs: many\n", "not a valid"), ("epoch: 3\n", "unknown option"),
                                      ("- 1\n- 2\n", "mapping"), ("a: [\n", "not valid YAML")])
def test_bad_yaml(tmp_path, text, msg):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(BonetumorError, match=msg):
        load_config(tmp_path / "c.yaml")


def test_roundtrip_through_yaml(tmp_path):
    c = TrainConfig(data="x", unfreeze=["layer4"], epochs=3)
    save_config(c, tmp_path / "c.yaml")
    assert config_from_dict(yaml.safe_load((tmp_path / "c.yaml").read_text())) == c
    assert config_from_dict({**config_to_dict(c), "from_the_future": 1}) == c


@pytest.mark.parametrize("kw", [{"epochs": 0}, {"lr": -1.0}, {"freeze": "all"}, {"image_size": 8}, {"data": None},
                                {"output_stride": 4}, {"lr_schedule": "step"}])
def test_validate_rejects_impossible_values(kw):
    c = TrainConfig(**{"data": "x", **kw})
    with pytest.raises(BonetumorError):
        c.validate()


def test_docs_options_table_is_made_from_the_schema():
    from pathlib import Path

    from bonetumor.config import options, options_markdown

    docs = Path(__file__).parents[1] / "docs" / "options.md"
    assert docs.read_text() == options_markdown() + "\n", "docs/options.md is out of date: run make docs"
    for f, opt in options():  # every field, its key and its default are in the table
        assert f"`{f.name}`" in docs.read_text() and opt.help.split(" ")[0] in docs.read_text()


def test_every_backbone_is_named_in_the_backbone_option():
    from dataclasses import fields

    from bonetumor.model.backbones import BACKBONES

    help_text = next(f for f in fields(TrainConfig) if f.name == "backbone").metadata["option"].help
    assert all(name in help_text for name in BACKBONES)


@pytest.mark.parametrize("name,bad", [("freeze", "all"), ("lr_schedule", "step"), ("precision", "fp8"),
                                      ("compile", "yes"), ("bn_statistics", "running"), ("output_stride", 4),
                                      ("slice_axis", 3)])
def test_values_outside_the_choices_are_refused_naming_the_flag_and_the_choices(name, bad):
    from dataclasses import fields

    choices = next(f for f in fields(TrainConfig) if f.name == name).metadata["option"].choices
    with pytest.raises(BonetumorError, match=rf"--{name.replace('_', '-')} must be .*{choices[-1]}, not {bad!r}"):
        TrainConfig(data="x", **{name: bad}).validate()


@pytest.mark.parametrize("kw,msg", [({"dropout": 1.5}, "--dropout must be in \\[0, 1\\), not 1.5"),
                                    ({"workers": -1}, "--workers must be 0 or more"),
                                    ({"zoom_min": 1.2}, "--zoom-min must not exceed --zoom-max"),
                                    ({"recompute_stages": 6}, "--recompute-stages must be 0 to 5, not 6")])
def test_range_checks_come_from_the_schema(kw, msg):
    with pytest.raises(BonetumorError, match=msg):
        TrainConfig(data="x", **kw).validate()
