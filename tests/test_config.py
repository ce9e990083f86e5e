import typing
from pathlib import Path

import pytest
import yaml

from ldmflow.config.autoencoder import AutoencoderExperiment, AutoencoderModelConfig
from ldmflow.config.loading import STAGES, load_config, schema_documents
from ldmflow.config.schema import to_dict
from ldmflow.errors import ConfigError

from .conftest import REPO


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_fill_a_minimal_file(tmp_path):
    cfg = load_config(write(tmp_path, {"name": "a"}))
    assert isinstance(cfg, AutoencoderExperiment)
    assert cfg.seed == 42 and cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.01 and cfg.data.batch_size == 16
    assert cfg.model.channel_mult == [1, 2, 2]


def test_unknown_key_names_file_key_and_allowed(tmp_path):
    path = write(tmp_path, {"name": "a", "optim": {"lr": 1e-3, "learning_rate": 2}})
    with pytest.raises(ConfigError) as err:
        load_config(path)
    msg = str(err.value)
    assert str(path) in msg and "optim.learning_rate" in msg and "lr" in msg and "weight_decay" in msg


def test_wrong_type_and_range_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'data.batch_size' has value 'big'; allowed: integer >= 1"):
        load_config(write(tmp_path, {"name": "a", "data": {"batch_size": "big"}}))
    with pytest.raises(ConfigError, match=r"key 'optim.lr' has value -1.*> 0"):
        load_config(write(tmp_path, {"name": "a", "optim": {"lr": -1}}))
    with pytest.raises(ConfigError, match=r"key 'model.downsample' has value 3; allowed: one of 4, 8"):
        load_config(write(tmp_path, {"name": "a", "model": {"downsample": 3}}))


def test_cross_field_check_names_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"exp.yaml: key 'model.channel_mult'.*4 positive integers"):
        load_config(write(tmp_path, {"name": "a", "model": {"downsample": 8, "channel_mult": [1, 2, 2]}}))


def test_missing_file_and_required_name(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="'name' is a required property"):
        load_config(write(tmp_path, {"seed": 1}))


def test_overrides_are_typed_and_validated(tmp_path):
    path = write(tmp_path, {"name": "a"})
    cfg = load_config(path, overrides=["train.epochs=3", "model.variant=plain", "optim.grad_clip=null"])
    assert cfg.train.epochs == 3 and cfg.model.variant == "plain" and cfg.optim.grad_clip is None
    with pytest.raises(ConfigError, match="train.epoch"):
        load_config(path, overrides=["train.epoch=3"])
    with pytest.raises(ConfigError, match="dotted.key=value"):
        load_config(path, overrides=["train.epochs"])


@pytest.mark.parametrize("variant", typing.get_args(typing.get_type_hints(AutoencoderModelConfig)["variant"]))
@pytest.mark.parametrize("downsample", typing.get_args(typing.get_type_hints(AutoencoderModelConfig)["downsample"]))
def test_every_model_option_validates(variant, downsample):
    cfg = load_config({"name": "a", "model": {"variant": variant, "downsample": downsample}})
    assert cfg.model.variant == variant and len(cfg.model.channel_mult) == {4: 3, 8: 4}[downsample]


def test_resolved_config_round_trips():
    cfg = load_config({"name": "a", "model": {"downsample": 8}})
    assert load_config(to_dict(cfg)) == cfg


def test_committed_schemas_match_the_dataclasses():
    for name, text in schema_documents().items():
        path = REPO / "config" / "schemas" / name
        assert path.read_text() == text, f"{path} is stale: run `ldmflow schemas`"
    assert set(STAGES) <= {n.split(".")[0] for n in schema_documents()}


STAGE_DIRS = {"autoencoders": "autoencoder", "diffusion": "diffusion", "controlnet": "controlnet"}
EXPERIMENT_FILES = sorted(p for p in (REPO / "config").rglob("*.yaml") if p.parent.name in STAGE_DIRS)


@pytest.mark.parametrize("path", EXPERIMENT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_experiment_files_validate(path):
    load_config(path, STAGE_DIRS[path.parent.name])
