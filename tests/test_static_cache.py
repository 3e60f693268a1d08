"""Static-cache decoding: in-place writes into fixed buffers give the growing cache's logits."""

from __future__ import annotations

import pytest
import torch

import moepass
from helpers import FAMILIES, captured, rtn
from moepass.errors import MoepassError
from moepass.ir import static_cache
from moepass.ir.static_cache import StaticCache, StaticCachePool, static_capacity

WINDOW = 8  # the random configs' sliding-window layers, in these families:
SLIDING = ("gpt_oss", "dots1", "exaone_moe", "afmoe", "llama4_text")
# Llama-4's random config chunks its attention and steps its temperature every 4 positions; here, like
# the windows: chunks of 8 and a temperature constant over 8 slots
OVERRIDES = {"llama4_text": dict(attention_chunk_size=WINDOW, floor_scale=WINDOW + 1)}


def _padded_prompt(vocab: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, length))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding: the masked prompt slots must stay masked in the static cache
    return ids, mask


def _decode_both_ways(program, ids, mask, steps: int, capacity: int):
    """Logits of `steps` greedy decode steps through the growing cache and through a static one fed
    the same tokens, after one prefill."""
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    logits, past = program.step(ids, mask, positions, program.empty_cache(ids.shape[0]), last_token_only=True)
    static = program.static_cache(past, mask, capacity)
    dynamic_logits, static_logits = [], []
    for _ in range(steps):
        token, positions = logits[:, -1:].argmax(-1), positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones_like(token)], dim=-1)
        static_logits.append(program.static_step(token, positions, static))
        logits, past = program.step(token, mask, positions, past, last_token_only=True)
        dynamic_logits.append(logits)
    return torch.cat(dynamic_logits, 1), torch.cat(static_logits, 1), static


@pytest.mark.parametrize("family", FAMILIES)
def test_static_steps_give_the_dynamic_steps_logits(family, seed):
    model, program = captured(family, **OVERRIDES.get(family, {}))
    ids, mask = _padded_prompt(model.config.vocab_size, 3)
    capacity = WINDOW if family in SLIDING else 32  # slots past the tokens stay masked
    dynamic, static, cache = _decode_both_ways(program, ids, mask, 5, capacity)
    assert (static - dynamic).abs().max() <= 1e-5, family
    assert cache.length == 8 and cache.capacity == capacity
    assert torch.equal(cache.mask[:, :8], torch.cat([mask, torch.ones(2, 5, dtype=mask.dtype)], 1))
    assert not cache.mask[:, 8:].any()


@pytest.mark.parametrize("family", FAMILIES)
def test_static_generation_matches_transformers(family, seed):
    model, program = captured(family, **OVERRIDES.get(family, {}))
    ids, mask = _padded_prompt(model.config.vocab_size, 4)
    new = WINDOW - 4 if family in SLIDING else 12
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False)
    got = program.generate(ids, new, attention_mask=mask, cache_implementation="static")
    assert torch.equal(got, expected), family


def test_a_later_cache_of_the_same_shape_reuses_the_buffers_refilled(seed):
    """A CUDA graph writes where it was recorded, so a program hands each static cache the previous
    one's buffers: the later cache must hold its own prompt and mask only (none of the earlier
    sequence's slots), and the earlier cache is refused from then on."""
    model, program = captured("qwen2_moe")
    _, _, first = _decode_both_ways(program, *_padded_prompt(model.config.vocab_size, 6), 6, 32)
    ids, mask = _padded_prompt(model.config.vocab_size, 3)  # shorter: the first's slots 7-11 are stale
    dynamic, static, second = _decode_both_ways(program, ids, mask, 4, 32)
    assert (static - dynamic).abs().max() <= 1e-5
    pointers = [t.data_ptr() for t in (*second.tensors, second.mask)]
    assert pointers == [t.data_ptr() for t in (*first.tensors, first.mask)]
    assert second.length == 7 and not second.mask[:, 7:].any()
    assert not any(t[:, :, 7:].any() for t in second.tensors)
    token, positions = ids[:, :1], torch.full_like(ids[:, :1], 7)
    with pytest.raises(MoepassError, match="buffers now serve a later static_cache"):
        program.static_step(token, positions, first)
    _, past = program.step(ids[:1], mask[:1], positions[:1, :1].expand(1, 3), program.empty_cache(1))
    third = program.static_cache(past, mask[:1], 32)  # another batch: buffers of its own
    assert third.tensors[0].data_ptr() not in pointers and not second.retired
    *_, fourth = _decode_both_ways(program, ids, mask, 1, 32)  # batch 2 again: the second's buffers
    assert [t.data_ptr() for t in (*fourth.tensors, fourth.mask)] == pointers and second.retired
    assert not third.retired
    with pytest.raises(MoepassError, match=r"past tensor 0 is \[1, .*, 3, .*length = 4"):
        program.static_cache(past, torch.ones(1, 4, dtype=mask.dtype), 32)  # refused: retires nothing
    own = program.static_cache(past, mask[:1], 32, reuse=False)
    assert own.tensors[0].data_ptr() != third.tensors[0].data_ptr() and not third.retired
    program.static_step(token, positions, fourth)
    program.release_static_cache()
    assert program.static_cache(past, mask[:1], 32).tensors[0].data_ptr() != third.tensors[0].data_ptr()


