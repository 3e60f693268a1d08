"""Outline each transformers experts module of a Dynamo graph into one `moepass::experts` call.

transformers' experts code (sort, histc, grouped_mm, index scatter) reaches a torch.compile backend as
dozens of generic ops per layer. Replacing each experts module's region by the canonical op makes the
quantization recipes and CPU kernels apply to one node per layer, as on a captured `MoEProgram`.

Dynamo marks every node with `nn_module_stack` (module path as a Dynamo source such as
`L['self'].model.layers.0.mlp.experts`, and module class). A family's MoE block class (`ir/families.py`)
tells which paths are experts modules; the path resolves against the compiled frame's locals to the
real module, whose family converter gives the canonical expert tensors (GPT-OSS's transposed and
interleaved weights included) and activation. Weights already in canonical layout stay graph inputs;
converted ones become constants of the graph module. Llama-4's experts take no ids: every expert runs
on every token's row, pre-scaled by the router and zero where not chosen; the op runs the chosen one.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from transformers import PretrainedConfig

from moepass.errors import MoepassError
from moepass.ir.capture import quantized_form
from moepass.ir.families import FAMILIES, Family
from moepass.ir.ops import EXPERTS
from moepass.ir.surgery import install_tensor

# MoE block class name -> family: the experts module is the block's `experts` child.
_BLOCK_FAMILIES: dict[str, Family] = {
    name: family for family in FAMILIES.values() for name in family.moe_block_classes
}
_SOURCE = re.compile(r"^(L|G)\['([^']+)'\]\.?(.*)$")


class OutlineError(MoepassError):
    """An experts module of the compiled graph cannot be replaced by the canonical op."""


@dataclass
class OutlineResult:
    outlined: list[str] = field(default_factory=list)  # experts module paths now one `moepass::experts`
    skipped: dict[str, str] = field(default_factory=dict)  # experts module path -> why it was left as is


@dataclass
class _Region:
    block_path: str
    family: Family
    nodes: list[fx.Node] = field(default_factory=list)


def outline_experts(
    graph_module: fx.GraphModule, example_inputs: list, frame_scopes: tuple[dict, dict] | None
) -> OutlineResult:
    """Replace every complete experts-module region of `graph_module` by one `moepass::experts` node.

    `frame_scopes` is the compiled frame's (locals, globals), which the module paths refer to.
    A region that cannot be replaced (cut by a graph break, unresolvable module) is skipped with the
    reason. Graphs Dynamo resumes inside an experts module (transformers' `"eager"` experts loop breaks
    the graph) carry no MoE block in their stacks: nothing is found there, and they run as traced."""
    result = OutlineResult()
    regions = _regions(graph_module)
    if not regions:
        return result
    if frame_scopes is None:
        raise OutlineError(
            "the compiled frame is unknown, so its transformers experts modules cannot be resolved; "
            "call the backend through torch.compile"
        )
    inputs = {
        node: value
        for node, value in zip(
            [n for n in graph_module.graph.nodes if n.op == "placeholder"], example_inputs, strict=False
        )
    }
    for path, region in regions.items():
        try:
            reason = _outline(graph_module, path, region, inputs, frame_scopes)
        except OutlineError as error:
            reason = str(error)
        if reason is None:
            result.outlined.append(path)
        else:
            result.skipped[path] = reason
    if result.outlined:
        graph_module.graph.lint()
        graph_module.recompile()
    return result


def _class_name(module_class) -> str:
    return module_class.__name__ if isinstance(module_class, type) else str(module_class).rpartition(".")[2]


def _regions(graph_module: fx.GraphModule) -> dict[str, _Region]:
    """Experts module path -> the nodes traced inside it, in graph order."""
    regions: dict[str, _Region] = {}
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":  # the module's weights carry its stack too; they stay inputs
            continue
        entries = list((node.meta.get("nn_module_stack") or {}).values())
        for (path, module_class), (child, _) in itertools.pairwise(entries):
            family = _BLOCK_FAMILIES.get(_class_name(module_class))
            if family is not None and child == f"{path}.experts":
                regions.setdefault(child, _Region(path, family)).nodes.append(node)
                break
    return regions


def _resolve(path: str, frame_scopes: tuple[dict, dict]) -> tuple[nn.Module, PretrainedConfig]:
    """(module at a Dynamo source path, config of the innermost transformers model on the way).

    The path starts from any object of the compiled frame (the model, a wrapper module or object
    holding it, a list of models) and steps through attributes, submodules and indices."""
    match = _SOURCE.match(path)
    if match is None:
        raise OutlineError(f"cannot resolve module path {path!r} of the compiled graph")
    scope, name, rest = match.groups()
    scopes = frame_scopes[0 if scope == "L" else 1]
    if name not in scopes:
        raise OutlineError(f"{path!r}: {name!r} is not in the compiled frame")
    value, config = scopes[name], None
    for part in re.findall(r"\.?_modules\['([^']+)'\]|\[(\d+)\]|\.?([^.\[]+)", rest):
        module, index, attribute = part
        config = value.config if isinstance(getattr(value, "config", None), PretrainedConfig) else config
        try:
            value = value[int(index)] if index else getattr(value, module or attribute)
        except (AttributeError, IndexError, KeyError, TypeError) as error:
            raise OutlineError(f"cannot resolve module path {path!r}: {error}") from error
    if not isinstance(value, nn.Module):
        raise OutlineError(f"{path!r} is not a module")
    if config is None:
        raise OutlineError(f"{path!r} is not inside a transformers model (no config on the way)")
    return value, config


def _outline(graph_module, path, region: _Region, inputs: dict, frame_scopes) -> str | None:
    block, config = _resolve(region.block_path, frame_scopes)
    for name, weight in block.experts.named_parameters():
        form = quantized_form(weight)
        if form is not None:  # a quantizer's codes, whose scales live elsewhere: no weights to read
            return f"its {name} is {form}, quantized by transformers"
    own = {id(t) for t in (*block.experts.parameters(), *block.experts.buffers())}
    inside = set(region.nodes)
    external = []
    for node in region.nodes:
        for arg in node.all_input_nodes:
            is_weight = arg.op == "placeholder" and id(inputs.get(arg)) in own
            if arg not in inside and not is_weight and arg not in external and _is_activation(arg):
                external.append(arg)
    escaping = [n for n in region.nodes if any(user not in inside for user in n.users)]
    # sizes computed inside and reused after (dynamic shapes) stay, with what they are computed from
    keep = _ancestors([n for n in escaping if not _is_tensor(n)], inside)
    escaping = [n for n in escaping if n not in keep]
    if any(_is_tensor(n) for n in keep):
        return "a size it computes from an intermediate tensor is used outside it"
    try:
        moe = region.family.convert(block, config)
    except MoepassError as error:  # e.g. Llama-4 routing to more than one expert
        return str(error)
    canonical = moe.experts
    if moe.scales_input and len(external) == 1 and len(escaping) == 1:
        _outline_prescaled(graph_module, region, keep, external[0], escaping[0], canonical, path)
        return None
    if len(external) != 3 or len(escaping) != 1:
        return (
            f"its traced region has {len(external)} activation inputs and {len(escaping)} outputs "
            f"(expected 3 and 1): a graph break inside the experts (transformers' experts_implementation "
            f"'grouped_mm' has none)"
        )
    hidden, ids, weights = _activation_inputs(external, canonical.gate_up_proj.shape[-1])
    output = escaping[0]
    with graph_module.graph.inserting_before(output):
        new = _experts_call(graph_module, inputs, canonical, path, hidden, ids, weights)
    new.meta = dict(output.meta)
    output.replace_all_uses_with(new)
    _erase(graph_module, region, keep)
    return None


def _experts_call(graph_module, inputs: dict, canonical, path: str, hidden, ids, weights) -> fx.Node:
    """One `moepass::experts` node on `canonical`'s tensors: graph inputs where they are the module's
    own, constants of the graph module where the converter made them (transposed layouts)."""
    by_identity = {id(value): node for node, value in inputs.items() if isinstance(value, Tensor)}
    prefix = "moepass_outlined." + path.partition("].")[2].replace(".", "_")

    def weight(name: str):
        tensor = getattr(canonical, name)
        if tensor is None:
            return None
        return by_identity.get(id(tensor)) or install_tensor(graph_module, f"{prefix}.{name}", tensor)

    tensors = [weight(n) for n in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")]
    return graph_module.graph.call_function(
        EXPERTS, (hidden, ids, weights, *tensors, canonical.activation, canonical.alpha, canonical.limit)
    )


def _outline_prescaled(
    graph_module, region: _Region, keep: set[fx.Node], rows: fx.Node, output: fx.Node, canonical, path: str
) -> None:
    """Llama-4's experts run every expert on every token's row, pre-scaled by the router: [E*T, H],
    zero for the experts a token did not choose (one per token). The chosen one is the row that is
    not zero; the op runs it alone, and the [E*T, H] output holds its result there and zeros (what
    an expert without biases gives a zero row) elsewhere: the region's own result, not just its sum."""
    graph, experts = graph_module.graph, canonical.gate_up_proj.shape[0]

    def call(target, *args):
        node = graph.call_function(target, args)
        values = [a.meta["example_value"] if isinstance(a, fx.Node) else a for a in args]
        node.meta["example_value"] = target(*values)
        return node

    with graph.inserting_before(output):
        per_expert = call(torch.unflatten, rows, 0, (experts, -1))  # [E, T, H]
        scaled = call(torch.sum, per_expert, 0)  # the chosen row: the others are zero
        chosen = call(torch.argmax, call(torch.amax, call(torch.abs, per_expert), -1), 0)  # [T]
        ids = call(torch.unsqueeze, chosen, -1)
        ones = call(torch.Tensor.float, call(torch.ones_like, ids))
        out = _experts_call(graph_module, {}, canonical, path, scaled, ids, ones)  # transposed: constants
        out.meta["example_value"] = torch.empty_like(scaled.meta["example_value"])
        index = call(torch.Tensor.expand_as, call(torch.unsqueeze, ids, 0), call(torch.unsqueeze, out, 0))
        placed = call(
            torch.scatter, call(torch.zeros_like, per_expert), 0, index, call(torch.unsqueeze, out, 0)
        )
        new = call(torch.flatten, placed, 0, 1)
    new.meta = dict(output.meta)
    output.replace_all_uses_with(new)
    _erase(graph_module, region, keep)


