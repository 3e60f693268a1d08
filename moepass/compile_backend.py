"""`torch.compile(model, backend="moepass", options={...})`: MoE-aware compilation of Dynamo's graphs.

Registered as the `moepass` entry point of the `torch_dynamo_backends` group, so `backend="moepass"`
needs no import. It compiles transformers MoE models and `MoEProgram`s alike; per graph Dynamo hands
over (real weights in hand, before aot_autograd):

  1. outline: each transformers experts module becomes one `moepass::experts` call
     (`moepass.outline_experts`); a program's graph already holds the canonical ops;
  2. quantize (option `quantize`): data-free RTN of the routed expert weights, `moepass::quantized_experts`;
  3. lower (option `lower`): on CPU, quantized ops onto ATen's packed int4/int8 kernels (the
     `cpu_packed_weights` pass's rewrites); on CUDA the canonical ops already dispatch to Triton;
     a one-token (decode) step's experts are traced inline for Inductor where Dynamo may read
     tensor values as integers (`fullgraph=True`, or `torch._dynamo.config.capture_scalar_outputs`);
  4. aot_autograd to ATen (the vocabulary torch.export gives), then Inductor, or with
     `inductor=False` the ATen graph runs as it is.

Weights the passes rewrite (GPT-OSS expert layout, quantized, packed) are converted once, at compile
time, into constants of the compiled graph, like Inductor's freezing; since Dynamo does not guard on
weights, a call after they were edited or with another model instance raises `StaleWeightsError`
(edits through `param.data` bypass the version counter this relies on and go unseen: edit the
parameter itself, under `torch.no_grad()`).
Weights used as they are stay graph inputs. Inference only (the moepass ops define no gradient).
What each graph became is in `compile_reports()` and `torch._dynamo.utils.counters["moepass"]`.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx
from torch._dynamo.backends.common import aot_autograd
from torch._dynamo.source import ConstantSource
from torch._dynamo.utils import counters
from torch._functorch.aot_autograd import make_boxed_func

from moepass.errors import MoepassError
from moepass.ir.ops import EXPERTS, TRACEABLE_BODIES, inlines_experts
from moepass.ir.quant_ops import QUANTIZED_EXPERTS, QUANTIZED_LINEAR, STORED_TENSORS
from moepass.ir.quantized import FormatError, QuantFormat, quantize
from moepass.ir.sparse import SPARSE24_EXPERTS
from moepass.ir.structure import op_args, tensor_at
from moepass.ir.surgery import install_tensor, swap_node
from moepass.kernels.ops import PACKED_EXPERTS
from moepass.outline_experts import frame_scopes, outline_experts
from moepass.passes.cpu_packed_weights import lower_experts_node, lower_linear_node

logger = logging.getLogger("moepass")

# experts ops that are compressed already: the `quantize` option has nothing to do on them
_COMPRESSED_EXPERTS = (QUANTIZED_EXPERTS, SPARSE24_EXPERTS, PACKED_EXPERTS)

# `quantize` option -> bits; group size and symmetry come from their own options
QUANTIZE_BITS: dict[str, int] = {"int4": 4, "int8": 8}


class CompileOptionError(MoepassError):
    """An option given to `torch.compile(..., backend="moepass", options=...)` is unknown or invalid."""


@dataclass(frozen=True)
class CompileOptions:
    """The backend's options (`torch.compile(..., options={...})`)."""

    inductor: bool = True  # False: run the ATen graph as it is (no Inductor codegen)
    quantize: str | None = None  # "int4" / "int8": RTN of the routed expert weights
    group_size: int = 128  # quantization group along the inputs; -1: per channel
    symmetric: bool = False
    lower: bool = True  # quantized ops onto the device's fastest kernels (ATen packed ones on CPU)

    @classmethod
    def parse(cls, options: dict | None) -> CompileOptions:
        """Validated options; errors name the bad key and what it accepts."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if options is not None and not isinstance(options, dict):
            raise CompileOptionError(
                f"torch.compile backend 'moepass' takes options as a dict, got {type(options).__name__}"
            )
        for key, value in (options or {}).items():
            if key not in fields:
                raise CompileOptionError(
                    f"unknown option {key!r} for torch.compile backend 'moepass'; "
                    f"allowed: {', '.join(fields)}"
                )
            check = _CHECKS[key]
            if not check[0](value):
                raise CompileOptionError(f"option {key!r}={value!r} is invalid: {check[1]}")
            if key in ("group_size", "symmetric") and options.get("quantize") is None:
                raise CompileOptionError(f"option {key!r} sets how to quantize: it needs option 'quantize'")
        return cls(**(options or {}))

    def format(self) -> QuantFormat | None:
        if self.quantize is None:
            return None
        return QuantFormat(QUANTIZE_BITS[self.quantize], self.group_size, self.symmetric)


_CHECKS: dict[str, tuple[Callable[[object], bool], str]] = {
    "inductor": (lambda v: isinstance(v, bool), "expected True or False"),
    "quantize": (
        lambda v: v is None or (isinstance(v, str) and v in QUANTIZE_BITS),
        f"expected None or one of {list(QUANTIZE_BITS)}",
    ),
    "group_size": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and (v == -1 or v > 0),
        "expected a positive int dividing the weights' input features, or -1 (per channel)",
    ),
    "symmetric": (lambda v: isinstance(v, bool), "expected True or False"),
    "lower": (lambda v: isinstance(v, bool), "expected True or False"),
}


@dataclass
class CompileReport:
    """What the backend did to one graph Dynamo handed over."""

    options: CompileOptions
    outlined: list[str] = field(default_factory=list)  # experts modules now one canonical op
    skipped: dict[str, str] = field(default_factory=dict)  # experts modules left as traced, and why
    quantized: int = 0  # experts ops quantized by the `quantize` option
    lowered: int = 0  # quantized ops moved onto the device's packed kernels
    kept_reference: dict[str, str] = field(default_factory=dict)  # weights of ops not lowered -> why
    inlined: int = 0  # one-token experts ops traced inline for Inductor (`_inline_decode_experts`)
    ops: collections.Counter = field(default_factory=collections.Counter)  # moepass ops handed to aot


_REPORTS: list[CompileReport] = []


def compile_reports() -> list[CompileReport]:
    """One report per graph compiled by the backend in this process, oldest first (clear() to reset)."""
    return _REPORTS


def moepass_backend(gm: fx.GraphModule, example_inputs: list, options: dict | None = None) -> Callable:
    """The torch.compile backend: MoE passes on Dynamo's graph, then aot_autograd and Inductor."""
    opts = CompileOptions.parse(options)
    report = CompileReport(opts)
    _resolve_overloads(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    read = {n for n in placeholders if n.users}
    outlined = outline_experts(gm, example_inputs, frame_scopes())
    report.outlined, report.skipped = outlined.outlined, outlined.skipped
    for path, reason in outlined.skipped.items():
        if opts.quantize is not None:  # it would stay in float: a silently partial quantization
            raise CompileOptionError(f"option 'quantize': cannot quantize {path}: {reason}")
        logger.warning("moepass backend: %s left as traced: %s", path, reason)
    inputs = dict(zip(placeholders, example_inputs, strict=False))
    fmt = opts.format()
    if fmt is not None:
        _refuse_eager_experts(frame_scopes())
        report.quantized = _quantize_experts(gm, inputs, fmt)
        compressed = [n.target for n in gm.graph.nodes if n.target in _COMPRESSED_EXPERTS]
        if compressed and not report.quantized:
            raise CompileOptionError(
                f"option 'quantize': this program's experts are compressed already ({compressed[0]}), "
                "so it would do nothing; compile without it, or quantize with moepass.compress"
            )
    if opts.lower:
        _lower(gm, inputs, report)
    if opts.inductor:
        report.inlined = _inline_decode_experts(gm, example_inputs)
    gm.recompile()
    _register_constants(gm)
    _REPORTS.append(report)
    stats = counters["moepass"]
    stats["graphs"] += 1
    stats["experts_outlined"] += len(report.outlined)
    stats["experts_quantized"] += report.quantized
    stats["ops_lowered"] += report.lowered
    stats["experts_inlined"] += report.inlined
    # weights read at compile time into converted constants: the graph no longer reads these inputs.
    # Held weakly: Dynamo caches the compiled callable, which must not keep the originals (the float
    # weights `quantize` sheds) alive once the model is gone
    snapshots = {
        i: (weakref.ref(value), _state(value))
        for i, (node, value) in enumerate(inputs.items())
        if node in read and not node.users and isinstance(value, Tensor)
    }
    # inference only: the moepass ops define no gradient, so the graph is compiled without autograd
    # (outputs do not require grad) even when Dynamo traced it with grad mode on
    with torch.no_grad():
        compiled = _compile(gm, example_inputs, report)
    return _checking_snapshots(compiled, snapshots) if snapshots else compiled


class StaleWeightsError(MoepassError):
    """Weights converted at compile time were replaced or edited afterwards."""


def _checking_snapshots(
    compiled: Callable, snapshots: dict[int, tuple[weakref.ref[Tensor], tuple]]
) -> Callable:
    """`compiled`, refusing to run once a weight it converted at compile time changed: Dynamo does not
    guard on weight identity or contents, so it would silently keep running the old weights. The
    weights are held weakly; one that was freed since can only have been replaced."""

    def run(*args):
        for i, (ref, state) in snapshots.items():
            tensor = ref()
            if tensor is None or args[i] is not tensor or _state(tensor) != state:
                raise StaleWeightsError(
                    "a weight the moepass backend converted at compile time (expert layout, quantization "
                    "or packing) was edited or replaced since, or this is another model of the same "
                    "architecture (Dynamo reuses graphs across instances); call torch._dynamo.reset() and "
                    "compile again"
                )
        return compiled(*args)

    return run


def _state(tensor: Tensor) -> tuple:
    """What an edit changes: the version counter for in-place edits (inference-mode tensors keep none),
    the storage for `param.data = new`, which keeps the same tensor object and counter."""
    version = -1 if tensor.is_inference() else tensor._version
    return version, tensor.data_ptr(), tensor.shape, tensor.dtype


def _refuse_eager_experts(scopes: tuple[dict, dict] | None) -> None:
    """`quantize` on a model whose experts run transformers' "eager" loop would silently quantize
    nothing: the loop breaks the graph, so no experts region is ever outlined. Models whose experts
    have no such choice (Llama-4's run one batched matmul) say "eager" too: they are let through."""
    from transformers import PreTrainedModel

    for value in (scopes or ({}, {}))[0].values():
        implementation = getattr(getattr(value, "config", None), "_experts_implementation", None)
        if (
            isinstance(value, PreTrainedModel)
            and implementation == "eager"
            and value._can_set_experts_implementation()
        ):
            raise CompileOptionError(
                f"option 'quantize': {type(value).__name__} runs its experts with "
                "experts_implementation='eager', whose per-expert loop breaks the graph, so no experts "
                "would be quantized; call model.set_experts_implementation('grouped_mm') first"
            )


def _tensor(gm: fx.GraphModule, inputs: dict, node: fx.Node | None) -> Tensor | None:
    """The real tensor behind a graph input or constant."""
    if node is None:
        return None
    return inputs[node] if node.op == "placeholder" else tensor_at(gm, node.target)


# quantized op -> its stored tensors (codes, scales, zero points)
def _quantize_experts(gm: fx.GraphModule, inputs: dict, fmt: QuantFormat) -> int:
    """Each dense `moepass::experts` node -> `moepass::quantized_experts` over RTN codes of its weights."""
    count = 0
    for node in [n for n in gm.graph.nodes if n.target is EXPERTS]:
        args = op_args(node)
        prefix = f"moepass_quantized.{node.name}"
        weights = {name: _tensor(gm, inputs, args[name]) for name in ("gate_up", "down")}
        # rows shorter than a group get a fitted format, as the passes give them
        fitted = fmt.fitted(*(w.shape[-1] for w in weights.values()))
        try:
            gate_up, down = (quantize(w, fitted, f"{node.name}.{name}") for name, w in weights.items())
        except FormatError as error:
            raise CompileOptionError(f"{error} (options 'group_size' / 'quantize')") from error
        with gm.graph.inserting_before(node):
            stored = [
                install_tensor(gm, f"{prefix}.{name}", tensor)
                for name, tensor in zip(STORED_TENSORS[QUANTIZED_EXPERTS], (*gate_up, *down), strict=True)
            ]
            new = gm.graph.call_function(
                QUANTIZED_EXPERTS,
                (
                    *(args[n] for n in ("hidden", "topk_ids", "topk_weights")),
                    *stored,
                    args["gate_up_bias"],
                    args["down_bias"],
                    None,
                    None,
                    *(args[n] for n in ("activation", "alpha", "limit")),
                    fitted.bits,
                    fitted.group_size,
                ),
            )
        swap_node(node, new)
        count += 1
    return count


# device type -> quantized op -> rewrite onto the device's kernel (None when done, else the weight
# no kernel takes and why)
LOWERINGS: dict[str, dict[object, Callable[[fx.GraphModule, fx.Node], tuple[str, str] | None]]] = {
    "cpu": {QUANTIZED_EXPERTS: lower_experts_node, QUANTIZED_LINEAR: lower_linear_node},
    "cuda": {},  # the canonical ops' CUDA kernels are Triton already
}


def _lower(gm: fx.GraphModule, inputs: dict, report: CompileReport) -> None:
    for node in [n for n in gm.graph.nodes if n.target in STORED_TENSORS]:
        op = node.target
        args = op_args(node)
        device = _tensor(gm, inputs, args[STORED_TENSORS[op][0]]).device.type
        rewrite = LOWERINGS.get(device, {}).get(op)
        if rewrite is None:
            continue
        _materialize(gm, inputs, node, STORED_TENSORS[op])
        refusal = rewrite(gm, node)
        if refusal is None:
            report.lowered += 1
        else:
            tensor, reason = refusal
            report.kept_reference[tensor] = reason


def _inline_decode_experts(gm: fx.GraphModule, example_inputs: list) -> int:
    """One-token float and packed (int4, int8) experts ops -> their traceable bodies, so Inductor
    multiplies by the chosen experts' weights from its own code instead of through the op's Python
    dispatch (a third of a tiny int4 model's decode step). The bodies read the expert indices as
    integers, which Dynamo's shape environment allows under `fullgraph=True` or
    `torch._dynamo.config.capture_scalar_outputs`; otherwise the ops stay."""
    fake_mode = torch._guards.detect_fake_mode(example_inputs)
    if fake_mode is None or fake_mode.shape_env is None or not fake_mode.shape_env.allow_scalar_outputs:
        return 0
    count = 0
    for node in [n for n in gm.graph.nodes if n.target in (EXPERTS, PACKED_EXPERTS)]:
        args = op_args(node)
        hidden = args["hidden"].meta.get("example_value")
        if hidden is not None and inlines_experts(hidden):
            node.target = TRACEABLE_BODIES[node.target]
            count += 1
    return count


def _materialize(gm: fx.GraphModule, inputs: dict, node: fx.Node, names: tuple[str, ...]) -> None:
    """Graph inputs among `node`'s weight arguments become constants, which the lowering rewrites read."""
    args = op_args(node)
    for name in names:
        value = args[name]
        if isinstance(value, fx.Node) and value.op == "placeholder":
            with gm.graph.inserting_before(node):
                constant = install_tensor(gm, f"moepass_inputs.{value.name}.tensor", inputs[value])
            node.replace_input_with(value, constant)


def _register_constants(gm: fx.GraphModule) -> None:
    """Give the constants the passes installed a source: aot_autograd requires one for every tensor
    a Dynamo graph module owns (it dedups inputs by source)."""
    sources = getattr(gm, "_param_name_to_source", None)
    if sources is None:
        return
    for name, _ in itertools.chain(gm.named_parameters(), gm.named_buffers()):
        sources.setdefault(name, ConstantSource(f"moepass_constant_{name}"))


def _resolve_overloads(gm: fx.GraphModule) -> None:
    """Calls of an op packet (`torch.ops.moepass.experts`, as Dynamo may record) -> its default overload."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverloadPacket):
            node.target = node.target.default


def _compile(gm: fx.GraphModule, example_inputs: list, report: CompileReport) -> Callable:
    """aot_autograd to ATen (custom ops pass through as they are), then Inductor or the ATen graph."""
    report.ops.update(
        str(n.target)
        for n in gm.graph.nodes
        if n.op == "call_function" and getattr(n.target, "namespace", None) == "moepass"
    )
    if report.options.inductor:
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(gm, example_inputs)
    return aot_autograd(fw_compiler=lambda aten_gm, _: make_boxed_func(aten_gm.forward))(gm, example_inputs)


__all__ = ["CompileOptionError", "CompileOptions", "CompileReport", "compile_reports", "moepass_backend"]
