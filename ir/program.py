"""`MoEProgram`: a captured model — its fx graph, structure map, and prefill/decode/generate."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, fx, nn
from torch._dynamo.exc import BackendCompilerFailed

from moepass.errors import MoepassError

from .canonicalize import remove_dead_nodes
from .families import FAMILIES
from .generation import StepGeneration, check_prompt
from .ops import TRACEABLE_BODIES
from .printer import format_summary
from .static_cache import (
    StaticCache,
    StaticCachePool,
    check_window,
    replays_as_cuda_graph,
    static_decode_graph,
)
from .structure import StructureMap, build_structure
from .verifier import verify


@contextlib.contextmanager
def _capturing_scalars() -> Iterator[None]:
    """Dynamo traces tensor values read as integers (a decode step's expert indices, in traceable
    bodies) as symbolic integers instead of breaking the graph there. Set and restored by hand: a
    `config.patch` object cannot be re-entered on torch 2.11 (a step inside a step, or two threads),
    and a new one per step costs 13 us; already on, it is left alone."""
    config = torch._dynamo.config
    if config.capture_scalar_outputs:
        yield
        return
    config.capture_scalar_outputs = True
    try:
        yield
    finally:
        config.capture_scalar_outputs = False


@dataclass
class ProgramInfo:
    """What a program needs besides its graph: model identity, tokens, per-layer attention notes."""

    family: str
    model_class: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    dtype: str
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None
    generation_config: dict = field(default_factory=dict)  # the model's, as transformers writes it
    attention: dict[int, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    capture_seconds: float = 0.0
    edits: list[dict] = field(default_factory=list)  # structural edits since capture, replayable in order
    history: list[dict] = field(default_factory=list)  # recipes applied, with their reports
    pruned: dict[str, str] = field(default_factory=dict)  # weight FQN -> sparsity pattern, e.g. "2:4"
    lowered: str | None = None  # device type the program was lowered for (`moepass.lower`), if any
    compiled: bool = False  # steps run through torch.compile (Inductor): `moepass.lower(compile=True)`


class MoEProgram(nn.Module, StepGeneration):
    """A captured MoE causal LM.

    The graph computes one decoder step:
        (input_ids, attention_mask, position_ids, *past) -> (logits, *present)
    where `past`/`present` hold each remaining block's key and value caches (`past_key_{i}`,
    `past_value_{i}`, i = original layer index) and present = cat(past, new tokens).
    """

    def __init__(self, graph_module: fx.GraphModule, info: ProgramInfo):
        super().__init__()
        self.graph_module = graph_module
        self.info = info
        self.report = None  # the PassReport of the last recipe applied by moepass.compress
        self._structure: StructureMap | None = None
        self._cache_names: list[str] | None = None
        self._last_token_graph: fx.GraphModule | None = None
        self._static_decode_graph: fx.GraphModule | None = None
        self._static_caches = StaticCachePool()  # their buffers serve the next of each layout
        self._compiled_steps: dict[bool | str, Callable] = {}
        self._batched_edits = 0  # open `batch_edits` blocks
        self._code_is_stale = False

    # -- graph and structure ------------------------------------------------------------------
    @property
    def structure(self) -> StructureMap:
        if self._structure is None:
            mlp_name = FAMILIES[self.info.family].mlp_name
            self._structure = build_structure(self.graph_module, self.info.attention, mlp_name)
        return self._structure

    def graph_changed(self) -> None:
        """Call after editing the graph: frees nodes and modules it no longer uses, regenerates its
        code (at the end of a `batch_edits` block) and rebuilds the structure map on demand."""
        remove_dead_nodes(self.graph_module.graph)
        self._structure, self._cache_names = None, None
        self._forget_derived_steps()
        self._code_is_stale = True
        if not self._batched_edits:
            self._regenerate_code()

    def _forget_derived_steps(self) -> None:
        """Drop what was built from the graph on its device: the last-token and static-decode
        graphs, their compiled steps and the held static caches (whose layout an edit may change)."""
        self._last_token_graph = self._static_decode_graph = None
        self._compiled_steps = {}
        self.release_static_cache()

    @contextlib.contextmanager
    def batch_edits(self) -> Iterator[None]:
        """Edits inside regenerate the graph's Python code once, at the end (or when the program next
        runs), not after each one: generating it costs time proportional to the graph, so per edit
        an artifact's replay or a pass rewriting every layer took time quadratic in the depth.
        Inside, run the program through its methods (they regenerate first), not `graph_module`."""
        self._batched_edits += 1
        try:
            yield
        finally:
            self._batched_edits -= 1
        # not after an error: the edit's error is the one to report (a next run regenerates the code)
        if not self._batched_edits and self._code_is_stale:
            self._regenerate_code()

    def _regenerate_code(self) -> None:
        self.graph_module.graph.lint()
        self.graph_module.recompile()
        self.graph_module.delete_all_unused_submodules()
        self._code_is_stale = False

    def fork(self) -> MoEProgram:
        """An independent program: its own graph, modules and Parameter objects over the same weight
        storage (passes replace tensors rather than edit them, so neither program sees the other's edits)."""
        graph_module = fx.GraphModule(self.graph_module, _graph_copy(self.graph_module))
        owned: dict[int, nn.Parameter] = {}
        for module in graph_module.modules():
            for name, param in list(module._parameters.items()):
                if param is not None:
                    owned.setdefault(id(param), nn.Parameter(param.detach(), requires_grad=False))
                    module._parameters[name] = owned[id(param)]
        return MoEProgram(graph_module, copy.deepcopy(self.info))

    def verify(self) -> None:
        """Check the IR invariants; raises `IRVerificationError` listing every violation."""
        verify(self)

    def summary(self) -> str:
        """Per-block table (attention, MoE, parameters, bytes) with totals, as `moepass inspect` prints."""
        return format_summary(self)

    def __repr__(self) -> str:
        s = self.structure
        return (
            f"MoEProgram({self.info.model_class}, blocks={len(s.blocks)}, "
            f"moe_blocks={len(s.moe_blocks)}, nodes={len(self.graph_module.graph.nodes)})"
        )

    def _apply(self, fn, recurse=True):
        """`.to(device)` also moves the device constants baked into the graph (aranges, casts).

        Changing the dtype is refused: casts inside the graph were traced for the capture dtype,
        so a converted program would not compute what the model computes in the new dtype.
        """
        dtype, before = getattr(torch, self.info.dtype), self.device
        probe = fn(torch.zeros((), dtype=dtype, device=before))
        if probe.dtype != dtype:
            raise MoepassError(
                f"this program was captured in {self.info.dtype} and cannot be converted to "
                f"{str(probe.dtype).removeprefix('torch.')}; convert the transformers model first, "
                f"then capture it"
            )
        result = super()._apply(fn, recurse)
        if probe.device != before:
            _retarget_devices(self.graph_module, probe.device)
            self._forget_derived_steps()  # they hold the old device's constants (the cache, its memory)
        return result

    # -- running ------------------------------------------------------------------------------
    @property
    def cache_names(self) -> list[str]:
        if self._cache_names is None:  # every step checks its inputs against them: not a graph walk each
            placeholders = [n.name for n in self.graph_module.graph.nodes if n.op == "placeholder"]
            self._cache_names = placeholders[3:]
        return self._cache_names

    def empty_cache(self, batch_size: int) -> list[Tensor]:
        """Zero-length past tensors for a prefill step."""
        device = self.device
        tensors = []
        for node in self.graph_module.graph.nodes:
            if node.op == "placeholder" and node.name.startswith("past_"):
                val = node.meta["val"]
                tensors.append(
                    torch.empty(batch_size, val.shape[1], 0, val.shape[3], dtype=val.dtype, device=device)
                )
        return tensors

    @property
    def device(self) -> torch.device:
        return next(self.graph_module.parameters()).device

    @torch.no_grad()  # inference only; and a compiled step compiles once per grad mode
    def step(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        position_ids: Tensor,
        past: list[Tensor],
        *,
        last_token_only: bool = False,
    ) -> tuple[Tensor, list[Tensor]]:
        """One decoder step. attention_mask covers past and new tokens: [batch, past_len + seq].

        `last_token_only` returns logits for the last position only ([batch, 1, vocab]): generation
        needs no more, and a prompt's LM head then costs one row instead of one per token."""
        self.check_step(input_ids, attention_mask, position_ids, past)
        if self._code_is_stale:  # run inside a `batch_edits` block (a pass calibrating between edits)
            self._regenerate_code()
        graph_module = self._last_token_module() if last_token_only else self.graph_module
        outputs = self._run(last_token_only, graph_module, input_ids, attention_mask, position_ids, *past)
        return outputs[0], list(outputs[1:])

    def static_cache(
        self, past: list[Tensor], attention_mask: Tensor, capacity: int, *, reuse: bool = True
    ) -> StaticCache:
        """A static cache of `capacity` slots holding a prefill step's caches and mask, for
        `static_step`; refused past a sliding window (`moepass.ir.static_cache`).

        `reuse`: take the buffers of the previous cache of the same layout (batch, capacity, dtype,
        device; that cache is then retired), and keep this one's for the next: a CUDA graph records
        the addresses it writes, so new buffers each `generate` would record the step again each
        time and keep every recording. A program so holds the buffers of the latest cache of up to 4
        layouts (`StaticCachePool`; `release_static_cache` frees them) and decodes one static cache
        per layout at a time, from one thread. `reuse=False`: buffers of its own."""
        check_window(self.info.attention, capacity)
        if not reuse:
            return StaticCache.from_prefill(past, attention_mask, capacity)
        return self._static_caches.take(past, attention_mask, capacity)

    def release_static_cache(self) -> None:
        """Let the buffers of the held static caches go (memory for other work); later static
        caches allocate their own."""
        self._static_caches.clear()

    @torch.no_grad()
    def static_step(self, input_ids: Tensor, position_ids: Tensor, cache: StaticCache) -> Tensor:
        """One decode step of one token per sequence ([batch, 1] ids and positions) into a static
        cache, written in place: logits [batch, 1, vocab]. Every step has the same shapes, so a
        compiled program on CUDA replays it as a CUDA graph instead of launching each kernel."""
        batch = cache.mask.shape[0]
        for name, tensor in (("input_ids", input_ids), ("position_ids", position_ids)):
            if tuple(tensor.shape) != (batch, 1):
                raise MoepassError(
                    f"{name} must be [batch = {batch}, 1]: a static-cache step decodes one token per "
                    f"sequence, got {list(tensor.shape)} (run prompts through `step`)"
                )
        if cache.retired:
            raise MoepassError(
                "this static cache's buffers now serve a later static_cache() of the same layout (the "
                "program reuses them): to decode several caches of one layout at once, create them with "
                "static_cache(..., reuse=False)"
            )
        if cache.length >= cache.capacity:
            raise MoepassError(f"the static cache is full ({cache.capacity} slots); allocate a larger one")
        if self._code_is_stale:
            self._regenerate_code()
        cache.mask[:, cache.length] = 1
        cache.slot.fill_(cache.length)  # a scalar argument of a fill kernel: no copy waits for the device
        (logits,) = self._run(
            "static",
            self._static_decode_module(),
            input_ids,
            cache.mask,
            position_ids,
            *cache.tensors,
            cache.slot,
        )
        cache.length += 1
        return logits

    def _run(self, key: bool | str, graph_module: fx.GraphModule, *inputs: Tensor) -> tuple[Tensor, ...]:
        """The step graph run as it is, or (a program lowered with `compile=True`) through
        torch.compile, compiled once per `key` (prompt, single token or static-cache decode)."""
        if not self.info.compiled:
            return graph_module(*inputs)
        replayed = key == "static" and replays_as_cuda_graph(self.device)
        if key not in self._compiled_steps:
            traceable = _with_traceable_bodies(graph_module)
            if replayed:
                # fixed shapes: Inductor replays the whole step as a CUDA graph (decode at batch 1 is
                # bound by launching kernels, not by the GPU)
                compiled = torch.compile(traceable, mode="reduce-overhead")
            else:
                # dynamic lengths: one graph for prompts and one for single tokens, not one per cache
                # length; on CPU a C++ wrapper calls the kernels: a decode step is ~100 small calls,
                # and Python's per-call cost was 15-20% of a tiny-mixtral step (`tools/bench_e2e.py`)
                options = {"cpp_wrapper": True} if self.device.type == "cpu" else None
                compiled = torch.compile(traceable, dynamic=True, options=options)
            self._compiled_steps[key] = compiled
        # compiled graphs guard on their inputs' strides: expanded positions, or a prompt's cache (laid
        # out unlike a decode step's), would each cost another compile
        inputs = tuple(t.contiguous() for t in inputs)
        try:
            with _capturing_scalars():
                outputs = self._compiled_steps[key](*inputs)
        except BackendCompilerFailed as error:
            raise MoepassError(
                f"torch.compile (Inductor) could not compile this program's step: "
                f"{type(error.inner_exception).__name__}: {str(error.inner_exception).splitlines()[0]}; "
                "lower it without compile=True (Inductor needs a C++ compiler on CPU)"
            ) from error
        if replayed:  # a CUDA graph's next replay overwrites its outputs
            outputs = tuple(t.clone() for t in outputs)
        return outputs

    def _last_token_module(self) -> fx.GraphModule:
        """The step graph with the final hidden states cut to the last position before the LM head;
        shares every tensor with `graph_module`."""
        if self._last_token_graph is None:
            graph = _graph_copy(self.graph_module)
            head = lm_head_entry(graph, self.structure)
            with graph.inserting_before(head):
                last = graph.call_function(torch.ops.aten.slice.Tensor, (head.args[0], 1, -1, 2**63 - 1))
            head.replace_input_with(head.args[0], last)
            self._last_token_graph = fx.GraphModule(self.graph_module, graph)
        return self._last_token_graph

    def _static_decode_module(self) -> fx.GraphModule:
        """The last-token step graph decoding into static caches (`static_decode_graph`)."""
        if self._static_decode_graph is None:
            graph = static_decode_graph(_graph_copy(self._last_token_module()), self.cache_names)
            self._static_decode_graph = fx.GraphModule(self.graph_module, graph)
        return self._static_decode_graph

    @torch.no_grad()
    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """Logits [batch, seq, vocab] for a full sequence, like the transformers model's forward."""
        check_prompt(input_ids, attention_mask, self.info.vocab_size)
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = torch.arange(seq, device=input_ids.device).expand(batch, -1)
        logits, _ = self.step(input_ids, attention_mask, positions, self.empty_cache(batch))
        return logits


def _graph_copy(graph_module: fx.GraphModule) -> fx.Graph:
    """A new graph with the same nodes (a copy to edit; the tensors stay the module's)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(graph_module.graph, {}))
    return graph


def _with_traceable_bodies(graph_module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the step graph calling ops' traceable bodies (`TRACEABLE_BODIES`) instead of the ops,
    sharing every tensor: what torch.compile gets, so Inductor can fuse across them."""
    graph = _graph_copy(graph_module)
    for node in graph.nodes:
        if node.op == "call_function" and node.target in TRACEABLE_BODIES:
            node.target = TRACEABLE_BODIES[node.target]
    return fx.GraphModule(graph_module, graph)


def _retarget_devices(graph_module: fx.GraphModule, device: torch.device) -> None:
    def swap(value):
        return device if isinstance(value, torch.device) else value

    for node in graph_module.graph.nodes:
        node.args = fx.node.map_aggregate(node.args, swap)
        node.kwargs = fx.node.map_aggregate(node.kwargs, swap)
    graph_module.recompile()


def lm_head_entry(graph: fx.Graph, structure) -> fx.Node:
    """The LM head's first op (the final norm's): the one node of the head reading from outside it,
    where the final hidden states can be cut to the positions whose logits are wanted."""
    inside = set(structure.lm_head.nodes)
    return next(
        n
        for n in graph.nodes
        if n.name in inside
        and n.op == "call_function"
        and isinstance(n.args[0], fx.Node)
        and n.args[0].name not in inside
    )
