"""moepass.ir — the graph IR: capture of HF MoE models, canonical MoE ops, structure map, verifier,
printer."""

from . import ops, sparse  # register torch.ops.moepass.*
from .capture import capture
from .families import FAMILIES, supported_families
from .moe_block import RoutingSpec, SparseMoE
from .program import MoEProgram, ProgramInfo
from .structure import AttentionEntry, BlockEntry, CacheEntry, Entry, MoEEntry, StructureMap
from .verifier import verify

__all__ = [
    "FAMILIES",
    "AttentionEntry",
    "BlockEntry",
    "CacheEntry",
    "Entry",
    "MoEEntry",
    "MoEProgram",
    "ProgramInfo",
    "RoutingSpec",
    "SparseMoE",
    "StructureMap",
    "capture",
    "ops",
    "sparse",
    "supported_families",
    "verify",
]
