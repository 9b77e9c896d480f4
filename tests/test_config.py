import pytest

from kfundus.config import load_config
from kfundus.errors import ConfigError

REPO_CONFIGS = sorted(__import__("pathlib").Path(__file__).resolve().parents[1].joinpath("configs").glob("*.yaml"))


def _loader(path):
    """Configs of commands with their own schema (pretrain, transfer) load with theirs."""
    if path.name.startswith("retclip_pretrain"):
        from kfundus.pretrain import load_pretrain_config

        return load_pretrain_config
    if path.name.startswith("hr_transfer"):
        from kfundus.transfer_config import load_transfer_config

        return load_transfer_config
    return load_config


@pytest.mark.parametrize("path", REPO_CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    config = _loader(path)(path)
    assert config.name == path.stem


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
    assert "typo.yaml" in message and "epochz" in message and "epochs" in message


def test_bad_values_are_rejected(tmp_path):
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=many"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
