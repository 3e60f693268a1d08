"""Quality vs size of every compression setting on the bundled models, one panel per model, from the
tables `tools/quality_slimming.py` and `tools/quality_trimming.py` write (both call this at the end).

    python tools/plot_quality.py    # RESULTS-slimming.md, RESULTS-trimming.md -> RESULTS-quality-vs-size.png

Rows with a random choice, and repeats of a setting that land on the same point (iterative scoring,
consecutive blocks, pruned propagation), are left out; settings a model cannot take ("n/a") too.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from moepass.plots import quality_vs_size

SLIMMING, TRIMMING = Path("RESULTS-slimming.md"), Path("RESULTS-trimming.md")
RESULTS = [SLIMMING, TRIMMING]
OUT = Path("RESULTS-quality-vs-size.png")
REPEATS = ("random", "iterative", "consecutive", "pruned propagation", "(count)")
KINDS = [  # (kind, whether a setting's label names it); the first match wins
    ("paper recipe", lambda s: s.startswith("paper")),
    ("quantization", lambda s: s.startswith("int")),
    ("pruning", lambda s: s.startswith(("50%", "2:4"))),
    ("expert drop", lambda s: s.startswith("expert drop")),
    ("layer / block drop", lambda s: s.startswith(("layer drop", "block drop"))),
]


def tables(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """(model, rows as {column: cell}) of every fenced table whose title names a model; columns are
    cut where the dashes under the header are (cells may hold single spaces)."""
    found = []
    for block in re.findall(r"```\n(.*?)```", text, flags=re.S):
        title, header, rule, *lines = block.splitlines()
        spans = [m.span() for m in re.finditer(r"-+", rule)]
        names = [header[a:b].strip() for a, b in spans]
        if "perplexity" not in names or "weights" not in names:
            continue  # the activation-spread tables
        rows = [{n: line[a:b].strip() for n, (a, b) in zip(names, spans, strict=True)} for line in lines]
        found.append((title.split(": ")[0], rows))
    return found


def points(paths: list[Path]) -> dict[str, dict[str, list[tuple[str, float, float]]]]:
    """model -> kind -> [(setting, weights MiB, perplexity change %)]; the original as kind 'original'."""
    by_model: dict[str, dict[str, list]] = {}
    for path in paths:
        for model, rows in tables(path.read_text(encoding="utf-8")):
            if "outlier" in model:  # a rewritten model, not the bundled one
                continue
            kinds = by_model.setdefault(model, {})
            for row in rows:
                setting = row["setting"]
                if row["perplexity"] in ("", "n/a") or any(r in setting for r in REPEATS):
                    continue
                mib = float(row["weights"].removesuffix(" MiB"))
                change = float(row["vs original"].rstrip("%") or 0)
                kind = next((k for k, named in KINDS if named(setting)), "original")
                if kind == "original" and any(p[0] == "original" for p in kinds.get(kind, [])):
                    continue  # both files score the same original
                kinds.setdefault(kind, []).append((setting, mib, change))
    return by_model


def write_plot(paths: list[Path] = RESULTS, out: Path = OUT) -> Path:
    return Path(quality_vs_size(points([p for p in paths if p.is_file()]), str(out)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", nargs="*", type=Path, default=RESULTS)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    print(f"wrote {write_plot(args.results, args.out)}")


if __name__ == "__main__":
    main()
