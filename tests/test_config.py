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
        224, "resnet50", "imagenet", "backbone", 5, 256, 0.5)
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
