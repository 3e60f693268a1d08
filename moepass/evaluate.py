"""Held-out quality of a model or program: perplexity and next-token accuracy, per domain and overall.

The same function scores a transformers model and a captured `MoEProgram` (both map input_ids to
logits), so compressed and original models are compared on identical tokens with identical code.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import resource
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moepass.data import IGNORED_LABEL, DataError, TokenSet, check_fits, evaluation_set, window_length
from moepass.ir.printer import tensor_sizes
from moepass.table import format_table, human_bytes, human_count

logger = logging.getLogger("moepass")


@dataclass
class DomainScore:
    tokens: int
    nll: float  # summed negative log-likelihood, nats
    correct: int  # next-token top-1 hits

    @property
    def perplexity(self) -> float:
        """exp(mean loss); infinite beyond float range (a model broken by compression can lose over
        709 nats per token), never an OverflowError that loses a compression run."""
        try:
            return math.exp(self.nll / self.tokens)
        except OverflowError:
            return math.inf

    def to_dict(self) -> dict:
        """JSON-safe: a non-finite loss or perplexity is null (JSON has no Infinity or NaN)."""
        fields = {**asdict(self), "perplexity": self.perplexity, "accuracy": self.accuracy}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in fields.items()}

    @property
    def accuracy(self) -> float:
        return self.correct / self.tokens


@dataclass
class EvalResult:
    domains: dict[str, DomainScore]
    parameters: int
    weight_bytes: int
    peak_rss_bytes: int
    seconds: float
    seq_len: int
    extra: dict = field(default_factory=dict)

    @property
    def overall(self) -> DomainScore:
        """Token-weighted over all domains."""
        return DomainScore(
            sum(d.tokens for d in self.domains.values()),
            sum(d.nll for d in self.domains.values()),
            sum(d.correct for d in self.domains.values()),
        )

    def __str__(self) -> str:  # print(result) shows the table; repr() keeps the fields
        return self.table()

    def table(self, title: str | None = None) -> str:
        rows = [
            [name, score.tokens, f"{score.perplexity:.3f}", f"{100 * score.accuracy:.2f}%"]
            for name, score in [*sorted(self.domains.items()), ("overall", self.overall)]
        ]
        quality = format_table(["domain", "tokens", "perplexity", "next-token acc"], rows, title=title)
        size = (
            f"parameters {human_count(self.parameters)}, weights {human_bytes(self.weight_bytes)}, "
            f"process peak RSS {human_bytes(self.peak_rss_bytes)}, {self.seconds:.1f}s"
        )
        return f"{quality}\n{size}"

    def to_dict(self) -> dict:
        out = asdict(self)
        out["domains"] = {k: v.to_dict() for k, v in self.domains.items()}
        out["overall"] = self.overall.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)


@torch.no_grad()
def evaluate(
    model,
    data: TokenSet | str | None = None,
    *,
    tokenizer=None,
    seq_len: int | None = None,
    max_per_source: int | None = 64,
    batch_size: int = 8,
    seed: int = 0,
    text_key: str = "text",
) -> EvalResult:
    """Score `model` (transformers causal LM, MoEProgram or OnnxProgram) on held-out text.

    `data` is a TokenSet, or anything `moepass.data.load_documents` reads (then `tokenizer` is
    required); by default the bundled test split, with at most `max_per_source` windows of
    `seq_len` tokens (default 256, or the model's positions if fewer) per domain, chosen with
    `seed`; `text_key` names JSON records' text field. A TokenSet is scored whole, as it is.
    """
    start = time.perf_counter()
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    if isinstance(data, TokenSet) and seq_len not in (None, data.seq_len):
        raise DataError(
            f"seq_len={seq_len} cuts text into windows, but this TokenSet's windows are {data.seq_len} "
            "tokens: leave seq_len out, or build the TokenSet with the windows you want"
        )
    if isinstance(data, TokenSet):
        defaults = inspect.signature(evaluate).parameters
        text_options = {"max_per_source": max_per_source, "seed": seed, "text_key": text_key}
        if changed := [f"{k}={v!r}" for k, v in text_options.items() if v != defaults[k].default]:
            raise DataError(
                f"{', '.join(changed)}: options that pick windows of text data, but a TokenSet is scored "
                "whole, as it is: leave them out, or pass the text (or a TokenSet of the windows you want)"
            )
    if not isinstance(data, TokenSet):
        if tokenizer is None:
            raise DataError("evaluate() needs a tokenizer to read text data (or pass a TokenSet)")
        data = evaluation_set(
            "builtin:test" if data is None else data,
            tokenizer,
            seq_len=window_length(seq_len, model_config(model, "max_position_embeddings")),
            max_per_source=max_per_source,
            seed=seed,
            text_key=text_key,
        )
    check_fits(data, model_config(model, "vocab_size"), model_config(model, "max_position_embeddings"))
    device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
    domains: dict[str, DomainScore] = {}
    for source, rows in data.by_source().items():
        score = DomainScore(0, 0.0, 0)
        for begin in range(0, len(rows), batch_size):
            index = torch.tensor(rows[begin : begin + batch_size])
            inputs, labels = data.input_ids[index].to(device), data.labels[index].to(device)
            logits = inference_logits(model, inputs).float()
            loss = F.cross_entropy(
                logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORED_LABEL, reduction="sum"
            )
            scored = labels != IGNORED_LABEL
            score.nll += loss.item()
            score.correct += int(((logits.argmax(-1) == labels) & scored).sum())
            score.tokens += int(scored.sum())
        if not score.tokens:
            raise DataError(f"domain {source!r}: every label is {IGNORED_LABEL}, so nothing is scored")
        domains[source] = score
        logger.info(
            "evaluate: %s, %d tokens, perplexity %.3f (%.1fs)",
            source,
            score.tokens,
            score.perplexity,
            time.perf_counter() - start,
        )
    parameters, weight_bytes = model_size(model)
    return EvalResult(
        domains, parameters, weight_bytes, _peak_rss(), time.perf_counter() - start, data.seq_len
    )


def model_size(model) -> tuple[int, int]:
    """Parameter count and bytes of parameters and buffers, shared tensors counted once; for a
    program, quantized weights count at their logical size (`tensor_sizes`); for an OnnxProgram,
    what its export recorded and its files' bytes."""
    if not isinstance(model, nn.Module):
        return model.weight_sizes()
    graph_module = getattr(model, "graph_module", None)
    if graph_module is not None:
        sizes = tensor_sizes(graph_module).values()
        return sum(c for c, _ in sizes), sum(b for _, b in sizes)
    seen, count, nbytes = set(), 0, 0
    for tensor in [*model.parameters(), *model.buffers()]:
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        nbytes += tensor.numel() * tensor.element_size()
        if isinstance(tensor, nn.Parameter):
            count += tensor.numel()
    return count, nbytes


def inference_logits(model, input_ids):
    """Logits in inference mode (no dropout, no router jitter) even for a model left in training
    mode, which is put back as it was."""
    if not isinstance(model, nn.Module):  # an OnnxProgram: inference only
        return model(input_ids)
    training = model.training
    model.eval()
    try:
        out = model(input_ids)
    finally:
        model.train(training)
    return out.logits if hasattr(out, "logits") else out


def model_config(model, key: str):
    """A config value of a transformers model or a MoEProgram (whose info keeps the config dict)."""
    info = getattr(model, "info", None)
    if info is not None:
        return info.config.get(key)
    return getattr(getattr(model, "config", None), key, None)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
