"""`moepass.export_onnx`: a program as an ONNX decoder step with past key/values, for onnxruntime.

The exported graph is the program's step graph — (input_ids, attention_mask, position_ids, *past) ->
(logits, *present) — with batch, sequence and past lengths dynamic, plus one optional input,
`logits_to_keep` (int64 scalar, default 0: every position; N: the last N positions only, so a prompt's
prefill runs the LM head on one row when generating). Before export a copy of the graph
has its moepass ops replaced: quantized linears by `com.microsoft::MatMulNBits` and experts by
`com.microsoft::MoE`/`QMoE` where those ops fit (`contrib.py`), routing and the remaining experts by
standard-op forms that keep every expert (`decompose.py`), complex
arithmetic (DeepSeek-V2's rotary embedding) by real (re, im) pairs (`complex_to_real.py`). Dropped
layers and blocks are simply absent. The directory written holds `model.onnx`, `onnx_manifest.json`
(the program's info and the I/O contract) and, when given, the tokenizer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import math
import operator
import os
import time
import warnings
from pathlib import Path

import onnx
import onnx_ir
import onnxscript.optimizer
import onnxscript.rewriter
import torch
from onnx_ir.passes import common as ir_passes
from onnxscript.rewriter.rules import common as rules
from torch import fx

from moepass.artifact import output_directory, write_atomically
from moepass.errors import MoepassError
from moepass.evaluate import model_size
from moepass.ir import MoEProgram
from moepass.ir.ops import EXPERTS, ROUTE, routing
from moepass.ir.program import lm_head_entry
from moepass.ir.quant_ops import (
    EXPERT_PACKED_TENSORS,
    PACKED_TENSORS,
    QUANTIZED_EMBEDDING,
    QUANTIZED_EXPERTS,
    QUANTIZED_LINEAR,
    STORED_TENSORS,
    dequantized_embedding,
    dequantized_linear,
)
from moepass.ir.quantized import in_features
from moepass.ir.structure import arg_tensors, op_args, tensor_at
from moepass.ir.surgery import delete_if_unused, expand_sparse24, install_tensor, swap_node
from moepass.json_document import json_document

from . import decompose
from .complex_to_real import complex_to_real
from .contrib import (
    FUSED_ACTIVATIONS,
    FUSED_INPUTS,
    LAST_POSITIONS,
    MATMUL_NBITS,
    MICROSOFT,
    MOE,
    QMOE,
    TRANSLATIONS,
    fits_matmul_nbits,
    interleave_gate_up,
    qmoe_rows,
    row_block,
    rows_as_blocks,
)

logger = logging.getLogger("moepass")

MODEL_FILE, MANIFEST_FILE = "model.onnx", "onnx_manifest.json"
# optional int64 scalar input: logits for the last N positions only (the LM head runs on N rows);
# its default, 0, keeps every position, so the (ids, mask, positions, *past) contract holds without it
LOGITS_TO_KEEP = "logits_to_keep"
OPSET = 20
_FOLD_LIMIT = 256  # elements: shapes and scalars
# canonical op -> its standard-op form (same arguments)
DECOMPOSITIONS = {
    ROUTE: routing,
    EXPERTS: decompose.experts,
    QUANTIZED_EXPERTS: decompose.quantized_experts,
    QUANTIZED_EMBEDDING: dequantized_embedding,  # the looked-up rows' codes, dequantized
}


# fx targets that become MatMulNBits or QMoE nodes, the ops `int8_activations` applies to
_QUANTIZED_MATMULS = (MATMUL_NBITS, QMOE, decompose.nbits_experts)
INT8_ACTIVATION_OPS = ("MatMulNBits", "QMoE")


class OnnxExportError(MoepassError):
    """A program that cannot be exported to ONNX as asked."""


def export_onnx(
    program: MoEProgram,
    path: str | os.PathLike,
    *,
    tokenizer=None,
    overwrite: bool = False,
    int8_activations: bool = False,
) -> Path:
    """Write `program` as an ONNX decoder to directory `path` (model.onnx + onnx_manifest.json), with
    `tokenizer` if given (a tokenizer object, a tokenizer.json file or a checkpoint directory whose
    tokenizer files are copied; see `moepass.zoo.save_tokenizer`).

    `int8_activations`: the quantized matmuls (MatMulNBits, QMoE) quantize their activations to int8
    per block as they run (onnxruntime's `accuracy_level` 4, onnxruntime-genai's CPU default) and
    multiply in integers, and 8-bit experts in blocks run on the fused QMoE op (one `If` per expert
    otherwise; per-channel ones leave it for MatMulNBits where those take them, both measured):
    decode steps 1.2-2.3x faster on CPU for -0.03..+0.05% perplexity on the bundled models
    (BENCHMARKS.md), but the logits no longer equal the PyTorch program's to float rounding. Needs
    onnxruntime >= 1.31 (QMoE's `accuracy_level`)."""
    if not isinstance(program, MoEProgram):
        raise OnnxExportError(
            f"export_onnx takes a MoEProgram (see moepass.capture), got {type(program).__name__}"
        )
    if program.info.lowered is not None:
        raise OnnxExportError(
            f"this program is lowered for {program.info.lowered} (kernel-specific weight layouts); export "
            "the program before lowering it (moepass.load(path, lower=False))"
        )
    if program.info.dtype == "bfloat16":
        raise OnnxExportError(
            "this program computes in bfloat16, which onnxruntime's CPU provider cannot run (no bf16 "
            "Mul, MatMul, ...); capture the model in float32 or float16 (CLI: export-onnx MODEL --dtype "
            "float32; an artifact keeps its dtype: compress --dtype float32)"
        )
    path = output_directory(path, overwrite)
    graph_module, rewrites = exportable_graph(program, int8_activations)
    if int8_activations and not any(n.target in _QUANTIZED_MATMULS for n in graph_module.graph.nodes):
        raise OnnxExportError(
            f"int8_activations: {program.info.model_class} has no quantized linear or experts that export "
            "as MatMulNBits or QMoE (quantize it first, e.g. the rtn pass), so nothing would change"
        )
    if not int8_activations and (slow := _int8_matmuls_on_floats(graph_module)):
        logger.warning(
            "%d of this program's ops become 8-bit MatMulNBits on float activations, which onnxruntime "
            "(1.30-1.32) runs by dequantizing the weight on every call: such an export decodes slower "
            "than the unquantized model's (BENCHMARKS.md); export with int8_activations=True (CLI "
            "--int8-activations) for its integer kernels, or quantize to 4 bits",
            slow,
        )
    start = time.perf_counter()
    onnx_program = _export(graph_module, program)
    if int8_activations:
        rewrites[f"{'/'.join(INT8_ACTIVATION_OPS)} on int8 activations (accuracy_level 4)"] = (
            _int8_activations(onnx_program.model)
        )

    def fill(staging: Path) -> None:
        onnx_program.save(str(staging / MODEL_FILE))
        onnx.checker.check_model(str(staging / MODEL_FILE))
        manifest = {
            "format": "moepass-onnx",
            "version": 1,
            "opset": OPSET,
            "info": dataclasses.asdict(program.info),
            "inputs": input_names(graph_module),
            "optional_inputs": {LOGITS_TO_KEEP: 0},
            "outputs": output_names(program),
            "rewrites": rewrites,
            "parameters": model_size(program)[0],  # logical counts: packed codes count as weights
            "int8_activations": int8_activations,
        }
        (staging / MANIFEST_FILE).write_text(json_document(manifest), encoding="utf-8")
        if tokenizer is not None:
            from moepass.zoo import save_tokenizer

            save_tokenizer(tokenizer, staging)

    write_atomically(path, fill, overwrite)
    logger.info("exported %s in %.1fs", path, time.perf_counter() - start)
    return path


def input_names(graph_module: fx.GraphModule) -> list[str]:
    """The inputs every call feeds: input_ids, attention_mask, position_ids, *past."""
    return [n.name for n in graph_module.graph.nodes if n.op == "placeholder" and n.name != LOGITS_TO_KEEP]


def output_names(program: MoEProgram) -> list[str]:
    return ["logits", *(name.replace("past_", "present_", 1) for name in program.cache_names)]


def exportable_graph(
    program: MoEProgram, int8_activations: bool = False
) -> tuple[fx.GraphModule, dict[str, int]]:
    """A copy of the program's graph with every moepass op in a form the ONNX exporter translates;
    also the count of each rewrite. `int8_activations` lets 8-bit experts in blocks onto QMoE,
    whose CPU kernel runs them on int8 activations whatever the node says."""
    program = program.fork()
    _logits_to_keep(program)
    rewrites: dict[str, int] = {}
    if expanded := expand_sparse24(program):  # onnxruntime has no 2:4 operator
        rewrites["2:4 storage -> dense (onnxruntime has no 2:4 kernel)"] = expanded
    graph_module = program.graph_module
    try:
        if complex_nodes := complex_to_real(graph_module):
            rewrites["complex rotary -> real pairs"] = complex_nodes
    except MoepassError as error:
        raise OnnxExportError(f"{program.info.model_class}: {error}") from None
    for node in list(graph_module.graph.nodes):  # first, while routes are still moepass ops
        if node.target in (EXPERTS, QUANTIZED_EXPERTS) and (
            kind := _contrib_moe(graph_module, node, int8_activations)
        ):
            rewrites[kind] = rewrites.get(kind, 0) + 1
    for node in list(graph_module.graph.nodes):
        if node.target is QUANTIZED_LINEAR:
            kind = _quantized_linear(graph_module, node)
        elif node.target is QUANTIZED_EXPERTS and (nbits := _nbits_experts(graph_module, node)):
            kind = nbits
        elif node.target in DECOMPOSITIONS:
            kind = f"{node.target._opname} (standard ops)"
            node.target = DECOMPOSITIONS[node.target]
        elif node.op == "call_function" and str(getattr(node.target, "namespace", "")) == "moepass":
            raise OnnxExportError(f"node {node.name}: no ONNX form for {node.target}")
        else:
            continue
        rewrites[kind] = rewrites.get(kind, 0) + 1
    graph_module.graph.lint()
    graph_module.recompile()
    return graph_module, rewrites


def _int8_matmuls_on_floats(graph_module: fx.GraphModule) -> int:
    """Quantized linears and experts ops that export as 8-bit MatMulNBits (bits: their 8th / 14th
    argument, as `_quantized_linear` and `_nbits_experts` build them)."""
    bits_at = {MATMUL_NBITS: 7, decompose.nbits_experts: 13}
    return sum(n.target in bits_at and n.args[bits_at[n.target]] == 8 for n in graph_module.graph.nodes)


def _logits_to_keep(program: MoEProgram) -> None:
    """A last input, `logits_to_keep`, cutting the final hidden states to that many last positions
    before the LM head (as `MoEProgram.step(last_token_only=True)` does): a prompt's prefill then
    computes one row of logits, not one per token."""
    graph = program.graph_module.graph
    head = lm_head_entry(graph, program.structure)
    *_, last_input = (n for n in graph.nodes if n.op == "placeholder")
    with graph.inserting_after(last_input):
        count = graph.placeholder(LOGITS_TO_KEEP)
    with graph.inserting_before(head):
        kept = graph.call_function(LAST_POSITIONS, (head.args[0], count))
    head.replace_input_with(head.args[0], kept)
    program.graph_changed()


def _quantized_linear(graph_module: fx.GraphModule, node: fx.Node) -> str:
    args = op_args(node)
    qweight, scales, zeros = arg_tensors(graph_module, args, *PACKED_TENSORS)
    bits, group = args["bits"], args["group_size"]
    n, k = qweight.shape[0], in_features(qweight, bits)
    if (block := _matmul_nbits_block(k, group, bits)) is None:
        node.target = dequantized_linear
        return "quantized_linear (dequantized in the graph)"
    graph, prefix = graph_module.graph, args["qweight"].target.rpartition(".")[0]
    tensors = dict(
        zip(("b", "scales", "zero_points"), _nbits_layout(qweight, scales, zeros, bits, block), strict=True)
    )
    with graph.inserting_before(node):
        x = args["x"]
        if args["input_scale"] is not None:
            x = graph.call_function(torch.ops.aten.mul.Tensor, (x, args["input_scale"]))
        consts = {
            name: install_tensor(graph_module, f"{prefix}.onnx_{name}", t) for name, t in tensors.items()
        }
        new = graph.call_function(
            MATMUL_NBITS,
            (x, consts["b"], consts["scales"], consts["zero_points"], args["bias"], k, n, bits, block),
        )
    _replace(graph_module, node, new, list(PACKED_TENSORS))
    return f"quantized_linear -> MatMulNBits int{bits}"


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Silence a library's logger below ERROR (the exporter logs every optional op it skips)."""
    library, level = logging.getLogger(logger_name), logging.getLogger(logger_name).level
    library.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library.setLevel(level)


def _contrib_moe(graph_module: fx.GraphModule, node: fx.Node, int8_activations: bool) -> str | None:
    """Experts onto onnxruntime's fused `MoE` (fp32 weights) or `QMoE` (int4 in power-of-two blocks
    or per channel, int8 per channel, int8 in blocks with int8 activations; `_qmoe_tensors`):
    SwiGLU experts (plain or GPT-OSS's clamped form, biases or not) on fp32 activations. None leaves
    the node to the other forms.

    The ops route by softmax top-k over the logits they are given. Where that is the model's own
    routing (`_own_softmax_route`) they get the router's logits; any other routing (DeepSeek's
    sigmoid with groups and bias, PhiMoE's sparsemixer, routers keeping rows for dropped experts)
    stays in the graph as standard ops and the ops get logits under which softmax top-k picks
    exactly its choice (`decompose.chosen_logits`), so no expert runs per layer in an `If` of its own.

    AWQ's input scales fold in exactly: the shared gate/up one multiplies the op's input, each
    expert's down-projection one scales its up-projection rows (silu(g) * u * s = silu(g) * (s u);
    not through a clamp or a bias, which leave such experts to the other forms).
    The ops are always told to renormalise the top-k weights, because onnxruntime does not honour
    `normalize_routing_weights=0` (1.32's CPU QMoE ignores it; 1.30's MoE gives wrong outputs, 2% off
    in the logits, once the graph around it lets it share buffers): where the model does not
    renormalise or routes otherwise, the output is multiplied back by the top-k weights' sum
    (`decompose.chosen_mass`)."""
    args = op_args(node)
    hidden_value = args["hidden"].meta.get("val")
    if (
        args["activation"] not in FUSED_ACTIVATIONS
        or hidden_value is None
        or hidden_value.dtype != torch.float32
    ):
        return None
    graph, quantized = graph_module.graph, node.target is QUANTIZED_EXPERTS
    gate_up_bias, down_bias = arg_tensors(graph_module, args, "gate_up_bias", "down_bias")
    fc1_bias = None if gate_up_bias is None else interleave_gate_up(gate_up_bias)
    if quantized:
        if (qmoe_form := _qmoe_tensors(graph_module, args, int8_activations)) is None:
            return None
        block_size, tensors = qmoe_form
        op, stored, kind = QMOE, list(STORED_TENSORS[QUANTIZED_EXPERTS]), f"QMoE int{args['bits']}"
    else:
        gate_up, down = arg_tensors(graph_module, args, "gate_up", "down")
        tensors = {"fc1": interleave_gate_up(gate_up), "fc2": down}
        op, stored, kind = MOE, ["gate_up", "down"], "MoE"
    tensors.update(fc1_bias=fc1_bias, fc2_bias=down_bias)
    num_experts = tensors["fc1"].shape[0]
    prefix = args[stored[0]].target.rpartition(".")[0]
    route = _own_softmax_route(node)
    getters = [] if route is None else list(route.users)
    with graph.inserting_before(node):
        x = args["hidden"]
        if quantized and args["gate_up_input_scale"] is not None:
            x = graph.call_function(torch.ops.aten.mul.Tensor, (x, args["gate_up_input_scale"]))
        consts = [install_tensor(graph_module, f"{prefix}.onnx_{n}", tensors[n]) for n in FUSED_INPUTS[op]]
        activation = (args["activation"], args["alpha"], args["limit"])
        extra = (*activation, args["bits"], block_size) if quantized else activation
        choice = (args["topk_ids"], args["topk_weights"], num_experts)
        if route is not None:
            r = op_args(route)
            new = graph.call_function(op, (x, r["logits"], *consts, r["top_k"], *extra))
        else:
            logits = graph.call_function(decompose.chosen_logits, choice)
            # a router keeping rows for dropped experts may choose more than the experts left
            top_k = min(args["topk_ids"].meta["val"].shape[-1], num_experts)
            new = graph.call_function(op, (x, logits, *consts, top_k, *extra))
            kind += " (routing in the graph)"
        if route is None or not op_args(route)["renormalize"]:
            mass = graph.call_function(decompose.chosen_mass, choice)
            new = graph.call_function(torch.ops.aten.mul.Tensor, (new, mass))
    _replace(graph_module, node, new, [*stored, "gate_up_bias", "down_bias"])
    for getter in getters:
        if not getter.users:
            graph.erase_node(getter)
    if route is not None and not route.users:
        graph.erase_node(route)
    return f"{node.target._opname} -> com.microsoft::{kind}"


def _qmoe_tensors(
    graph_module: fx.GraphModule, args: dict, int8_activations: bool
) -> tuple[int, dict] | None:
    """QMoE's weight inputs from quantized experts' stored tensors, or None where QMoE cannot take
    them (blocks MatMulNBits cannot take, a down-projection input scale behind a clamp or a bias),
    would not compute what they do (8 bits in blocks, which the CPU kernel runs on int8 activations,
    unless the export asks for them) or run slower there than the other forms: 8 bits per channel
    where the export has int8 activations and MatMulNBits takes the rows, in blocks repeating the
    row's scale where they are no power of two (a MatMulNBits per expert: mid-size Mixtral decode 253
    vs 161 tok/s, 238 vs 109 with 1536-wide experts; in exact exports QMoE wins, 53 vs 21). 4 bits per
    channel go in blocks repeating each row's scale (mid-size Mixtral decode 4.2x vs 2.9-3.8x eager
    on a MatMulNBits per expert, 4.1x vs 0.2x where rows of 1536 left standard ops; BENCHMARKS.md),
    on rows where no block of 16+ inputs fits."""
    bits, group = args["bits"], args["group_size"]
    if bits == 8 and group != -1 and not int8_activations:
        return None
    if args["down_input_scale"] is not None and (
        args["activation"] == "clamped_swiglu" or args["gate_up_bias"] is not None
    ):
        return None
    gate_up, down = (arg_tensors(graph_module, args, *n) for n in EXPERT_PACKED_TENSORS.values())
    hidden, intermediate = in_features(gate_up[0], bits), in_features(down[0], bits)
    if group != -1 and any(fits_matmul_nbits(k, group, bits) for k in (hidden, intermediate)):
        return None
    blocks = row_block(math.gcd(hidden, intermediate)) if group == -1 and bits == 4 else None
    on_nbits = all(_matmul_nbits_block(k, group, bits) for k in (hidden, intermediate))
    if group == -1 and int8_activations and not blocks and on_nbits:  # MatMulNBits: faster
        return None
    scales = gate_up[1].float()
    if args["down_input_scale"] is not None:
        down_scale = tensor_at(graph_module, args["down_input_scale"].target).float()
        rows = scales.shape[1] // 2
        scales = torch.cat([scales[:, :rows], scales[:, rows:] * down_scale.unsqueeze(-1)], dim=1)
    fc1 = (interleave_gate_up(scales), None if gate_up[2] is None else interleave_gate_up(gate_up[2]))
    fc2 = (down[1].float(), down[2])
    if blocks:
        fc1 = rows_as_blocks(*fc1, bits, hidden, blocks)
        fc2 = rows_as_blocks(*fc2, bits, intermediate, blocks)
    elif group == -1:
        fc1, fc2 = qmoe_rows(*fc1, bits), qmoe_rows(*fc2, bits)
    block_size = blocks or group
    return block_size, {
        "fc1": interleave_gate_up(gate_up[0]),
        "fc1_scales": fc1[0],
        "fc1_zeros": fc1[1],
        "fc2": down[0],
        "fc2_scales": fc2[0],
        "fc2_zeros": fc2[1],
    }


def _own_softmax_route(node: fx.Node) -> fx.Node | None:
    """The route op feeding these experts when onnxruntime's ops compute the same routing from its
    logits (softmax top-k over exactly these experts; no correction bias, groups or scaling; no
    router rows kept for dropped experts) and nothing else reads its choice; else None."""
    args = op_args(node)
    route = args["topk_ids"].args[0] if args["topk_ids"].target is operator.getitem else None
    if route is None or route.target is not ROUTE:
        return None
    r = op_args(route)
    if (
        r["kind"] != "softmax_topk"
        or r["correction_bias"] is not None
        or r["n_group"] > 1
        or r["scale"] != 1.0
        or route.meta.get("moepass_preserve_gate")
        or any(set(g.users) != {node} for g in route.users)
    ):
        return None
    return route


def _nbits_experts(graph_module: fx.GraphModule, node: fx.Node) -> str | None:
    """Quantized experts onto MatMulNBits (`decompose.nbits_experts`) when both projections' blocks
    fit the op; None leaves the node to the standard-op form."""
    args = op_args(node)
    bits, group = args["bits"], args["group_size"]
    gate_up, down = (arg_tensors(graph_module, args, *names) for names in EXPERT_PACKED_TENSORS.values())
    experts, hidden, intermediate = (
        gate_up[0].shape[0],
        in_features(gate_up[0], bits),
        in_features(down[0], bits),
    )
    gate_up_block, down_block = (_matmul_nbits_block(k, group, bits) for k in (hidden, intermediate))
    if gate_up_block is None or down_block is None:
        return None
    graph, prefix = graph_module.graph, args["gate_up_qweight"].target.rpartition(".")[0]
    shaped = []  # per projection: (b, scales, zeros) stacked over experts, in MatMulNBits' shapes
    for triple, block in ((gate_up, gate_up_block), (down, down_block)):
        shaped += _nbits_layout(*triple, bits, block)
    names = ("gate_up_b", "gate_up_scales", "gate_up_zeros", "down_b", "down_scales", "down_zeros")
    with graph.inserting_before(node):
        per_expert = [
            [install_tensor(graph_module, f"{prefix}.onnx_{name}_{e}", None if t is None else t[e])
             for name, t in zip(names, shaped, strict=True)]
            for e in range(experts)
        ]  # fmt: skip
        new = graph.call_function(
            decompose.nbits_experts,
            (
                args["hidden"], args["topk_ids"], args["topk_weights"], per_expert,
                args["gate_up_bias"], args["down_bias"],
                args["gate_up_input_scale"], args["down_input_scale"],
                args["activation"], args["alpha"], args["limit"],
                hidden, intermediate, bits, gate_up_block, down_block,
            ),
        )  # fmt: skip
    _replace(graph_module, node, new, list(STORED_TENSORS[QUANTIZED_EXPERTS]))
    return f"quantized_experts -> MatMulNBits int{bits}"


def _matmul_nbits_block(k: int, group: int, bits: int) -> int | None:
    """The block size in which MatMulNBits takes a stored weight with `k` inputs, or None where it
    cannot: per-channel rows of no power-of-two length take blocks repeating each row's scale
    (`row_block`; `_nbits_layout` repeats it), rather than being dequantized every call."""
    block = k if group == -1 else group
    if group == -1 and fits_matmul_nbits(k, block, bits) is not None:
        block = row_block(k)
    return None if block is None or fits_matmul_nbits(k, block, bits) is not None else block


def _nbits_layout(qweight, scales, zeros, bits: int, block: int) -> list:
    """Stored codes/scales/zeros ([..., N, ...]; leading dims kept) in MatMulNBits' input shapes:
    b [..., N, K/block, block*bits/8], scales and packed zeros flattened per leading index
    (per-channel ones repeated per block where the block is shorter than the row)."""
    lead, k = qweight.shape[:-2], in_features(qweight, bits)
    if scales.shape[-1] != k // block:
        scales, zeros = rows_as_blocks(scales, zeros, bits, k, block)
    return [
        qweight.reshape(*lead, qweight.shape[-2], k // block, block * bits // 8),
        scales.reshape(*lead, -1),
        None if zeros is None else zeros.reshape(*lead, -1),
    ]


def _replace(graph_module: fx.GraphModule, node: fx.Node, new: fx.Node, tensor_args: list[str]) -> None:
    """Swap `node` for `new` and drop the tensors only `node` read (now held in new layouts)."""
    args = op_args(node)
    swap_node(node, new)
    for name in tensor_args:
        if args[name] is not None:
            target = args[name].target
            if not args[name].users:
                graph_module.graph.erase_node(args[name])
            delete_if_unused(graph_module, target)


def _int8_activations(model: onnx_ir.Model) -> int:
    """Set `accuracy_level` 4 (int8 activations) on every MatMulNBits and QMoE node, those in `If`
    branches included; returns how many."""
    nodes = [
        node
        for node in onnx_ir.traversal.RecursiveGraphIterator(model.graph)
        if node.domain == MICROSOFT.domain and node.op_type in INT8_ACTIVATION_OPS
    ]
    for node in nodes:
        node.attributes["accuracy_level"] = onnx_ir.AttrInt64("accuracy_level", 4)
    return len(nodes)


def _fold_and_tidy(model: onnx_ir.Model) -> None:
    """onnxscript's `optimize_ir` with six of its ~45 rewrite rules: those that remove nodes
    onnxruntime's own optimizer leaves in (no-op Add/Slice/Transpose, Unsqueeze pairs, shapes of
    Reshapes). All the rules took ~40% of a 32-layer export (tools/bench_depth.py: 36.6 -> 21.7 s
    without them); these six take milliseconds. Folds shape arithmetic, not weight-sized results
    (`_FOLD_LIMIT`): folding the dequantization of packed codes would store the weights as floats
    again. (onnxscript still folds a single-use Transpose, or a result no larger than its single-use
    inputs, whatever their size; no weight path here has either.)"""
    ir_passes.InlinePass()(model)
    for _ in range(2):  # a fold can make the shape of another value known
        if not onnxscript.optimizer.fold_constants_ir(
            model, onnx_shape_inference=True, output_size_limit=_FOLD_LIMIT
        ).modified:
            break
    onnx_ir.passes.Sequential(
        onnxscript.rewriter.RewritePass(
            [
                rules.add_0_rule,
                rules.collapse_slice_rule,
                rules.no_op_transpose_rule,
                rules.unsqueeze_unsqueeze_rule,
                rules.squeeze_reshape_1d_rule,
                rules.materialize_reshape_shape_rule,
            ]
        ),
        ir_passes.RemoveUnusedNodesPass(),
        ir_passes.RemoveUnusedFunctionsPass(),
        ir_passes.RemoveUnusedOpsetsPass(),
        ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        ir_passes.LiftSubgraphInitializersToMainGraphPass(),
        ir_passes.DeduplicateInitializersPass(),
        ir_passes.CommonSubexpressionEliminationPass(),
        ir_passes.OutputFixPass(),
        ir_passes.NameFixPass(),
        # the exporter's per-node debugging record (fx node, stack trace, scopes): ~1.6 KB a node,
        # half of a tiny model's file, and lines of the exporting machine's code
        ir_passes.ClearMetadataAndDocStringPass(),
    )(model)


def _export(graph_module: fx.GraphModule, program: MoEProgram):
    """torch.onnx.export with a batch-2 sample (a batch-1 sample would fix the batch size)."""
    batch, seq, past_len = 2, 3, 4
    device = program.device
    input_ids = torch.randint(0, program.info.vocab_size, (batch, seq), device=device)
    mask = torch.ones(batch, past_len + seq, dtype=torch.long, device=device)
    positions = torch.arange(past_len, past_len + seq, device=device).expand(batch, -1)
    past = [
        torch.randn(batch, t.shape[1], past_len, t.shape[3], dtype=t.dtype, device=device)
        for t in program.empty_cache(batch)
    ]
    names = input_names(graph_module)
    b, s = torch.export.Dim("batch"), torch.export.Dim("sequence")
    total, past_dim = torch.export.Dim("total"), torch.export.Dim("past", min=0)
    dynamic = {names[0]: {0: b, 1: s}, names[1]: {0: b, 1: total}, names[2]: {0: b, 1: s}}
    dynamic.update({name: {0: b, 2: past_dim} for name in names[3:]})
    dynamic[LOGITS_TO_KEEP] = None  # a scalar
    log = io.StringIO()
    try:
        with (
            contextlib.redirect_stdout(log),
            warnings.catch_warnings(),
            _quiet("torch.onnx"),
            torch.no_grad(),
        ):
            warnings.simplefilter("ignore")  # the exporter's notes on axis names and deprecations
            onnx_program = torch.onnx.export(
                graph_module,
                (input_ids, mask, positions, *past, torch.tensor(0, device=device)),
                dynamo=True,
                dynamic_shapes=dynamic,
                input_names=[*names, LOGITS_TO_KEEP],
                output_names=output_names(program),
                custom_translation_table=TRANSLATIONS,
                opset_version=OPSET,
                optimize=False,
                verbose=False,
            )
            _fold_and_tidy(onnx_program.model)
            graph = onnx_program.model.graph
            # an input with an initializer of its name is optional, that value its default
            (count,) = (v for v in graph.inputs if v.name == LOGITS_TO_KEEP)
            count.const_value = onnx_ir.tensor(0, dtype=onnx_ir.DataType.INT64, name=LOGITS_TO_KEEP)
            graph.register_initializer(count)
            logits = graph.outputs[0]  # its length axis is named after an exporter symbol ("u0")
            logits.shape = onnx_ir.Shape([logits.shape[0], "kept_positions", logits.shape[2]])
            return onnx_program
    except Exception as error:  # the exporter's own errors are long; keep its report for the user
        raise OnnxExportError(
            f"{program.info.model_class}: torch.onnx.export failed ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}); exporter log:\n{log.getvalue()[-2000:]}"
        ) from error
