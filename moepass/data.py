"""Calibration and evaluation text: loading, tokenizing, packing, deterministic sampling.

Sources: the bundled corpus splits (`builtin:validation`, `builtin:test`), plain-text files (one
document per file), JSON Lines (`{"text": ..., "source": ...}` per line, optionally gzipped), JSON
files holding an array of such records, a directory of those, or any iterable of such records (a
`datasets.Dataset` works as is). The text field's name is `text` unless `text_key` says otherwise.
Tabular and binary formats (Parquet, Arrow, CSV) are refused rather than read as text.

Packing follows the paper: documents are concatenated with an end-of-sequence token between them,
then cut into equal windows; samples are drawn from the windows with a seeded generator. Windows
never mix sources, so every sample belongs to one domain (per-domain perplexity), except that sources
too short to fill one window alone are packed together under one name.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import zlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from torch import Tensor

from moepass.errors import MoepassError

logger = logging.getLogger(__name__)

BUILTIN_PREFIX = "builtin:"
BUILTIN_SPLITS = ("validation", "test")
JSON_LINES = (".jsonl", ".jsonl.gz")
DIRECTORY_FILES = (".txt", ".md", *JSON_LINES, ".json")  # what a data directory reads
# formats that would tokenize as garbage if read as text: say how to convert them instead
UNREADABLE_SUFFIXES = (".parquet", ".arrow", ".csv", ".tsv", ".gz", ".zip", ".bz2", ".xz", ".zst")
# document separators of the supported families' tokenizers (bundled, Mixtral, Qwen, OLMoE, DeepSeek)
END_OF_TEXT = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class DataError(MoepassError):
    """Calibration or evaluation data that cannot be used as asked."""


@dataclass(frozen=True)
class Document:
    text: str
    source: str


IGNORED_LABEL = -100  # transformers' convention: a position that is not scored


@dataclass(frozen=True)
class TokenSet:
    """Packed token windows: `input_ids[i]` predicts `labels[i]`; `sources[i]` names its domain.
    Integer tensors of any width are stored as int64 (what embeddings and the loss take)."""

    input_ids: Tensor  # [N, seq_len] int64
    labels: Tensor  # [N, seq_len] int64: input shifted by one; IGNORED_LABEL is not scored
    sources: list[str]

    def __post_init__(self) -> None:
        ids, labels = self.input_ids, self.labels
        if (
            not isinstance(ids, Tensor)
            or ids.dim() != 2
            or ids.is_floating_point()
            or ids.dtype == torch.bool
        ):
            raise DataError(
                f"TokenSet.input_ids must be a 2-D integer tensor [windows, seq_len], got {_describe(ids)}"
            )
        if (
            not isinstance(labels, Tensor)
            or labels.shape != ids.shape
            or labels.is_floating_point()
            or labels.dtype == torch.bool
        ):
            raise DataError(
                f"TokenSet.labels must be integers shaped like input_ids ({_describe(ids)}), "
                f"got {_describe(labels)}"
            )
        object.__setattr__(self, "input_ids", ids.long())
        object.__setattr__(self, "labels", labels.long())
        if len(self.sources) != ids.shape[0]:
            raise DataError(f"TokenSet has {ids.shape[0]} windows but {len(self.sources)} source names")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def by_source(self) -> dict[str, list[int]]:
        rows: dict[str, list[int]] = {}
        for i, source in enumerate(self.sources):
            rows.setdefault(source, []).append(i)
        return rows


def _describe(value) -> str:
    return f"{value.dtype} {list(value.shape)}" if isinstance(value, Tensor) else type(value).__name__


def corpus_dir():
    return resources.files("moepass") / "assets" / "corpus"


def check_source(data) -> None:
    """What can be told of a data source without reading it (a built-in's name, an empty or missing
    path, token ids where text belongs): the CLI asks before minutes of loading a model."""
    if isinstance(data, Tensor) or type(data).__module__ == "numpy":
        raise DataError(
            f"data is an array ({data.dtype} {list(data.shape)}), not text: pass text (a path, "
            "'builtin:<split>' or records), or token windows as moepass.data.TokenSet(input_ids, "
            "labels, sources)"
        )
    if isinstance(data, str) and data.startswith(BUILTIN_PREFIX):
        if data.removeprefix(BUILTIN_PREFIX) not in BUILTIN_SPLITS:
            raise DataError(
                f"unknown built-in data {data!r}; built-ins: "
                + ", ".join(BUILTIN_PREFIX + s for s in BUILTIN_SPLITS)
            )
    elif isinstance(data, (str, Path)):
        if not str(data).strip():  # Path("") is the current directory
            raise DataError("the data path is empty; give builtin:validation, a file or a directory")
        if not Path(data).exists():
            where = "" if Path(data).is_absolute() else f" (relative paths are read from {Path.cwd()})"
            raise DataError(f"data path {str(data)!r} does not exist{where}")
        if Path(data).is_file() and Path(data).stat().st_size == 0:
            raise DataError(f"data file {str(data)!r} is empty")


def load_documents(data, *, text_key: str = "text") -> list[Document]:
    """Documents from a `builtin:<split>` name, a file or directory path, or an iterable of records.

    `text_key` names the records' text field in files and iterables (the built-in splits use `text`).
    """
    check_source(data)
    if isinstance(data, str) and data.startswith(BUILTIN_PREFIX):
        with resources.as_file(corpus_dir() / f"{data.removeprefix(BUILTIN_PREFIX)}.jsonl.gz") as path:
            return _from_records(read_jsonl(path), "text", str(path))
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            return _from_directory(path, text_key)
        return _from_file(path, text_key)
    if isinstance(data, Mapping):
        raise DataError("data is one mapping; pass a list of records ({'text': ...} each) or a path")
    if isinstance(data, Iterable):
        return _from_records(data, text_key, type(data).__name__)
    raise DataError(
        f"cannot read data of type {type(data).__name__}: pass a path, 'builtin:<split>' or records"
    )


def _from_file(path: Path, text_key: str) -> list[Document]:
    name = path.name.lower()
    if name.endswith(JSON_LINES):
        return _from_records(read_jsonl(path), text_key, str(path))
    if name.endswith(".json"):
        return _from_records(read_json_array(path), text_key, str(path))
    if name.endswith(UNREADABLE_SUFFIXES):
        raise DataError(
            f"{path}: moepass does not read {path.suffix} files; convert the data to JSON Lines "
            '({"text": ..., "source": ...} per line, .jsonl or .jsonl.gz) or plain text'
        )
    with _readable(path):  # any other file is one plain-text document (.txt, .md, no suffix, ...)
        return [Document(path.read_text(encoding="utf-8-sig"), path.stem)]


def _from_directory(path: Path, text_key: str) -> list[Document]:
    """Every .txt, .md, .jsonl(.gz) and .json file directly in `path`; anything else is named in a warning."""
    files, skipped = [], []
    for entry in sorted(path.iterdir()):
        if entry.is_file() and entry.name.lower().endswith(DIRECTORY_FILES):
            files.append(entry)
        else:
            skipped.append(entry.name + ("/" if entry.is_dir() else ""))
    if not files:
        raise DataError(f"directory {str(path)!r} holds no {', '.join(DIRECTORY_FILES)} files")
    if skipped:
        logger.warning(
            "data directory %s: read %d file(s), skipped %d other entr%s (subfolders are not read): %s",
            path,
            len(files),
            len(skipped),
            "y" if len(skipped) == 1 else "ies",
            ", ".join(skipped[:8]) + (", ..." if len(skipped) > 8 else ""),
        )
    return [doc for f in files for doc in _from_file(f, text_key)]


def read_json_array(path: Path) -> list:
    with _readable(path):
        text = path.read_text(encoding="utf-8-sig")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        hint = " (JSON Lines? name the file .jsonl)" if "Extra data" in error.msg else ""
        raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg}){hint}") from None
    if not isinstance(records, list):
        raise DataError(
            f"{path}: holds a JSON {type(records).__name__}; moepass reads a JSON array of records "
            '([{"text": ...}, ...]) or JSON Lines (.jsonl)'
        )
    return records


def read_jsonl(path: Path) -> Iterable[dict]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with _readable(path), opener(path, "rt", encoding="utf-8-sig") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as error:
                    raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from None


@contextlib.contextmanager
def _readable(path: Path) -> Iterator[None]:
    try:
        yield
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.object[error.start]:#04x})") from None
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{path}: unreadable ({type(error).__name__}: {error})") from None


def _from_records(records: Iterable, text_key: str, where: str) -> list[Document]:
    docs = []
    for i, record in enumerate(records, 1):  # counted from 1, like the JSON Lines errors' line numbers
        if isinstance(record, Document):
            docs.append(record)
            continue
        if isinstance(record, str):
            docs.append(Document(record, "text"))
            continue
        if not isinstance(record, dict) or text_key not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(
                f"{where}: record {i} has no {text_key!r} field (has {keys}); name the text field "
                "with text_key (moepass --text-key, a recipe's calibration.text_key)"
            )
        text, source = record[text_key], record.get("source") or "text"
        if not isinstance(text, str):
            raise DataError(f"{where}: record {i}'s {text_key!r} is a {type(text).__name__}, not a string")
        try:  # JSON can spell a lone surrogate ("\ud800"), which no tokenizer reads
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            raise DataError(
                f"{where}: record {i}'s {text_key!r} is not valid Unicode at character {error.start} "
                f"({error.reason}); fix or drop the record"
            ) from None
        docs.append(Document(text, str(source)))
    return docs


def tokenize(docs: Sequence[Document], tokenizer, seq_len: int) -> TokenSet:
    """Pack each source's documents (EOS-separated) into windows of `seq_len` tokens."""
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len < 2:
        raise DataError(f"seq_len must be an integer of at least 2, got {seq_len!r}")
    if not docs or not any(d.text.strip() for d in docs):
        raise DataError("the data holds no text")
    encode, eos = encoder(tokenizer)
    eos = _separator(eos)
    inputs, labels, sources = [], [], []
    streams: dict[str, list[int]] = {}
    for doc, ids in zip(docs, encode([d.text for d in docs]), strict=True):
        streams.setdefault(doc.source, []).extend([*ids, eos])
    _pool_short_sources(streams, seq_len)
    short = []
    for source, ids in streams.items():
        windows = (len(ids) - 1) // seq_len
        if windows == 0:
            short.append(source)
            continue
        stream = torch.tensor(ids[: windows * seq_len + 1])
        inputs.append(stream[:-1].view(windows, seq_len))
        labels.append(stream[1:].view(windows, seq_len))
        sources += [source] * windows
    if short and sources:
        logger.warning(
            "left out %d source(s) shorter than one window of %d tokens: %s",
            len(short),
            seq_len,
            ", ".join(short[:10]),
        )
    if not sources:
        longest = max(len(ids) for ids in streams.values())
        raise DataError(
            f"the data is too short: its longest source has {longest} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; use a shorter seq_len or more text"
        )
    return TokenSet(torch.cat(inputs), torch.cat(labels), sources)


