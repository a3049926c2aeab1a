"""The config: one typed tree (`schema`), its `data.medical` section (`medical`), read from YAML (`loading`).

The names users and the rest of the package need are importable from here.
"""

from dinov3ds.config.loading import (
    config_from_dict,
    load_config,
    parse_overrides,
    save_config,
    with_overrides,
)
from dinov3ds.config.medical import SlicePreprocessing
from dinov3ds.config.schema import (
    MAX_SIDE,
    BackboneConfig,
    CacheConfig,
    Config,
    DataConfig,
    HeadConfig,
    InferenceConfig,
    LossConfig,
    MaskLossConfig,
    OptimConfig,
    TrainerConfig,
    cache_dir,
)

__all__ = [
    "MAX_SIDE", "BackboneConfig", "CacheConfig", "Config", "DataConfig", "HeadConfig", "InferenceConfig",
    "LossConfig", "MaskLossConfig", "OptimConfig", "SlicePreprocessing", "TrainerConfig", "cache_dir",
    "config_from_dict", "load_config", "parse_overrides", "save_config", "with_overrides",
]  # fmt: skip
