"""The data API: sources, packing, deterministic sampling, and its errors."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from moepass.data import (
    DataError,
    Document,
    TokenSet,
    calibration_set,
    check_source,
    corpus_dir,
    evaluation_set,
    load_documents,
    sample,
    tokenize,
)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(corpus_dir() / "tokenizer.json"))


def test_builtin_splits_hold_every_source():
    for split in ("validation", "test"):
        docs = load_documents(f"builtin:{split}")
        assert {d.source for d in docs} == {"python-docs", "bible", "austen"}
        assert all(len(d.text) > 100 for d in docs)
    validation = {d.text for d in load_documents("builtin:validation")}
    assert not validation & {d.text for d in load_documents("builtin:test")}, "text leaks between splits"


def test_file_formats(tmp_path):
    (tmp_path / "a.txt").write_text("plain text document", encoding="utf-8")
    records = [{"text": "first", "source": "s1"}, {"text": "second"}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    with gzip.open(tmp_path / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"body": "zipped", "source": "z"}) + "\n")
    assert load_documents(tmp_path / "a.txt") == [Document("plain text document", "a")]
    assert load_documents(tmp_path / "b.jsonl") == [Document("first", "s1"), Document("second", "text")]
    assert load_documents(tmp_path / "c.jsonl.gz", text_key="body") == [Document("zipped", "z")]
    with pytest.raises(
        DataError, match=r"c\.jsonl\.gz: record 1 has no 'text' field \(has \['body', 'source'\]\)"
    ):
        load_documents(tmp_path)  # a directory reads every data file; c.jsonl.gz uses "body"
    (tmp_path / "c.jsonl.gz").unlink()
    assert [d.text for d in load_documents(tmp_path)] == ["plain text document", "first", "second"]


def test_records_and_dataset_like_objects():
    class Rows:  # what a datasets.Dataset looks like to us: an iterable of dicts
        def __iter__(self):
            return iter([{"text": "one", "source": "x"}, {"text": "two", "source": "y"}])

    assert [d.source for d in load_documents(Rows())] == ["x", "y"]
    assert load_documents(["just strings"]) == [Document("just strings", "text")]


def test_packing_concatenates_with_eos_then_chunks(tokenizer):
    docs = [Document("The quick brown fox jumps over the lazy dog. " * 8, "a"), Document("Short one.", "a")]
    tokens = tokenize(docs, tokenizer, seq_len=16)
    eos = tokenizer.token_to_id("<eos>")
    stream = [*tokenizer.encode(docs[0].text).ids, eos, *tokenizer.encode(docs[1].text).ids, eos]
    windows = (len(stream) - 1) // 16
    assert tokens.input_ids.shape == (windows, 16)
    assert tokens.input_ids.flatten().tolist() == stream[: windows * 16]
    assert tokens.labels.flatten().tolist() == stream[1 : windows * 16 + 1]


def test_windows_never_mix_sources(tokenizer):
    docs = [Document("alpha " * 200, "a"), Document("beta " * 200, "b")]
    tokens = tokenize(docs, tokenizer, seq_len=32)
    alpha = set(tokenizer.encode("alpha alpha").ids)
    for row, source in zip(tokens.input_ids, tokens.sources, strict=True):
        assert (set(row.tolist()) <= alpha | {tokenizer.token_to_id("<eos>")}) == (source == "a")


def test_sampling_is_deterministic_and_seeded(tokenizer):
    calib = calibration_set("builtin:validation", tokenizer, samples=32, seq_len=64, seed=3)
    again = calibration_set("builtin:validation", tokenizer, samples=32, seq_len=64, seed=3)
    other = calibration_set("builtin:validation", tokenizer, samples=32, seq_len=64, seed=4)
    assert torch.equal(calib.input_ids, again.input_ids) and len(calib) == 32
    assert not torch.equal(calib.input_ids, other.input_ids)
    evaluation = evaluation_set("builtin:test", tokenizer, seq_len=64, max_per_source=5)
    assert sorted(evaluation.by_source()) == ["austen", "bible", "python-docs"]
    assert all(len(rows) == 5 for rows in evaluation.by_source().values())


@pytest.mark.parametrize(
    "call,message",
    [
        (lambda tok: load_documents("builtin:train"), "unknown built-in data 'builtin:train'"),
        (lambda tok: load_documents("/no/such/file.txt"), "'/no/such/file.txt' does not exist$"),
        (lambda tok: load_documents("no/such.txt"), r"does not exist \(relative paths are read from /"),
        (lambda tok: load_documents(""), "the data path is empty"),  # not the current directory
        (lambda tok: tokenize([Document("   ", "a")], tok, 8), "holds no text"),
        (lambda tok: tokenize([Document("two words", "a")], tok, 64), "too short"),
        (
            lambda tok: tokenize([Document("text", "a")], tok, 1),
            "seq_len must be an integer of at least 2, got 1",
        ),
        (
            lambda tok: tokenize([Document("text", "a")], tok, 8.5),
            "seq_len must be an integer of at least 2, got 8.5",
        ),
        (lambda tok: calibration_set("builtin:validation", tok, samples=10**6, seq_len=256), "holds only"),
        (lambda tok: calibration_set("builtin:validation", tok, samples=0), "must be positive"),
        (lambda tok: evaluation_set("builtin:test", tok, vocab_size=128), "tokenizer does not belong"),
        (lambda tok: tokenize([Document("text", "a")], object(), 8), "unsupported tokenizer type object"),
        (lambda tok: load_documents(42), "cannot read data of type int"),
        (lambda tok: load_documents(np.zeros((2, 3))), r"data is an array \(float64 \[2, 3\]\), not text"),
        (lambda tok: load_documents({"text": "hello"}), "data is one mapping; pass a list of records"),
        (lambda tok: load_documents([{"text": None}]), "record 1's 'text' is a NoneType, not a string"),
        (lambda tok: load_documents([{"body": "x"}]), r"has no 'text' field \(has \['body'\]\)"),
        (
            lambda tok: load_documents([{"text": "a \ud800 b"}]),
            r"record 1's 'text' is not valid Unicode at character 2",
        ),
        (lambda tok: TokenSet(torch.ones(2, 4), torch.ones(2, 4), ["a"] * 2), "2-D integer tensor"),
        (
            lambda tok: TokenSet(
                torch.ones(3, 4, dtype=torch.long), torch.ones(3, 2, dtype=torch.long), ["a"] * 3
            ),
            r"labels must be integers shaped like input_ids \(torch.int64 \[3, 4\]\), got torch.int64 \[3, 2",
        ),
        (
            lambda tok: TokenSet(
                torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long), ["a"]
            ),
            "3 windows but 1 source",
        ),
    ],
)
def test_bad_data_errors(tokenizer, call, message):
    with pytest.raises(DataError, match=message):
        call(tokenizer)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9 " * 10)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "caf\xe9"}\n')
    (tmp_path / "plain.jsonl.gz").write_text('{"text": "not gzipped"}\n')
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 100)[:40])
    for name, message in [
        ("latin1.txt", r"latin1\.txt: not UTF-8 text \(byte 0xe9\)"),
        ("latin1.jsonl", r"latin1\.jsonl: not UTF-8 text"),
        ("plain.jsonl.gz", r"plain\.jsonl\.gz: unreadable \(BadGzipFile"),
        ("cut.jsonl.gz", r"cut\.jsonl\.gz: unreadable \(EOFError"),
    ]:
        with pytest.raises(DataError, match=message):
            load_documents(tmp_path / name)


def test_documents_are_separated_by_the_tokenizers_end_of_text_never_a_guess():
    from tokenizers import models, pre_tokenizers

    vocab = {"!": 0, "<|endoftext|>": 1, "hello": 2, "world": 3, "[UNK]": 4}
    qwen_like = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    qwen_like.pre_tokenizer = pre_tokenizers.Whitespace()  # id 0 is a word, as "!" is in Qwen's vocabulary
    docs = [Document("hello world", "a"), Document("world hello", "a")]
    assert tokenize(docs, qwen_like, 5).input_ids.tolist() == [[2, 3, 1, 3, 2]]
    no_end = Tokenizer(models.WordLevel({k: v for k, v in vocab.items() if v != 1}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="no end-of-text token to put between documents"):
        tokenize(docs, no_end, 5)


def test_an_end_of_text_token_only_tokenizer_config_names_separates_documents(tmp_path):
    """A checkpoint whose EOS is a token of its own (not one of END_OF_TEXT) names it in
    tokenizer_config.json: loading the directory reads it there, so packing does not fail."""
    from tokenizers import models, pre_tokenizers

    from moepass.zoo import load_tokenizer

    vocab = {"[UNK]": 0, "hello": 1, "world": 2, "[e~[": 3}
    own_eos = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    own_eos.pre_tokenizer = pre_tokenizers.Whitespace()
    own_eos.save(str(tmp_path / "tokenizer.json"))
    docs = [Document("hello world", "a"), Document("world hello", "a")]
    with pytest.raises(DataError, match="no end-of-text token"):  # the file alone names no EOS
        tokenize(docs, load_tokenizer(tmp_path), 5)
    config = {"eos_token": "[e~[", "tokenizer_class": "PreTrainedTokenizerFast"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert tokenize(docs, load_tokenizer(tmp_path), 5).input_ids.tolist() == [[1, 2, 3, 2, 1]]


def test_settings_saved_in_a_tokenizer_file_do_not_change_the_tokens(tokenizer):
    """A tokenizer.json saved with padding, truncation and a BOS-adding post-processor (as after a
    transformers call with padding=True, or Llama-style files) packs the same tokens as the plain one
    and as the transformers path (no special tokens), and is left as it was."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    docs = [Document("The quick brown fox jumps over the lazy dog. " * 6, "a"), Document("Short one.", "a")]
    expected = tokenize(docs, tokenizer, 16).input_ids
    configured = Tokenizer.from_str(tokenizer.to_str())
    configured.enable_padding(pad_id=0, length=64)
    configured.enable_truncation(max_length=8)
    configured.post_processor = processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", 1)]
    )
    assert torch.equal(tokenize(docs, configured, 16).input_ids, expected)
    assert configured.padding is not None and configured.truncation is not None  # not modified
    transformers_tokenizer = PreTrainedTokenizerFast(tokenizer_object=configured, eos_token="<eos>")
    assert torch.equal(tokenize(docs, transformers_tokenizer, 16).input_ids, expected)