def _pool_short_sources(streams: dict[str, list[int]], seq_len: int) -> None:
    """Sources too short for one window alone (a directory of short plain-text files, one source
    each) are packed together under one name rather than left out or refused."""
    short = [source for source, ids in streams.items() if len(ids) <= seq_len]
    if len(short) < 2:
        return
    name = f"{len(short)} short sources"
    pooled = [token for source in short for token in streams.pop(source)]
    streams.setdefault(name, []).extend(pooled)
    logger.warning(
        "packed %d sources shorter than one window of %d tokens together as source %r: %s",
        len(short),
        seq_len,
        name,
        ", ".join(short[:10]) + (", ..." if len(short) > 10 else ""),
    )


def sample(tokens: TokenSet, n: int | None, *, seed: int = 0, per_source: bool = False) -> TokenSet:
    """`n` windows drawn without replacement with a seeded generator (all of them if n is None).

    With `per_source`, up to `n` windows from each source (the evaluation default); the order of the
    chosen windows is kept, so the same seed always gives the same set.
    """
    if n is not None and n < 1:
        raise DataError(f"the number of samples must be positive, got {n}")
    generator = torch.Generator().manual_seed(seed)
    groups = tokens.by_source() if per_source else {"all": list(range(len(tokens)))}
    chosen: list[int] = []
    for rows in groups.values():
        if n is None or n >= len(rows):
            chosen += rows
        else:
            picks = torch.randperm(len(rows), generator=generator)[:n].sort().values
            chosen += [rows[i] for i in picks]
    if not per_source and n is not None and n > len(tokens):
        raise DataError(
            f"asked for {n} samples of {tokens.seq_len} tokens but the data holds only "
            f"{len(tokens)}; use fewer samples, a shorter seq_len or more text"
        )
    index = torch.tensor(sorted(chosen))
    return TokenSet(tokens.input_ids[index], tokens.labels[index], [tokens.sources[i] for i in index])