def _erase(graph_module, region: _Region, keep: set[fx.Node]) -> None:
    for node in reversed(region.nodes):
        if node not in keep:
            graph_module.graph.erase_node(node)


def _ancestors(nodes: list[fx.Node], inside: set[fx.Node]) -> set[fx.Node]:
    """`nodes` and every node of the region they are computed from."""
    found: set[fx.Node] = set()
    stack = list(nodes)
    while stack:
        node = stack.pop()
        if node not in found:
            found.add(node)
            stack.extend(arg for arg in node.all_input_nodes if arg in inside)
    return found


def _is_tensor(node: fx.Node) -> bool:
    return isinstance(node.meta.get("example_value"), Tensor)


def _is_activation(node: fx.Node) -> bool:
    """A tensor the region reads, other than a 0-dim graph input: under `dynamic=True` Dynamo lifts
    float attributes (GPT-OSS's `alpha`, `limit`) to such inputs, which the family converter supplies."""
    return _is_tensor(node) and not (node.op == "placeholder" and node.meta["example_value"].dim() == 0)


def _activation_inputs(external: list[fx.Node], hidden_size: int) -> tuple[fx.Node, fx.Node, fx.Node]:
    """(hidden [T, H], top-k ids [T, k], top-k weights [T, k]) among the region's three inputs."""
    ids = [n for n in external if not n.meta["example_value"].is_floating_point()]
    floats = [n for n in external if n.meta["example_value"].is_floating_point()]
    hidden = [n for n in floats if n.meta["example_value"].shape[-1] == hidden_size]
    if len(ids) != 1 or len(hidden) != 1:
        raise OutlineError(
            "cannot tell the experts' inputs apart (hidden states, top-k ids, top-k weights): "
            f"dtypes {[str(n.meta['example_value'].dtype) for n in external]}, hidden size {hidden_size}"
        )
    weights = next(n for n in floats if n is not hidden[0])
    return hidden[0], ids[0], weights


def frame_scopes() -> tuple[dict, dict] | None:
    """(locals, globals) of the frame Dynamo is compiling, which `nn_module_stack` paths refer to."""
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    return None if tx is None else (tx.f_locals, tx.f_globals)


__all__ = ["OutlineError", "OutlineResult", "frame_scopes", "outline_experts"]