def test_sources_shorter_than_a_window_are_reported(tokenizer, caplog):
    docs = [Document("a long text " * 40, "long"), Document("short", "brief")]
    tokens = tokenize(docs, tokenizer, 16)
    assert set(tokens.sources) == {"long"} and "left out 1 source(s) shorter than one window" in caplog.text
    assert "brief" in caplog.text


def test_a_directory_of_short_files_is_packed_together(tmp_path, tokenizer, caplog):
    """Each plain-text file is a source; files too short for a window alone share windows, in order,
    with the end-of-text token between them, rather than being left out."""
    texts = [f"note {i}: the quick brown fox jumps" for i in range(12)]
    for i, text in enumerate(texts):
        (tmp_path / f"note{i:02d}.txt").write_text(text, encoding="utf-8")
    (tmp_path / "long.txt").write_text("a long text " * 40, encoding="utf-8")
    tokens = tokenize(load_documents(tmp_path), tokenizer, 16)
    eos = tokenizer.token_to_id("<eos>")
    expected = [t for text in texts for t in (*tokenizer.encode(text).ids, eos)]
    pooled = [i for i, source in enumerate(tokens.sources) if source == "12 short sources"]
    assert len(pooled) == (len(expected) - 1) // 16 and set(tokens.sources) == {"long", "12 short sources"}
    assert tokens.input_ids[pooled].flatten().tolist() == expected[: len(pooled) * 16]
    assert "packed 12 sources shorter than one window of 16 tokens together" in caplog.text


