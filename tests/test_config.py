"""The one config schema: shipped configs by name, strict keys, value checks, no TensorFlow."""

import subprocess
import sys

import pytest

from kfundus.config import load_config, shipped_configs
from kfundus.errors import ConfigError

SHIPPED = sorted(shipped_configs())


def test_the_published_setups_ship_with_the_package():
    assert {
        "odir_clip_lora_shadow",
        "retclip_pretrain",
        "fundus_dual_stream_wlsr",
        "oct_dual_stream_wlsr",
        "rfmid_efficientnet_b0",
        "hr_transfer",
        "demo_synthetic",
    } <= set(SHIPPED)
    for path in shipped_configs().values():  # package data, inside the installed package
        assert path.parent.name == "configs" and path.parent.parent.name == "kfundus"


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_by_name_and_by_path(name):
    config = load_config(name)
    assert config.name == name and config.description
    assert load_config(shipped_configs()[name]) == config


def test_a_config_for_another_command_says_which_to_run():
    with pytest.raises(ConfigError, match="for `kfundus pretrain`, not `kfundus train`"):
        load_config("retclip_pretrain", workflow="train")
    assert load_config("retclip_pretrain", workflow="pretrain").train.learning_rate == 3e-5


def test_workflow_defaults_sit_under_the_file(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("workflow: transfer\nname: t\ntrain: {epochs: 2}\n")
    config = load_config(path)
    assert config.train.epochs == 2  # the file wins
    assert config.train.optimizer == "adamw" and config.train.class_weight == "balanced"  # transfer's defaults
    assert load_config(None).train.optimizer == "adam"  # train's own defaults


def test_overrides_and_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ntrain: {epochs: 3, learning_rate: 1}\ndata: {augment: {hflip: true}}\n")
    config = load_config(path, ["train.epochs=5", "data.labels=[N, G]", "model.weights=null"])
    assert config.train.epochs == 5 and config.train.learning_rate == 1.0
    assert isinstance(config.train.learning_rate, float)
    # YAML 1.1 reads 3e-3 (no dot) as a string; a float field takes it as the number
    assert load_config(path, ["train.learning_rate=3e-3"]).train.learning_rate == 0.003
    with pytest.raises(ConfigError, match="train.learning_rate"):
        load_config(path, ["train.learning_rate=fast"])
    assert config.data.labels == ["N", "G"] and config.model.weights is None
    assert config.data.augment.hflip is True and config.data.augment.vflip is False


def test_unknown_key_names_file_and_valid_keys(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("train: {epochz: 3}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "typo.yaml" in message and "train.epochz" in message and "epochs" in message
    path.write_text("workflow: transfer\ncv: {k: 3}\n")  # a key of the old transfer schema
    with pytest.raises(ConfigError, match="cv is now transfer.folds"):
        load_config(path)


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epochs=0", "train.epochs"),
        ("train.batch_size=0", "train.batch_size"),
        ("train.batch_size=-4", "train.batch_size"),
        ("data.image_size=8", "data.image_size"),
        ("data.split.val=1.2", "data.split.val"),
        ("data.split.test=-0.1", "data.split.test"),
        ("train.learning_rate=0", "train.learning_rate"),
        ("model.dropout=1", "model.dropout"),
        ("train.warmup_epochs=-1", "train.warmup_epochs"),
        ("data.augment.zoom=2", "data.augment.zoom"),
        ("train.checkpoint=worst", "train.checkpoint"),
        ("transfer.folds=1", "transfer.folds"),
        ("train.ema=1.5", "train.ema"),
        ("distribution=gpus", "distribution"),
    ],
)
def test_values_out_of_range_name_the_key_and_a_fix(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        load_config("demo_synthetic", [override])
    assert "--set" in str(err.value) or "use one of" in str(err.value)


def test_a_bad_value_names_where_it_came_from(tmp_path):
    """A value given with --set is blamed on the --set, one from a file on the file."""
    with pytest.raises(ConfigError) as err:
        load_config("demo_synthetic", ["train.epochs=0"])
    assert str(err.value).startswith("--set train.epochs:")
    path = tmp_path / "mine.yaml"
    path.write_text("train: {epochs: 0}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.batch_size=4"])
    assert str(err.value).startswith(f"{path}: train.epochs=0")


def test_importing_the_config_loads_no_tensorflow():
    code = (
        "import sys; from kfundus.config import load_config; load_config('odir_clip_lora_shadow'); "
        "print(sorted(m for m in ('tensorflow', 'keras', 'keras_hub') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_configs_command_lists_every_shipped_config(capsys):
    from kfundus.cli import main

    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name in SHIPPED:
        assert any(line.startswith(name + " ") for line in lines)
