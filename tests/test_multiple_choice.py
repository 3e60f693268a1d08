"""Multiple-choice accuracy against transformers scoring each choice alone in float64, padding-free;
the bundled trained model above chance; question files checked record by record."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from helpers import captured
from moepass import evaluate_choices, load_questions
from moepass.cli import main
from moepass.data import DataError, load_documents
from moepass.multiple_choice import Question, tokenize_questions
from moepass.zoo import load_model, load_tokenizer

WORDS = [f"w{i}" for i in range(100)]


def _word_tokenizer() -> Tokenizer:
    """One token per word (ids 3..102 inside the random models' 128), "<eos>" = 2 as their configs say:
    a choice's tokens are its words, so the reference needs no tokenizer logic of its own."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2, **{w: 3 + i for i, w in enumerate(WORDS)}, "<unk>": 103}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return tokenizer


def _questions(rng: random.Random, count: int) -> list[Question]:
    words = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    questions = []
    for i in range(count):
        choices = tuple(words(rng.randint(1, 6)) for _ in range(rng.randint(2, 5)))
        context = words(rng.randint(0, 9)) + rng.choice(["", " "])  # empty contexts too
        questions.append(Question(context, choices, rng.randrange(len(choices)), f"task{i % 2}"))
    return questions


def _reference(model, question: Question) -> list[float]:
    """Each choice alone through transformers: summed log-probabilities of its words after "<eos>"
    and the context's words (a space between the two, whether the context ends with one or not)."""
    vocab = {w: 3 + i for i, w in enumerate(WORDS)}
    context = [2] + [vocab[w] for w in question.context.split()]
    scores = []
    for choice in question.choices:
        continuation = [vocab[w] for w in choice.split()]
        ids = torch.tensor([context + continuation])
        with torch.no_grad():  # float32 weights (transformers' grouped experts refuse float64), float64 sums
            logprobs = torch.log_softmax(model(ids[:, :-1]).logits[0].double(), dim=-1)
        rows = logprobs[len(context) - 1 :]
        scores.append(float(rows.gather(1, torch.tensor(continuation)[:, None]).sum()))
    return scores


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss"])  # shared experts; sliding window and sinks
def test_choice_scores_equal_transformers_scoring_each_choice_alone(family, seed):
    model, program = captured(family)
    questions = _questions(random.Random(seed), 9)
    expected = [_reference(model, q) for q in questions]
    tokenizer = _word_tokenizer()
    for subject in (model, program):  # batches of 5 choices: across questions, padded on the right
        result = evaluate_choices(subject, questions, tokenizer, batch_size=5)
        for got, want in zip(result.loglikelihoods, expected, strict=True):
            assert got == pytest.approx(want, abs=2e-4)
        # counted from the scores just checked: two choices within 2e-4 may rank either way
        for task in ("task0", "task1"):
            asked = [(q, e) for q, e in zip(questions, result.loglikelihoods, strict=True) if q.task == task]
            correct = sum(max(range(len(e)), key=e.__getitem__) == q.label for q, e in asked)
            per_char = [[s / len(c) for s, c in zip(e, q.choices, strict=True)] for q, e in asked]
            correct_norm = sum(
                max(range(len(n)), key=n.__getitem__) == q.label
                for (q, _), n in zip(asked, per_char, strict=True)
            )
            score = result.tasks[task]
            assert (score.questions, score.correct, score.correct_norm) == (len(asked), correct, correct_norm)
    chance = sum(1 / len(q.choices) for q in questions) / len(questions)
    assert result.to_dict()["tasks"]["overall"]["chance"] == pytest.approx(chance)


def test_a_long_context_loses_its_start_and_a_choice_never_does(seed):
    model, program = captured("mixtral", max_position_embeddings=16)
    rng = random.Random(seed)
    context = " ".join(rng.choice(WORDS) for _ in range(30))
    question = Question(context, ("w1 w2", "w3"), 0)
    result = evaluate_choices(program, [question], _word_tokenizer())
    kept = Question(" ".join(context.split()[-14:]), question.choices, 0)  # 16 inputs: 1 of "w1 w2" is input
    vocab = {w: 3 + i for i, w in enumerate(WORDS)}
    for choice, got in zip(question.choices, result.loglikelihoods[0], strict=True):
        ids = [vocab[w] for w in f"{context} {choice}".split()][-17:]
        with torch.no_grad():
            logprobs = torch.log_softmax(model(torch.tensor([ids[:-1]])).logits[0].double(), dim=-1)
        words = len(choice.split())
        want = sum(float(logprobs[-words + k, ids[-words + k]]) for k in range(words))
        assert got == pytest.approx(want, abs=2e-4), kept
    with pytest.raises(DataError, match="is 17 tokens, more than the model's 16 positions"):
        evaluate_choices(program, [Question("w1", (" ".join(["w2"] * 17), "w3"), 0)], _word_tokenizer())


@pytest.mark.parametrize(
    "template,start",
    [(None, [2]), ("<bos> $A", [1]), ("<bos> $A <eos>", [1]), ("$A <eos>", [2]), ("padded", [1])],
)
def test_a_question_starts_after_the_bos_the_tokenizer_adds_else_after_end_of_text(template, start):
    """As the model saw documents start: after its BOS where the tokenizer adds one (whatever it adds
    after the text), else after the end-of-text token that separates packed documents."""
    model, _ = captured("mixtral")
    tokenizer = _word_tokenizer()
    if template == "padded":  # a tokenizer.json saved with padding on: every text padded to 8 tokens
        tokenizer.enable_padding(direction="left", pad_id=0, pad_token="<pad>", length=8)
        template = "<bos> $A"
    if template is not None:
        specials = [("<bos>", 1), ("<eos>", 2)]
        tokenizer.post_processor = processors.TemplateProcessing(single=template, special_tokens=specials)
    (ids, scored), _ = tokenize_questions([Question("w5 w6", ("w7", "w8 w9"), 0)], tokenizer, model)
    assert ids == [*start, 8, 9, 10] and scored == 1  # no special token after the choice either


def test_a_tokenizer_with_no_document_start_is_refused():
    model, _ = captured("mixtral")
    vocab = {w: i for i, w in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    with pytest.raises(DataError, match="adds no BOS and has no end-of-text token"):
        tokenize_questions([Question("w5", ("w7", "w8"), 0)], tokenizer, model)


def test_the_trained_model_picks_true_continuations_well_above_chance():
    """builtin:continuations: held-out text cut after 24 words, its next 6 words against 6 words of
    three other documents of its domain. A model that learned the text prefers the true ones; the same
    model with its weights shuffled cannot."""
    questions = load_questions("builtin:continuations", max_per_task=16)
    assert len(questions) == 48 and {q.task for q in questions} == {"austen", "bible", "python-docs"}
    texts = [" ".join(d.text.split()) for d in load_documents("builtin:test")]
    for q in questions:
        assert len(q.context.split()) == 24 and all(len(c.split()) == 6 for c in q.choices)
        assert any(t.startswith(f"{q.context} {q.choices[q.label]}") for t in texts)  # the label is right
    tokenizer = load_tokenizer("builtin:tiny-mixtral")
    model = load_model("builtin:tiny-mixtral")
    trained = evaluate_choices(model, questions, tokenizer).overall
    assert trained.accuracy_norm >= 0.4  # chance: 0.25
    with torch.no_grad():
        for parameter in model.model.layers.parameters():
            parameter.copy_(parameter.flatten()[torch.randperm(parameter.numel())].view_as(parameter))
    assert evaluate_choices(model, questions, tokenizer).overall.accuracy_norm < trained.accuracy_norm - 0.1


@pytest.mark.parametrize(
    "record,message",
    [
        ({"context": "a", "choices": ["b", "c"]}, "record 2 has no label"),
        (
            {"context": "a", "choices": ["b", "c"], "label": 2},
            "label 2 is not the index of one of its 2 choices",
        ),
        ({"context": "a", "choices": ["b", "c"], "label": True}, "label True is not the index"),
        ({"context": "a", "choices": ["b"], "label": 0}, "choices must be a list of at least two non-empty"),
        ({"context": "a", "choices": "bc", "label": 0}, "choices must be a list of at least two non-empty"),
        (
            {"context": "a", "choices": ["b", ""], "label": 0},
            "choices must be a list of at least two non-empty",
        ),
        ({"context": 3, "choices": ["b", "c"], "label": 0}, "context and task must be text"),
        (["a", "b"], "record 2 is a list, not a record with context, choices, label"),
    ],
)
def test_a_bad_question_is_named_by_file_and_record(record, message, tmp_path):
    path = tmp_path / "questions.jsonl"
    good = {"context": "a", "choices": ["b", "c"], "label": 1}
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataError, match=f"{path}: .*{message}"):
        load_questions(path)


def test_question_files_and_the_command_line(tmp_path, capsys):
    records = [
        {"context": f"w{i}", "choices": ["w1", "w2 w3"], "label": i % 2, "task": "t"} for i in range(9)
    ]
    (tmp_path / "q.json").write_text(json.dumps(records))
    assert load_questions(tmp_path / "q.json") == load_questions_from(records)
    picked = load_questions(tmp_path / "q.json", max_per_task=4, seed=3)
    assert len(picked) == 4 and picked == load_questions(tmp_path / "q.json", max_per_task=4, seed=3)
    assert [int(q.context[1:]) for q in picked] == sorted(int(q.context[1:]) for q in picked)  # file order
    for name, text, message in [
        ("q.csv", "x", "questions are read from .jsonl"),
        ("e.jsonl", "", "holds no"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(DataError, match=message):
            load_questions(tmp_path / name)

    lines = [json.dumps({"context": "It was a", "choices": [" dark night", " the"], "label": 0})] * 3
    (tmp_path / "q.jsonl").write_text("\n".join(lines) + "\n")
    argv = [
        "eval",
        "builtin:tiny-mixtral",
        "--choices",
        str(tmp_path / "q.jsonl"),
        "--json",
        str(tmp_path / "r"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "task       questions" in out and "acc_norm" in out and "chance" in out
    written = json.loads((tmp_path / "r").read_text())
    assert written["format"] == "moepass-eval" and written["tasks"]["questions"]["questions"] == 3
    assert (
        len(written["loglikelihoods"]) == 3 and written["loglikelihoods"][0] == written["loglikelihoods"][2]
    )
    assert main([*argv[:4], "--data", "builtin:test"]) == 2
    assert "--choices scores questions, --data and --seq-len text windows" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"context": "a"}\n')
    assert main(["eval", "builtin:tiny-mixtral", "--choices", str(tmp_path / "bad.jsonl")]) == 2
    assert "--choices: " in capsys.readouterr().err


def load_questions_from(records: list[dict]) -> list[Question]:
    return [Question(r["context"], tuple(r["choices"]), r["label"], r["task"]) for r in records]
