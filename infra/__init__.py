"""The small shared base every package uses: configs, typed errors with reason codes, environments, logging."""

from infra.config import FrozenConfig
from infra.environments import find_render_python
from infra.errors import AssetRejected, ConfigError, FactoryError, Reason, TransientError

__all__ = [
    "AssetRejected",
    "ConfigError",
    "FactoryError",
    "FrozenConfig",
    "Reason",
    "TransientError",
    "find_render_python",
]
