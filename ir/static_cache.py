"""Decoding into a static KV cache: fixed-capacity key/value buffers written in place.

The step graph grows its caches (`present = cat(past, new)`): each decode step copies every layer's
whole cache, and each step has new shapes, so a compiled step can never be captured in a CUDA graph.
The static decode graph is the last-token step graph with each such `cat` replaced by an in-place
`index_copy_` of the new token into slot `cache_position` of a [batch, heads, capacity, head dim]
buffer. The attention mask spans the whole capacity (slots not yet written are masked out), so the
graph's attention reads `capacity` keys and treats the query as the last position: for causal
attention that is exact (every written slot precedes it); a sliding window, or Llama-4's chunks, only
while the capacity fits inside one, and Llama-4's position-tuned attention temperature only while it
is one value over the capacity (it steps every `floor_scale` positions), so longer capacities are
refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor, fx

from moepass.errors import MoepassError

_CAT = torch.ops.aten.cat.default
# where a compiled program replays its static-cache step as a CUDA graph (Inductor's cudagraph trees)
CUDA_GRAPH_DEVICES = ("cuda",)
# attention notes (`attention_description`) that bound a static cache: note -> (slots, what it is)
_LIMITS = (
    (re.compile(r"sliding (\d+)"), 0, "attends through a sliding window of {} tokens"),
    (re.compile(r"chunked (\d+)"), 0, "attends within chunks of {} tokens"),
    (re.compile(r"temperature step (\d+)"), -1, "scales its attention temperature every {} positions"),
)


@dataclass
class StaticCache:
    """The caches of a batch being decoded: buffers [batch, heads, capacity, head dim] (as the graph
    names them, `cache_names`), the attention mask over all slots [batch, capacity], and how many
    slots hold tokens (`length`, the next token's slot). `slot` holds `length` on the buffers'
    device, written by each step: a host value copied per step would wait for the device every
    step. `retired`: a later cache took its buffers."""

    tensors: list[Tensor]
    mask: Tensor
    length: int
    slot: Tensor | None = None
    retired: bool = False

    def __post_init__(self) -> None:
        if self.slot is None:
            self.slot = torch.full((1,), self.length, dtype=torch.int64, device=self.mask.device)

    @property
    def capacity(self) -> int:
        return self.mask.shape[1]

    @classmethod
    def from_prefill(
        cls, past: list[Tensor], attention_mask: Tensor, capacity: int, recycle: StaticCache | None = None
    ) -> StaticCache:
        """Buffers of `capacity` slots holding a prefill's caches (`past`, one [batch, heads, length,
        head dim] per cache name) and its mask [batch, length]; `recycle`'s buffers where they have
        the layout needed (then `recycle` is retired), new ones otherwise."""
        check_prefill(past, attention_mask, capacity)
        batch, length = attention_mask.shape
        if recycle is not None and recycle.layout == cache_layout(past, attention_mask, capacity):
            recycle.retired = True
            tensors, mask, slot = recycle.tensors, recycle.mask, recycle.slot
        else:
            tensors = [t.new_empty(batch, t.shape[1], capacity, t.shape[3]) for t in past]
            for buffer in tensors:
                if replays_as_cuda_graph(buffer.device):  # written in place by a CUDA graph:
                    torch._dynamo.mark_static_address(buffer)  # replays need it at one address
            mask, slot = attention_mask.new_empty(batch, capacity), None
        for buffer, tensor in zip(tensors, past, strict=True):
            buffer[:, :, :length] = tensor
            buffer[:, :, length:] = 0  # masked; zeroed so that no earlier sequence's values remain
        mask[:, :length] = attention_mask
        mask[:, length:] = 0
        return cls(tensors, mask, length, slot)

    @property
    def layout(self) -> tuple:
        return cache_layout(self.tensors, self.mask, self.capacity)


def check_prefill(past: list[Tensor], attention_mask: Tensor, capacity: int) -> None:
    """Refuse caches a static cache cannot take: too many tokens, or past tensors not [batch, heads,
    length, head dim] for the mask's batch and length."""
    batch, length = attention_mask.shape
    if capacity < length:
        raise MoepassError(f"a static cache of {capacity} slots cannot hold the {length} tokens given")
    for i, tensor in enumerate(past):
        if tensor.dim() != 4 or tuple(tensor.shape[::2]) != (batch, length):
            raise MoepassError(
                f"past tensor {i} is {list(tensor.shape)}: a static cache takes [batch = {batch}, heads, "
                f"length = {length}, head dim] past tensors, as long as the attention mask"
            )


