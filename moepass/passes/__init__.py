"""All registered passes; importing this package registers them."""

from . import (
    awq,
    block_drop,
    block_similarity,
    expert_drop,
    expert_importance,
    gptq,
    layer_drop,
    magnitude,
    moe_similarity,
    rtn,
    sparsegpt,
    wanda,
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
    "awq",
    "block_drop",
    "block_similarity",
    "create_pass",
    "expert_drop",
    "expert_importance",
    "gptq",
    "layer_drop",
    "magnitude",
    "moe_similarity",
    "rtn",
    "sparsegpt",
    "wanda",
]
