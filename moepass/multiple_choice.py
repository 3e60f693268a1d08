"""Multiple-choice accuracy: the paper's zero-shot task scores (ARC, BoolQ, HellaSwag, MMLU, ... through
lm-evaluation-harness) on local question files, since compression can keep perplexity and still lose
answers.

Each question's answer is the choice whose text the model finds likeliest after the context (joined
by a space unless either side has whitespace there), as lm-evaluation-harness scores it: `acc` sums
the choice's token log-likelihoods, `acc_norm` divides that by the choice's length in characters
(long answers are not penalized for their length). A question starts as a document does: after the
BOS where the tokenizer adds one, else after the end-of-text token that separates documents.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from moepass.data import (
    BUILTIN_PREFIX,
    JSON_LINES,
    DataError,
    encoder,
    load_documents,
    read_json_array,
    read_jsonl,
    without_padding_or_truncation,
)
from moepass.evaluate import inference_logits, model_config
from moepass.table import format_table

logger = logging.getLogger("moepass")
CONTINUATIONS = "builtin:continuations"


@dataclass(frozen=True)
class Question:
    context: str
    choices: tuple[str, ...]
    label: int  # index of the right choice
    task: str = "questions"


@dataclass
class TaskScore:
    questions: int = 0
    correct: int = 0  # acc: the likeliest choice is the right one
    correct_norm: int = 0  # acc_norm: the likeliest per character

    @property
    def accuracy(self) -> float:
        return self.correct / self.questions

    @property
    def accuracy_norm(self) -> float:
        return self.correct_norm / self.questions


@dataclass
class ChoiceResult:
    tasks: dict[str, TaskScore]
    loglikelihoods: list[list[float]]  # per question, per choice: summed over the choice's tokens
    seconds: float
    chance: dict[str, float] = field(default_factory=dict)  # per task: mean of 1 / choices

    @property
    def overall(self) -> TaskScore:
        """Question-weighted over all tasks."""
        scores = self.tasks.values()
        return TaskScore(
            *(sum(getattr(s, f) for s in scores) for f in ("questions", "correct", "correct_norm"))
        )

    def _rows(self) -> dict[str, tuple[TaskScore, float]]:
        """Each task, then all of them, with the accuracy of guessing (question-weighted)."""
        rows = {name: (score, self.chance[name]) for name, score in self.tasks.items()}
        overall = self.overall
        guess = math.fsum(self.chance[n] * s.questions for n, s in self.tasks.items()) / overall.questions
        return {**rows, "overall": (overall, guess)}

    def table(self, title: str = "multiple choice") -> str:
        rows = [
            [name, s.questions, *(f"{100 * v:.2f}%" for v in (s.accuracy, s.accuracy_norm, c))]
            for name, (s, c) in self._rows().items()
        ]
        return format_table(["task", "questions", "acc", "acc_norm", "chance"], rows, title=title)

    def to_dict(self) -> dict:
        return {
            "tasks": {
                name: {"questions": s.questions, "acc": s.accuracy, "acc_norm": s.accuracy_norm, "chance": c}
                for name, (s, c) in self._rows().items()
            },
            "loglikelihoods": self.loglikelihoods,
            "seconds": self.seconds,
        }

    def __str__(self) -> str:
        return self.table()


def load_questions(path: str | Path, *, max_per_task: int | None = None, seed: int = 0) -> list[Question]:
    """Questions from a JSON Lines (.jsonl, .jsonl.gz) or JSON array file of records
    `{"context": str, "choices": [str, ...], "label": int, "task": str (optional)}`, or
    `builtin:continuations`; at most `max_per_task` of each task, drawn with `seed` (file order kept)."""
    questions = continuation_questions() if str(path) == CONTINUATIONS else _read_questions(Path(path))
    if max_per_task is None:
        return questions
    generator = torch.Generator().manual_seed(seed)
    by_task: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_task.setdefault(q.task, []).append(i)
    chosen = []
    for rows in by_task.values():
        picks = torch.randperm(len(rows), generator=generator)[:max_per_task].tolist()
        chosen += [rows[p] for p in picks]
    return [questions[i] for i in sorted(chosen)]


def _read_questions(path: Path) -> list[Question]:
    if not path.is_file():
        raise DataError(
            f"{path}: no such file (questions are a .jsonl, .jsonl.gz or .json file, or {CONTINUATIONS})"
        )
    name = path.name.lower()
    if name.endswith(JSON_LINES):
        records = read_jsonl(path)
    elif name.endswith(".json"):
        records = read_json_array(path)
    else:
        raise DataError(f"{path}: questions are read from .jsonl, .jsonl.gz or .json files")
    questions = [_question(record, f"{path}: record {i}") for i, record in enumerate(records, 1)]
    if not questions:
        raise DataError(f"{path}: holds no questions")
    return questions


def continuation_questions(
    context_words: int = 24, choice_words: int = 6, choices: int = 4
) -> list[Question]:
    """`builtin:continuations`: held-out text (the bundled test split) cut after `context_words`
    words; which `choice_words` words come next, among the same words of other documents of that
    domain? Offline, and meaningful for any model that reads English or Python: the bundled models
    score well above chance on it, and compression can lower that."""
    by_source: dict[str, list[list[str]]] = {}
    for document in load_documents(BUILTIN_PREFIX + "test"):
        words = document.text.split()
        if len(words) >= context_words + choice_words:
            by_source.setdefault(document.source, []).append(words)
    generator = random.Random(0)
    questions = []
    for source, documents in by_source.items():
        if len(documents) < choices:
            continue
        for index, words in enumerate(documents):
            others = generator.sample([d for i, d in enumerate(documents) if i != index], choices - 1)
            texts = [" ".join(d[context_words : context_words + choice_words]) for d in others]
            label = generator.randrange(choices)
            texts.insert(label, " ".join(words[context_words : context_words + choice_words]))
            questions.append(Question(" ".join(words[:context_words]), tuple(texts), label, source))
    return questions


def _question(record, where: str) -> Question:
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not a record with context, choices, label")
    missing = [key for key in ("context", "choices", "label") if key not in record]
    if missing:
        raise DataError(f"{where} has no {', '.join(missing)} (has {sorted(record)})")
    context, choices, label = record["context"], record["choices"], record["label"]
    task = record.get("task", "questions")
    if not isinstance(context, str) or not isinstance(task, str):
        raise DataError(f"{where}: context and task must be text")
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        raise DataError(f"{where}: choices must be a list of at least two non-empty texts")
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(choices):
        raise DataError(f"{where}: label {label!r} is not the index of one of its {len(choices)} choices")
    return Question(context, tuple(choices), label, task)


@torch.no_grad()
def evaluate_choices(model, questions: list[Question], tokenizer, *, batch_size: int = 8) -> ChoiceResult:
    """Score `model` (transformers causal LM, MoEProgram or OnnxProgram) on `questions`.

    Choices are batched longest first (up to `batch_size` of them, across questions) and padded on
    the right: causal attention keeps padding out of every scored position."""
    if batch_size < 1:
        raise DataError(f"batch_size must be at least 1, got {batch_size}")
    start = time.perf_counter()
    sequences = tokenize_questions(questions, tokenizer, model)
    device = next(model.parameters()).device if isinstance(model, nn.Module) else torch.device("cpu")
    scores = [0.0] * len(sequences)
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i][0]))  # little padding
    for begin in range(0, len(order), batch_size):
        batch = order[begin : begin + batch_size]
        inputs = torch.zeros(len(batch), len(sequences[batch[0]][0]) - 1, dtype=torch.long)
        for row, i in enumerate(batch):
            ids = sequences[i][0]
            inputs[row, : len(ids) - 1] = torch.tensor(ids[:-1])
        logprobs = F.log_softmax(inference_logits(model, inputs.to(device)).double(), dim=-1).cpu()
        for row, i in enumerate(batch):
            ids, scored = sequences[i]
            targets = torch.tensor(ids[len(ids) - scored :])
            scores[i] = float(
                logprobs[row, len(ids) - 1 - scored : len(ids) - 1].gather(1, targets[:, None]).sum()
            )
        if (begin // batch_size) % 50 == 49:
            logger.info("multiple choice: %d/%d choices scored", begin + len(batch), len(sequences))
    tasks: dict[str, TaskScore] = {}
    chance: dict[str, list[float]] = {}
    loglikelihoods, taken = [], 0
    for q in questions:
        ll = scores[taken : taken + len(q.choices)]
        taken += len(q.choices)
        loglikelihoods.append(ll)
        per_char = [s / len(c) for s, c in zip(ll, q.choices, strict=True)]
        score = tasks.setdefault(q.task, TaskScore())
        score.questions += 1
        score.correct += max(range(len(ll)), key=ll.__getitem__) == q.label  # first of equals, as argmax
        score.correct_norm += max(range(len(per_char)), key=per_char.__getitem__) == q.label
        chance.setdefault(q.task, []).append(1 / len(q.choices))
    seconds = time.perf_counter() - start
    logger.info("multiple choice: %d questions, %d choices (%.1fs)", len(questions), len(sequences), seconds)
    return ChoiceResult(tasks, loglikelihoods, seconds, {t: math.fsum(c) / len(c) for t, c in chance.items()})


def tokenize_questions(questions: list[Question], tokenizer, model) -> list[tuple[list[int], int]]:
    """Per choice, in order: (token ids of the question's context and the choice, how many of the last
    ones are the choice's), fitted to `model`'s positions and checked against its vocabulary. Cheap:
    a command checks the questions with it before hours of compression."""
    encode, eos = encoder(tokenizer)
    prefix = _document_start(tokenizer, encode, eos)
    positions = model_config(model, "max_position_embeddings")
    sequences = [
        _sequence(prefix, encode, q.context, choice, positions, index)
        for index, q in enumerate(questions)
        for choice in q.choices
    ]
    vocab_size = model_config(model, "vocab_size")
    largest = max(max(ids) for ids, _ in sequences)
    if vocab_size is not None and largest >= vocab_size:
        raise DataError(
            f"token id {largest} is outside the model's vocabulary of {vocab_size}: the tokenizer does "
            "not belong to this model"
        )
    return sequences


def _document_start(tokenizer, encode: Callable, eos: int | None) -> list[int]:
    """The BOS (or other leading tokens) the tokenizer adds by default, else the end-of-text token
    documents follow in packed text (and in the bundled models' training)."""
    plain = encode(["a"])[0]
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer: as saved, maybe padding every text
        default = without_padding_or_truncation(tokenizer).encode("a").ids
    else:
        default = tokenizer("a")["input_ids"]
    starts = (i for i in range(len(default) - len(plain) + 1) if default[i : i + len(plain)] == plain)
    start = next(starts, 0)  # where the text's own tokens sit (an EOS may follow them)
    if start:
        return default[:start]
    if eos is None:
        raise DataError(
            "the tokenizer adds no BOS and has no end-of-text token to start a question after; load it "
            "with transformers.AutoTokenizer and set its eos_token"
        )
    return [eos]


def _sequence(
    prefix: list[int], encode: Callable, context: str, choice: str, positions: int | None, index: int
) -> tuple[list[int], int]:
    """(token ids of context + choice, how many of the last ones are the choice's). A space joins
    them unless one side has whitespace there (lm-evaluation-harness's target delimiter); a space
    ending the context moves to the choice, whose first word tokenizers spell with its space; the
    split falls where the context's own tokens end."""
    if context and not context[-1].isspace() and not choice[0].isspace():
        choice = " " + choice
    spaces = len(context) - len(context.rstrip(" "))
    if spaces:
        context, choice = context[: len(context) - spaces], context[len(context) - spaces :] + choice
    context_ids, whole = encode([context, context + choice]) if context else ([], encode([choice])[0])
    shared = 0  # where the two part: the context's end, unless the choice merged into its last token
    while shared < min(len(context_ids), len(whole)) and context_ids[shared] == whole[shared]:
        shared += 1
    scored = len(whole) - shared
    if scored < 1:
        raise DataError(f"question {index + 1}: choice {choice!r} adds no token to the context")
    ids = prefix + whole
    if positions is not None and len(ids) - 1 > positions:
        if scored > positions:
            raise DataError(
                f"question {index + 1}: choice {choice[:40]!r} is {scored} tokens, more than the model's "
                f"{positions} positions"
            )
        ids = ids[len(ids) - 1 - positions :]  # the context's start goes; the choice stays whole
    return ids, scored
