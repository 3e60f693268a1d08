"""All registered passes; importing this package registers them."""

from . import (
    block_drop,
    block_similarity,
    expert_drop,
    expert_importance,
    gptq,
    layer_drop,
    moe_similarity,
    rtn,
)
from .base import (
    PASSES,
    AnalysisPass,
    ConfigError,
    Pass,
    PassConfig,
    TransformPass,
    TransformResult,
    create_pass,
)

__all__ = [
    "PASSES",
    "AnalysisPass",
    "ConfigError",
    "Pass",
    "PassConfig",
    "TransformPass",
    "TransformResult",
    "block_drop",
    "block_similarity",
    "create_pass",
    "expert_drop",
    "expert_importance",
    "gptq",
    "layer_drop",
    "moe_similarity",
    "rtn",
]