DEFAULT_SEQ_LEN = 256  # tokens per calibration or evaluation window, unless the model has fewer positions


def window_length(seq_len: int | None, max_positions: int | None) -> int:
    """`seq_len`, or by default DEFAULT_SEQ_LEN tokens — fewer for a model with fewer positions."""
    if seq_len is not None:
        return seq_len
    return min(DEFAULT_SEQ_LEN, max_positions or DEFAULT_SEQ_LEN)


def calibration_set(
    data,
    tokenizer,
    *,
    samples: int = 128,
    seq_len: int = 256,
    seed: int = 0,
    vocab_size: int | None = None,
    text_key: str = "text",
) -> TokenSet:
    """The paper's calibration set: `samples` random packed windows of `seq_len` tokens."""
    tokens = tokenize(load_documents(data, text_key=text_key), tokenizer, seq_len)
    check_fits(tokens, vocab_size)
    return sample(tokens, samples, seed=seed)


def evaluation_set(
    data,
    tokenizer,
    *,
    seq_len: int = 256,
    max_per_source: int | None = 64,
    seed: int = 0,
    vocab_size: int | None = None,
    text_key: str = "text",
) -> TokenSet:
    """Held-out windows, at most `max_per_source` from each domain."""
    tokens = tokenize(load_documents(data, text_key=text_key), tokenizer, seq_len)
    check_fits(tokens, vocab_size)
    return sample(tokens, max_per_source, seed=seed, per_source=True)