def test_the_pool_holds_the_latest_cache_of_each_layout_and_lets_the_least_recent_go(seed):
    """Alternating batch sizes reuse each one's buffers (a CUDA graph per layout replays); past the
    pool's size the least recently used layout is let go, not retired."""
    pool = StaticCachePool(layouts=2)

    def take(batch: int, capacity: int = 8) -> StaticCache:
        past = [torch.randn(batch, 2, 3, 4) for _ in range(2)]
        return pool.take(past, torch.ones(batch, 3, dtype=torch.long), capacity)

    one, two = take(1), take(2)
    again = take(1)  # batch 1 again: its buffers, refilled
    assert again.tensors[0].data_ptr() == one.tensors[0].data_ptr() and one.retired and not two.retired
    three = take(3)  # a third layout: batch 2's, the least recently used, is let go
    assert [c.mask.shape[0] for c in pool.held()] == [1, 3]
    assert take(2).tensors[0].data_ptr() != two.tensors[0].data_ptr() and not two.retired
    assert [c.mask.shape[0] for c in pool.held()] == [3, 2] and not three.retired
    assert take(3, capacity=9).tensors[0].data_ptr() != three.tensors[0].data_ptr()  # capacity: layout
    held = pool.held()
    with pytest.raises(MoepassError, match="cannot hold the 3 tokens"):
        take(3, capacity=2)
    with pytest.raises(MoepassError, match=r"past tensor 0 is \[3, 2, 4, 4\]"):  # a held layout's
        pool.take([torch.randn(3, 2, 4, 4)] * 2, torch.ones(3, 3, dtype=torch.long), 9)
    assert pool.held() == held and not any(c.retired for c in held)  # refusals take nothing
    pool.clear()
    assert pool.held() == []


def test_a_fixed_cache_capacity_serves_every_prompt_length(seed):
    model, program = captured("olmoe")
    ids = torch.randint(3, model.config.vocab_size, (1, 5))
    want = program.generate(ids, 6, eos_token_id=None)
    got = program.generate(ids, 6, eos_token_id=None, cache_implementation="static", cache_capacity=40)
    assert torch.equal(got, want)
    assert program._static_caches.held()[-1].capacity == 40  # the latest cache: the pinned capacity
    with pytest.raises(MoepassError, match="cache_capacity=9 cannot hold 5 prompt \\+ 5 decoded tokens"):
        program.generate(ids, 6, cache_implementation="static", cache_capacity=9)
    with pytest.raises(ValueError, match="cache_capacity sizes a static cache"):
        program.generate(ids, 6, cache_capacity=40)
    with pytest.raises(ValueError, match="cache_capacity must be a positive number of slots, got 0"):
        program.generate(ids, 1, cache_implementation="static", cache_capacity=0)


def test_quantized_lowered_programs_decode_into_static_caches(seed):
    """The CPU lowering's packed int4 ops, fused linears and input-major weights, on a static cache."""
    model, program = captured("deepseek_v3")
    lowered = moepass.lower(rtn(program, bits=4, group_size=32))
    ids, mask = _padded_prompt(model.config.vocab_size, 5)
    dynamic, static, _ = _decode_both_ways(lowered, ids, mask, 4, 16)
    assert (static - dynamic).abs().max() <= 1e-4


def test_compiled_static_decoding_compiles_once_for_every_step_and_similar_prompts(seed):
    model, program = captured("mixtral")
    compiled = moepass.lower(program, compile=True)
    ids = torch.randint(3, model.config.vocab_size, (1, 6))
    want = program.generate(ids, 6, eos_token_id=None)
    assert torch.equal(compiled.generate(ids, 6, eos_token_id=None, cache_implementation="static"), want)
    longer = torch.randint(3, model.config.vocab_size, (1, 9))  # a new prompt length, same capacity
    compiled.generate(longer, 1, eos_token_id=None)  # compiles the prompt graph for this length
    want = program.generate(longer, 10, eos_token_id=None)
    with torch._dynamo.config.patch(error_on_recompile=True):
        got = compiled.generate(longer, 10, eos_token_id=None, cache_implementation="static")
    assert torch.equal(got, want)