def test_a_byte_order_mark_is_not_text(tmp_path):
    (tmp_path / "bom.txt").write_bytes("\ufeffHello".encode())
    (tmp_path / "bom.jsonl").write_bytes('\ufeff{"text": "Hello"}\n'.encode())
    assert [d.text for d in load_documents(tmp_path)] == ["Hello", "Hello"]


def test_invalid_jsonl_line_is_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_documents(tmp_path / "bad.jsonl")


def test_sample_none_keeps_everything(tokenizer):
    tokens = tokenize(load_documents("builtin:validation")[:20], tokenizer, 64)
    assert torch.equal(sample(tokens, None).input_ids, tokens.input_ids)


def test_json_arrays_other_text_files_and_refused_formats(tmp_path, caplog):
    (tmp_path / "rows.json").write_text(json.dumps([{"body": "from json", "source": "j"}, "a string"]))
    (tmp_path / "notes.md").write_text("# markdown is text", encoding="utf-8")
    assert load_documents(tmp_path / "rows.json", text_key="body") == [
        Document("from json", "j"),
        Document("a string", "text"),
    ]
    assert load_documents(tmp_path / "notes.md") == [Document("# markdown is text", "notes")]
    (tmp_path / "object.json").write_text(json.dumps({"data": [{"text": "x"}]}))
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    (tmp_path / "table.parquet").write_bytes(b"PAR1\x00\x00PAR1")
    (tmp_path / "rows.CSV").write_text("text\nhello\n")
    for name, message in [
        ("object.json", r"object\.json: holds a JSON dict; moepass reads a JSON array of records"),
        ("lines.json", r"lines\.json:2: not valid JSON \(Extra data\) \(JSON Lines\? name the file \.jsonl"),
        ("table.parquet", r"table\.parquet: moepass does not read \.parquet files; convert the data to JSON"),
        ("rows.CSV", r"rows\.CSV: moepass does not read \.CSV files"),
    ]:
        with pytest.raises(DataError, match=message):
            load_documents(tmp_path / name)
    # a directory reads .txt/.md/.jsonl(.gz)/.json files and names what it leaves out
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"text": "one"}]))
    (folder / "b.txt").write_text("two")
    (folder / "c.md").write_text("three")
    (folder / "d.html").write_text("not read")
    (folder / "nested").mkdir()
    with caplog.at_level("WARNING", logger="moepass"):
        assert [d.text for d in load_documents(folder)] == ["one", "two", "three"]
    assert "read 3 file(s), skipped 2 other entries (subfolders are not read): d.html, nested/" in caplog.text


def test_text_key_reaches_calibration_and_evaluation_sets(tmp_path, tokenizer):
    texts = [f"Sentence number {i} of a long document about nothing." for i in range(60)]
    path = tmp_path / "body.jsonl"
    path.write_text("\n".join(json.dumps({"body": text}) for text in texts))
    packed = tokenize([Document(text, "text") for text in texts], tokenizer, 32)
    calib = calibration_set(path, tokenizer, samples=4, seq_len=32, text_key="body")
    assert torch.equal(calib.input_ids, sample(packed, 4).input_ids)
    held_out = evaluation_set(path, tokenizer, seq_len=32, max_per_source=3, text_key="body")
    assert torch.equal(held_out.input_ids, sample(packed, 3, per_source=True).input_ids)
    with pytest.raises(DataError, match=r"has no 'text' field .* name the text field with text_key"):
        calibration_set(path, tokenizer, samples=4, seq_len=32)


def test_an_empty_data_file_is_named_before_any_work(tmp_path):
    empty = tmp_path / "notes.txt"
    empty.touch()
    with pytest.raises(DataError, match=r"data file '.*notes\.txt' is empty"):
        check_source(empty)  # what the CLI asks before loading a model
