"""Token generation over any decoder step — the PyTorch program's and onnxruntime's alike."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import Tensor

from moepass.errors import MoepassError

from .static_cache import check_window, static_capacity

logger = logging.getLogger("moepass")


def check_prompt(
    input_ids: Tensor, attention_mask: Tensor | None = None, vocab_size: int | None = None
) -> None:
    """Token ids [batch, tokens] (at least one, each in [0, vocab_size)) and a mask shaped like them,
    refused by name: a 1-D prompt or an id past the vocabulary fails deep inside the graph (or, in
    onnxruntime, a negative id counts from the end), and a [batch, 1] mask would broadcast silently."""
    if input_ids.dim() != 2 or input_ids.is_floating_point() or input_ids.dtype == torch.bool:
        raise MoepassError(
            f"input_ids must be integer token ids [batch, tokens], got {str(input_ids.dtype)[6:]} "
            f"{list(input_ids.shape)}"
        )
    if 0 in input_ids.shape:
        raise MoepassError(
            f"input_ids holds no tokens ({list(input_ids.shape)}): each step feeds at least one sequence "
            "of at least one"
        )
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise MoepassError(
            f"attention_mask must be shaped like input_ids {list(input_ids.shape)}, got "
            f"{list(attention_mask.shape)}"
        )
    if vocab_size is not None and not 0 <= int(input_ids.min()) <= int(input_ids.max()) < vocab_size:
        bad = ((input_ids < 0) | (input_ids >= vocab_size)).nonzero()[0].tolist()
        raise MoepassError(
            f"input_ids{bad} is {int(input_ids[tuple(bad)])}: token ids must lie in [0, {vocab_size})"
        )


class StepGeneration:
    """`generate` for classes with `step(ids, mask, positions, past, last_token_only=...)`,
    `empty_cache(batch)`, `cache_names` and `info` (eos_token_ids, pad_token_id, vocab_size,
    attention); those with `static_cache` and `static_step` also decode into a static cache."""

    def check_step(
        self, input_ids: Tensor, attention_mask: Tensor, position_ids: Tensor, past: list[Tensor]
    ) -> None:
        """Refuse, by name, step inputs the graph would run wrong or fail on deep inside: a mask of
        length 1 broadcasts silently (over a padded past: wrong logits), one of another wrong length
        or a missing past tensor fails in an anonymous graph node, and onnxruntime's Gather counts a
        negative token id from the end of the vocabulary. Ids are range-checked on the CPU only:
        on a GPU that would wait for the device every step (its embedding asserts instead)."""
        on_cpu = input_ids.device.type == "cpu"
        check_prompt(input_ids, vocab_size=self.info.vocab_size if on_cpu else None)
        names = self.cache_names  # read once: a program finds them in its graph
        if len(past) != len(names):
            raise MoepassError(
                f"this decoder takes {len(names)} past tensors ({', '.join(names)}), got {len(past)}; "
                "start from empty_cache(batch)"
            )
        batch, seq = input_ids.shape
        past_len = past[0].shape[2] if past and past[0].dim() == 4 else 0
        for name, tensor in zip(names, past, strict=True):
            if tensor.dim() != 4 or tensor.shape[0] != batch or tensor.shape[2] != past_len:
                raise MoepassError(
                    f"{name} is {list(tensor.shape)}: past tensors must all be [batch = {batch}, heads, "
                    f"past length = {past_len}, head dim]"
                )
        if tuple(attention_mask.shape) != (batch, past_len + seq):
            raise MoepassError(
                f"attention_mask must be [batch, past + new tokens] = [{batch}, {past_len + seq}], "
                f"got {list(attention_mask.shape)}"
            )
        if tuple(position_ids.shape) != (batch, seq):
            raise MoepassError(
                f"position_ids must be [{batch}, {seq}] like input_ids, got {list(position_ids.shape)}"
            )

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        attention_mask: Tensor | None = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        min_p: float = 0.0,
        stop_strings: str | list[str] | None = None,
        tokenizer=None,
        eos_token_id: int | list[int] | None = ...,  # default: the model's generation config
        pad_token_id: int | None = None,
        generator: torch.Generator | None = None,
        streamer: Callable[[Tensor], None] | None = None,
        cache_implementation: str = "dynamic",
        cache_capacity: int | None = None,
    ) -> Tensor:
        """Greedy (or sampled) generation with the KV cache: prompt plus up to `max_new_tokens`.

        Matches transformers `generate`: left padding via `attention_mask`, positions from the mask,
        finished sequences padded with `pad_token_id` (default: the first EOS id), `top_k` 0 or None
        for no limit, then `top_p` (nucleus: the likeliest tokens whose probabilities reach it),
        then `min_p` (tokens less likely than min_p times the likeliest one are dropped);
        `repetition_penalty` > 1 makes every token already in the sequence (prompt included) less
        likely, greedy or sampled. A sequence finishes at an EOS id or once its text (decoded by
        `tokenizer`, a transformers or `tokenizers` one, special tokens included) completes one of
        `stop_strings` with its newest token; the stop string stays in the output, as in
        transformers.
        `streamer` is called with each step's new tokens [batch] as soon as chosen.
        `cache_implementation="static"` decodes into caches allocated once for prompt + new tokens
        (`static_step`): no cache copied per step, and one shape for every step (CUDA graphs).
        `cache_capacity` fixes its slots (default: what prompt + new tokens need, the last token
        aside, rounded up to 64 but not past a sliding window), so that prompts of any length share
        one compiled step and its buffers.
        """
        check_prompt(input_ids, attention_mask, self.info.vocab_size)
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if do_sample and not temperature > 0:
            raise ValueError(
                f"temperature must be > 0 to sample, got {temperature} (do_sample=False is greedy)"
            )
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 or None: no limit), got {top_k}")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1: no limit), got {top_p}")
        if not 0 <= min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0: no limit), got {min_p}")
        stops = [stop_strings] if isinstance(stop_strings, str) else list(stop_strings or [])
        if stops and (tokenizer is None or not all(isinstance(s, str) and s for s in stops)):
            raise ValueError(
                f"stop_strings must be non-empty strings matched in the decoded text, with the model's "
                f"tokenizer= to decode it; got {stop_strings!r} and tokenizer={type(tokenizer).__name__}"
            )
        if not 0 < repetition_penalty < float("inf"):
            raise ValueError(
                f"repetition_penalty must be a positive number (1: none), got {repetition_penalty}"
            )
        if cache_implementation not in ("dynamic", "static"):
            raise ValueError(
                f"cache_implementation must be 'dynamic' or 'static', got {cache_implementation!r}"
            )
        if cache_implementation == "static" and not hasattr(self, "static_step"):
            raise MoepassError(
                f"{type(self).__name__} decodes with a growing (dynamic) cache only; "
                "cache_implementation='static' is for the PyTorch program (MoEProgram)"
            )
        if cache_capacity is not None and cache_implementation != "static":
            raise ValueError("cache_capacity sizes a static cache: pass cache_implementation='static'")
        if cache_capacity is not None and (not isinstance(cache_capacity, int) or cache_capacity < 1):
            raise ValueError(f"cache_capacity must be a positive number of slots, got {cache_capacity!r}")
        positions_known = self.info.config.get("max_position_embeddings")
        if positions_known and input_ids.shape[-1] + max_new_tokens > positions_known:
            logger.warning(  # as transformers does: the user may know the model extrapolates
                "generate: %d prompt + %d new tokens exceed the %d positions the model was made for "
                "(max_position_embeddings); tokens past them may be garbage",
                input_ids.shape[-1],
                max_new_tokens,
                positions_known,
            )
        eos = self.info.eos_token_ids if eos_token_id is ... else eos_token_id
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = pad_token_id if pad_token_id is not None else self.info.pad_token_id
        if pad is None and eos:
            pad = eos[0]
        batch = input_ids.shape[0]
        if stops and pad is None and batch > 1:
            raise ValueError(
                "stop_strings finish sequences at different steps, and this model names no pad or EOS "
                "token to fill the finished ones with: pass pad_token_id"
            )
        finishing = bool(eos or stops)  # sequences may finish before max_new_tokens
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.dtype)
        positions = mask.cumsum(-1) - 1
        positions = positions.masked_fill(mask == 0, 1)
        eos_ids = torch.tensor(eos, device=input_ids.device, dtype=input_ids.dtype)
        unfinished = torch.ones(batch, dtype=torch.bool, device=input_ids.device)
        tokens, past, step_ids = input_ids, self.empty_cache(batch), input_ids
        stopped = _StopStrings(stops, tokenizer, input_ids) if stops else None
        static = None  # the static cache, from the second step on
        if cache_implementation == "static" and max_new_tokens > 1:  # refused before the prompt runs
            # every token enters the cache but the last one generated
            needed = input_ids.shape[1] + max_new_tokens - 1
            capacity = cache_capacity
            if capacity is None:
                capacity = static_capacity(needed, self.info.attention)
            if capacity < needed:
                raise MoepassError(
                    f"cache_capacity={capacity} cannot hold {input_ids.shape[1]} prompt + "
                    f"{max_new_tokens - 1} decoded tokens: pass at least {needed}"
                )
            check_window(self.info.attention, capacity)
        for i in range(max_new_tokens):
            if static is None:
                logits, past = self.step(step_ids, mask, positions, past, last_token_only=True)
            else:
                logits = self.static_step(step_ids, positions, static)
            scores = logits[:, -1].float()
            if repetition_penalty != 1:
                scores = _penalize_repeats(scores, tokens, repetition_penalty)
            next_tokens = _pick(scores, do_sample, temperature, top_k, top_p, min_p, generator)
            if finishing and pad is not None:
                next_tokens = torch.where(unfinished, next_tokens, torch.full_like(next_tokens, pad))
            if eos:
                unfinished &= ~torch.isin(next_tokens, eos_ids)
            tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
            if stopped is not None:
                unfinished &= ~stopped(tokens, unfinished)
            if streamer is not None:
                streamer(next_tokens)
            # no device sync unless sequences can finish
            if i == max_new_tokens - 1 or (finishing and not unfinished.any()):
                break
            step_ids = next_tokens[:, None]
            positions = positions[:, -1:] + 1
            if cache_implementation == "dynamic":
                mask = torch.cat([mask, mask.new_ones(batch, 1)], dim=-1)
            elif static is None:
                static = self.static_cache(past, mask, capacity)
                past = []
        return tokens


class _StopStrings:
    """Which sequences' text a step's new tokens complete a stop string in. Like transformers'
    StopStringCriteria, a match must end in the newest token (the prompt's text counts towards it,
    but a stop string wholly inside the prompt does not stop anything), and special tokens count as
    their text (a chat's "<|im_end|>" is a stop string a user may give); it is found in the decoded
    text, past what the previous step's text already held (a multi-byte character completed by the
    newest token counts as new)."""

    def __init__(self, stops: list[str], tokenizer, prompts: Tensor):
        # a `tokenizers.Tokenizer` and a transformers tokenizer both decode so
        self.decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)
        self.stops, self.texts = stops, [self.decode(row) for row in prompts.tolist()]

    def __call__(self, tokens: Tensor, unfinished: Tensor) -> Tensor:
        done = torch.zeros_like(unfinished)
        for row in unfinished.nonzero().flatten().tolist():
            text, before = self.decode(tokens[row].tolist()), self.texts[row]
            new = _shared_start(text, before)  # where this step's text begins
            self.texts[row] = text
            done[row] = any(text.find(stop, max(0, new - len(stop) + 1)) >= 0 for stop in self.stops)
        return done


def _shared_start(a: str, b: str) -> int:
    """Length of the longest common prefix of two strings."""
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def _penalize_repeats(scores: Tensor, tokens: Tensor, penalty: float) -> Tensor:
    """transformers' repetition penalty: the scores of tokens already in the sequence move towards
    less likely (positive ones divided by `penalty`, negative ones multiplied)."""
    seen = scores.gather(1, tokens)
    return scores.scatter(1, tokens, torch.where(seen < 0, seen * penalty, seen / penalty))


def _pick(
    logits: Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float,
    min_p: float,
    generator: torch.Generator | None,
) -> Tensor:
    """The next tokens [batch] from the last position's logits [batch, vocab], processed in
    transformers' order (temperature, top-k, top-p, min-p) so that the same seed draws the same
    tokens."""
    if not do_sample:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        # drop the unlikeliest tokens while what they hold together stays within 1 - top_p; the
        # likeliest token is always kept
        ascending, order = torch.sort(logits, dim=-1)
        dropped = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - top_p
        dropped[:, -1] = False
        logits = logits.masked_fill(dropped.scatter(1, order, dropped), float("-inf"))
    if min_p > 0:  # the likeliest token always stays
        probabilities = logits.softmax(dim=-1)
        logits = logits.masked_fill(
            probabilities < min_p * probabilities.amax(-1, keepdim=True), float("-inf")
        )
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(-1)
