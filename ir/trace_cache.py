"""Reuse of traced graphs between captures of identically built models.

Tracing (torch.export, plus functionalization where the model writes in place) is nearly all of a
capture's time, and its graph depends on the model's code and shapes, never on its weight values:
routing is not baked in and buffers are graph inputs. So two models of the same class, config,
module tree and tensor shapes/dtypes trace to the same graph, and the second capture only binds a
copy of it to its own tensors. This is what makes `moepass.load` (which captures a skeleton) and
capturing many seeds of one config cheap.

A model whose forward the key cannot see (forward hooks, an instance-level `forward`), or whose graph
reads a tensor made while tracing, is always traced. Patched model code (a class's forward, a modeling
module's function) is part of the key; an in-place change to a registry (re-registering an attention
function under the same name) is not: call `clear()` after one. So are the modules' settings the key
can compare (numbers, strings, dtypes, containers of them, functions by name: `settings`); an object
attribute of another kind (other than the config, which is in the key) is not.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import itertools
import json
import logging
import sys
import types
from collections import OrderedDict

import torch
from torch import Tensor, fx, nn

from .structure import tensor_at

logger = logging.getLogger("moepass")

# Bounded by nodes, not entries: a graph's memory is its node count. A Mixtral-8x7B graph is ~10k
# nodes, so this keeps ~8 such graphs or hundreds of small ones (a test session, a sweep of configs).
_MAX_NODES = 80_000


# Config fields that say how the checkpoint was loaded, never read by a forward: a model loaded from
# an artifact has dtype "float32" where the same model built from its config has none.
_LOADING_METADATA = ("dtype", "torch_dtype", "_name_or_path", "transformers_version", "architectures")

_GRAPHS: OrderedDict[tuple, fx.Graph] = OrderedDict()


def trace_key(model: nn.Module, sample: Tensor) -> tuple | None:
    """What the traced graph of `model` (after MoE-block conversion) depends on, or None when a hook
    or an instance-level forward could change it unseen."""
    if not forwards_are_visible(model):
        return None
    modules = [module_signature(name, module) for name, module in model.named_modules(remove_duplicate=False)]
    first_name: dict[int, str] = {}
    tensors = [
        (*tensor_signature(name, t), first_name.setdefault(id(t), name))
        for name, t in itertools.chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)
        )
    ]
    config = model.config
    graph_config = {k: v for k, v in config.to_dict().items() if k not in _LOADING_METADATA}
    return (
        type(model),
        json.dumps(graph_config, sort_keys=True, default=str),
        getattr(config, "_attn_implementation", None),
        tuple(modules),
        tuple(tensors),
        tuple(sample.shape),
        sample.device,
        _CodeIdentity(model),
    )


def forwards_are_visible(model: nn.Module) -> bool:
    """Whether `model`'s trace is its classes' code alone: no forward hook (global or on a module)
    and no instance-level `forward`."""
    hooks = nn.modules.module
    if hooks._global_forward_hooks or hooks._global_forward_pre_hooks:
        return False
    return not any(m._forward_hooks or m._forward_pre_hooks or "forward" in vars(m) for m in model.modules())


def module_signature(name: str, module: nn.Module, skip: str = "") -> tuple:
    """What one module contributes to a trace: its name, class, non-persistent buffers and settings."""
    return name, type(module), tuple(sorted(module._non_persistent_buffers_set)), settings(module, skip)


def tensor_signature(name: str, tensor: Tensor) -> tuple:
    """What one tensor contributes to a trace: its name, shape, layout, dtype, device and class."""
    return name, tuple(tensor.shape), tensor.stride(), tensor.dtype, tensor.device, type(tensor)


def settings(module: nn.Module, skip: str = "") -> str:
    """The module's own settings, but `skip`: traced as constants, so an edit (`gate.top_k = 1`, a
    tuple of scaling factors) needs a fresh trace. Numbers, strings, dtypes, enums, dataclasses
    (a converted MoE block's routing spec) and containers of them; functions by qualified name; not
    nn.Module's own underscored tables, nor other objects (configs: the key holds the model's)."""
    entries = []
    for key, value in vars(module).items():
        if key.startswith("_"):  # nn.Module's tables (parameters, hooks), or a plain private flag
            setting = value if isinstance(value, _PLAIN) else _OPAQUE
        else:
            setting = _setting(value)
        if key != skip and setting is not _OPAQUE:
            entries.append((key, setting))
    return repr(sorted(entries))


_PLAIN = (int, float, bool, str, type(None))
_OPAQUE = object()


def _setting(value):
    """`value` as a comparable constant, or `_OPAQUE` when it holds an object the key cannot read."""
    if isinstance(value, _PLAIN) or _is_dataclass_instance(value):
        return value
    if isinstance(value, torch.dtype | torch.device | enum.Enum):
        return repr(value)
    if isinstance(value, types.FunctionType | types.BuiltinFunctionType):
        return f"{value.__module__}.{value.__qualname__}"
    if isinstance(value, tuple | list | set | frozenset):
        items = [_setting(item) for item in value]
        if isinstance(value, set | frozenset):
            items.sort(key=repr)
        return _OPAQUE if any(item is _OPAQUE for item in items) else (type(value).__name__, *items)
    if isinstance(value, dict):
        items = [(repr(key), _setting(item)) for key, item in value.items()]
        return _OPAQUE if any(item is _OPAQUE for _, item in items) else ("dict", *items)
    return _OPAQUE


def _is_dataclass_instance(value) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


class _CodeIdentity:
    """The code a trace runs, by object identity: every attribute of the model's module classes (and
    their bases) and every global of the Python modules defining them, which is what a patch swaps
    (liger-kernel replaces forwards and `apply_rotary_pos_emb`). Holds the objects, so that no id is
    reused while a key holding them is cached."""

    def __init__(self, model: nn.Module) -> None:
        classes = {c for m in model.modules() for c in type(m).__mro__ if c is not object}
        modules = {sys.modules.get(c.__module__) for c in classes} - {None}
        owners = (*classes, *modules)
        self.entries = [(owner, name, value) for owner in owners for name, value in vars(owner).items()]
        self.identity = frozenset((id(owner), name, id(value)) for owner, name, value in self.entries)
        self._hash = hash(self.identity)

    def __eq__(self, other) -> bool:
        return isinstance(other, _CodeIdentity) and self.identity == other.identity

    def __hash__(self) -> int:
        return self._hash


def cached_graph_module(key: tuple | None, model: nn.Module) -> fx.GraphModule | None:
    """A copy of the graph traced for `key`, bound to `model`'s own parameters and buffers."""
    graph = _GRAPHS.get(key) if key is not None else None
    if graph is None:
        return None
    _GRAPHS.move_to_end(key)
    logger.info("capture: reusing the graph traced for an identically built model")
    return fx.GraphModule(model, copy.deepcopy(graph))


def remember(key: tuple | None, graph_module: fx.GraphModule, model: nn.Module) -> None:
    """Keep `graph_module`'s graph (not its weights) for later captures under `key`: only when every
    tensor it reads is one of `model`'s, so that another model can supply them all."""
    if key is None:
        return
    for node in graph_module.graph.nodes:
        if node.op == "call_module" or (node.op == "get_attr" and not holds_tensor(model, node.target)):
            return
    _GRAPHS[key] = copy.deepcopy(graph_module.graph)
    while len(_GRAPHS) > 1 and sum(len(g.nodes) for g in _GRAPHS.values()) > _MAX_NODES:
        _GRAPHS.popitem(last=False)


def clear() -> None:
    """Forget every traced graph (the next capture of each model traces again)."""
    _GRAPHS.clear()


def holds_tensor(model: nn.Module, target: str) -> bool:
    try:
        return isinstance(tensor_at(model, target), Tensor)
    except AttributeError:
        return False