def check_fits(tokens: TokenSet, vocab_size: int | None, max_positions: int | None = None) -> None:
    """Token ids beyond the model's vocabulary mean the tokenizer belongs to another model; windows
    longer than its position range run, but score positions it was never trained on."""
    if not len(tokens):
        raise DataError("the data holds no windows")
    if int(tokens.input_ids.min()) < 0:
        raise DataError(f"token id {int(tokens.input_ids.min())} is negative")
    if vocab_size is not None and int(tokens.input_ids.max()) >= vocab_size:
        raise DataError(
            f"token id {int(tokens.input_ids.max())} is outside the model's vocabulary of "
            f"{vocab_size}: the tokenizer does not belong to this model"
        )
    scored = tokens.labels[tokens.labels != IGNORED_LABEL]
    if not scored.numel():
        raise DataError(f"every label is {IGNORED_LABEL} (not scored): the data has nothing to predict")
    low, high = int(scored.min()), int(scored.max())
    if low < 0 or (vocab_size is not None and high >= vocab_size):
        bad = low if low < 0 else high
        vocabulary = "" if vocab_size is None else f" of the model's vocabulary of {vocab_size}"
        raise DataError(
            f"label {bad} is not a token id{vocabulary}; labels are token ids, or {IGNORED_LABEL} for "
            "positions not scored"
        )
    if max_positions is not None and tokens.seq_len > max_positions:
        raise DataError(
            f"windows of {tokens.seq_len} tokens exceed the model's {max_positions} positions "
            "(max_position_embeddings); use a shorter seq_len"
        )


def encoder(tokenizer):
    """(encode texts -> id lists without special tokens, end-of-text id or None) for a
    `tokenizers.Tokenizer` or a transformers one."""
    if hasattr(tokenizer, "encode_batch"):  # tokenizers.Tokenizer: no eos attribute, look it up
        eos = end_of_text_id(tokenizer)
        plain = without_padding_or_truncation(tokenizer)
        # no special tokens, as on the transformers path: a BOS-adding post-processor would put a
        # BOS inside every packed window
        encode = lambda texts: [e.ids for e in plain.encode_batch(texts, add_special_tokens=False)]  # noqa: E731
        return encode, eos
    if callable(tokenizer) and hasattr(tokenizer, "eos_token_id"):  # transformers tokenizer
        encode = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
        return encode, tokenizer.eos_token_id
    raise DataError(
        f"unsupported tokenizer type {type(tokenizer).__name__}: pass a tokenizers.Tokenizer "
        f"or a transformers tokenizer"
    )


def end_of_text_id(tokenizer) -> int | None:
    """The id of the first `END_OF_TEXT` token a `tokenizers.Tokenizer` holds (it names no EOS itself)."""
    ids = (tokenizer.token_to_id(token) for token in END_OF_TEXT)
    return next((i for i in ids if i is not None), None)


def without_padding_or_truncation(tokenizer):
    """A tokenizer.json saved after padding or truncation was enabled keeps them: every document would
    be cut at that length and pad tokens packed in and scored. A copy without them (transformers turns
    both off per call); the user's tokenizer is left as it is."""
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    plain = type(tokenizer).from_str(tokenizer.to_str())
    plain.no_padding()
    plain.no_truncation()
    return plain


def _separator(eos: int | None) -> int:
    """Documents are packed with end-of-text between them; guessing one (id 0) would insert a word."""
    if eos is None:
        raise DataError(
            "the tokenizer has no end-of-text token to put between documents (looked for "
            f"{', '.join(END_OF_TEXT)}); load it with transformers.AutoTokenizer and set its eos_token"
        )
    return eos