def test_the_cuda_graph_compile_runs_each_step_and_call_without_recompiling(seed, monkeypatch):
    """The CUDA path's compile (static shapes, `mode="reduce-overhead"`, caches at static addresses,
    outputs copied out of the graph's memory) taken on CPU, where Inductor skips the CUDA graph but
    compiles the same step: every decode step, and a later call's (another prompt, the same static
    buffers: a CUDA graph would replay, not record again), must reuse the first compile."""
    monkeypatch.setattr(static_cache, "CUDA_GRAPH_DEVICES", ("cuda", "cpu"))
    model, program = captured("mixtral")  # as above: Inductor's cache serves the prompt's compile
    compiled = moepass.lower(program, compile=True)
    ids = torch.randint(3, model.config.vocab_size, (2, 5))
    compiled.generate(ids, 3, eos_token_id=None, cache_implementation="static")  # compiles
    buffers = [t.data_ptr() for t in compiled._static_caches.held()[-1].tensors]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in ids:  # the first as before, then another
            prompt = prompt[None].expand(2, -1)
            got = compiled.generate(prompt, 8, eos_token_id=None, cache_implementation="static")
            assert torch.equal(got, program.generate(prompt, 8, eos_token_id=None))
            assert [t.data_ptr() for t in compiled._static_caches.held()[-1].tensors] == buffers


def test_capacity_rounds_up_but_not_past_a_sliding_window():
    assert static_capacity(5, {}) == 64 and static_capacity(65, {0: "GQA"}) == 128
    assert static_capacity(5, {0: "GQA", 1: f"GQA, sliding {WINDOW}"}) == WINDOW
    assert static_capacity(WINDOW + 1, {1: f"sliding {WINDOW}"}) == WINDOW + 1  # refused when used
    # Llama-4: chunks of 4 hold 4 slots; a temperature stepping every 4 positions is one value over 3
    assert static_capacity(2, {0: "chunked 4", 1: "no RoPE, temperature step 4"}) == 3


def test_static_decoding_refuses_what_it_would_get_wrong(seed):
    model, program = captured("gpt_oss")
    ids = torch.randint(3, model.config.vocab_size, (1, 4))
    with pytest.raises(MoepassError, match=f"layer 0 attends through a sliding window of {WINDOW} tokens"):
        program.generate(ids, WINDOW - 2, cache_implementation="static")
    with pytest.raises(ValueError, match="cache_implementation must be 'dynamic' or 'static', got 'Static'"):
        program.generate(ids, 2, cache_implementation="Static")
    mask, positions = torch.ones_like(ids), torch.arange(4)[None]
    _, past = program.step(ids, mask, positions, program.empty_cache(1))
    with pytest.raises(MoepassError, match="cannot hold the 4 tokens"):
        StaticCache.from_prefill(past, mask, 3)
    cache = program.static_cache(past, mask, 5)
    with pytest.raises(MoepassError, match=r"input_ids must be \[batch = 1, 1\].*got \[1, 2\]"):
        program.static_step(ids[:, :2], positions[:, :2], cache)
    program.static_step(ids[:, :1], positions[:, -1:] + 1, cache)
    with pytest.raises(MoepassError, match=r"the static cache is full \(5 slots\)"):
        program.static_step(ids[:, :1], positions[:, -1:] + 2, cache)


def test_static_decoding_refuses_capacities_past_llama4_chunks_and_temperature_steps(seed):
    """Its random config chunks layers 0 and 2 every 4 tokens and steps layer 1's temperature every 4
    positions: 4 and 3 slots are exact; one more is refused, naming the layer and why."""
    model, program = captured("llama4_text")
    ids = torch.randint(3, model.config.vocab_size, (1, 3))
    with pytest.raises(MoepassError, match="layer 0 attends within chunks of 4 tokens"):
        program.generate(ids, 3, cache_implementation="static")  # 5 tokens cached
    with pytest.raises(MoepassError, match="layer 1 scales its attention temperature every 4 positions"):
        program.generate(ids, 2, cache_implementation="static")  # 4
    expected = model.generate(ids[:, :2], max_new_tokens=2, do_sample=False)
    assert torch.equal(program.generate(ids[:, :2], 2, cache_implementation="static"), expected)