def cache_layout(tensors: list[Tensor], mask: Tensor, capacity: int) -> tuple:
    """What two static caches must share for one's buffers to serve the other: the capacity, and
    every buffer's batch, heads, head dim, dtype and device (lengths aside)."""
    tensors = [*tensors, mask[:, None, :, None]]
    return (capacity, *((t.shape[0], t.shape[1], t.shape[3], t.dtype, t.device) for t in tensors))


class StaticCachePool:
    """The buffers of the latest static cache of each layout (at most `layouts` of them, the least
    recently used let go first), each handed to the next cache of its layout.

    Why: Inductor's cudagraph trees record a step again when a static input moves to a new address
    and keep every recording, so a cache allocated per `generate` would add a recording per call;
    holding one cache per layout also serves callers alternating batch sizes or capacities."""

    def __init__(self, layouts: int = 4):
        self.layouts = layouts
        self._held: dict[tuple, StaticCache] = {}

    def take(self, past: list[Tensor], attention_mask: Tensor, capacity: int) -> StaticCache:
        """A static cache holding the prefill, in the buffers of the held cache of its layout (which
        is retired) or in new ones; held in turn for the next cache of that layout."""
        check_prefill(past, attention_mask, capacity)  # before any buffer is taken: retires nothing
        layout = cache_layout(past, attention_mask, capacity)
        cache = StaticCache.from_prefill(past, attention_mask, capacity, recycle=self._held.pop(layout, None))
        self._held[layout] = cache  # the most recently used last
        while len(self._held) > self.layouts:
            del self._held[next(iter(self._held))]
        return cache

    def held(self) -> list[StaticCache]:
        """The held caches, least recently used first."""
        return list(self._held.values())

    def clear(self) -> None:
        """Let every held buffer go; later caches allocate their own."""
        self._held.clear()


def replays_as_cuda_graph(device: torch.device) -> bool:
    """Whether a compiled program on `device` replays its static-cache step as a CUDA graph."""
    return device.type in CUDA_GRAPH_DEVICES


def static_limits(attention: dict[int, str]) -> dict[int, tuple[int, str]]:
    """Layer -> (most slots a static cache computes exactly with, why), from the per-layer attention
    notes; the tightest where a layer has several."""
    limits = {}
    for layer, note in attention.items():
        found = [
            (int(m.group(1)) + offset, why.format(m.group(1)))
            for pattern, offset, why in _LIMITS
            if (m := pattern.search(note))
        ]
        if found:
            limits[layer] = min(found)
    return limits


def static_capacity(needed: int, attention: dict[int, str]) -> int:
    """Slots to allocate for `needed` tokens: rounded up to a multiple of 64, so that prompts of
    similar lengths share one compiled step (and CUDA graph), but not past a limit (a sliding window)
    that `needed` fits. Not more: every step attends over every slot, and on CPU masked slots cost as
    much as written ones (flash attention at 1024 slots: 14x its time at 17)."""
    limits = [slots for slots, _ in static_limits(attention).values()]
    return max(needed, min([-(-needed // 64) * 64, *limits]))


def check_window(attention: dict[int, str], capacity: int) -> None:
    """Refuse a capacity past a layer's limit (see the module docstring), naming the layer."""
    for layer, (slots, why) in sorted(static_limits(attention).items()):
        if capacity > slots:
            raise MoepassError(
                f"layer {layer} {why}: a static cache of {capacity} slots would compute it wrong; "
                f"decode with the dynamic cache (cache_implementation='dynamic') or keep prompt + new "
                f"tokens (and cache_capacity) <= {slots}"
            )


def static_decode_graph(graph: fx.Graph, cache_names: list[str]) -> fx.Graph:
    """`graph` (a step graph: (ids, mask, positions, *past) -> (logits, *present)) edited in place into
    (ids, mask, positions, *caches, cache_position) -> (logits,), writing the new token of every cache
    into slot `cache_position` (a [1] int64 tensor) of its buffer."""
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    output = graph.output_node()
    logits, *presents = output.args[0]
    with graph.inserting_after(placeholders[cache_names[-1]]):
        cache_position = graph.placeholder("cache_position")
    for name, present in zip(cache_names, presents, strict=True):
        past = placeholders[name]
        if not (
            present.op == "call_function"
            and present.target is _CAT
            and len(present.args[0]) == 2
            and present.args[0][0] is past
            and present.args[1] in (2, -2)
        ):
            raise MoepassError(
                f"cannot decode into a static cache: {name}'s present is not cat({name}, new tokens) "
                f"along the sequence (it is {present.format_node()})"
            )
        with graph.inserting_before(present):
            written = graph.call_function(
                torch.ops.aten.index_copy_.default, (past, 2, cache_position, present.args[0][1])
            )
        present.replace_all_uses_with(written)
        graph.erase_node(present)
    output.args = ((logits,),)
    return graph
