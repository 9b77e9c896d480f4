"""kfundus configuration: one schema (``schema``) read from YAML with ``--set`` overrides
(``loading``). Importing it loads no TensorFlow.

>>> config = load_config("demo_synthetic", ["train.epochs=3"])  # doctest: +SKIP
"""

from kfundus.config.loading import (
    MIN_IMAGE_SIZE,
    apply_overrides,
    check_config,
    config_summary,
    config_to_dict,
    load_config,
    replace,
    resolve_config,
    save_config,
    shipped_configs,
)
from kfundus.config.schema import (
    WORKFLOWS,
    Augment,
    BackboneSpec,
    Config,
    DataConfig,
    ExportConfig,
    LinearProbeConfig,
    ModelConfig,
    SplitConfig,
    TextConfig,
    TrainConfig,
    TransferConfig,
    ZeroShotConfig,
)

__all__ = [
    "MIN_IMAGE_SIZE",
    "WORKFLOWS",
    "Augment",
    "BackboneSpec",
    "Config",
    "DataConfig",
    "ExportConfig",
    "LinearProbeConfig",
    "ModelConfig",
    "SplitConfig",
    "TextConfig",
    "TrainConfig",
    "TransferConfig",
    "ZeroShotConfig",
    "apply_overrides",
    "check_config",
    "config_summary",
    "config_to_dict",
    "load_config",
    "replace",
    "resolve_config",
    "save_config",
    "shipped_configs",
]
