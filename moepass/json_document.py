"""The JSON documents moepass writes (manifests, reports): strict JSON, which has no NaN or Infinity.
Such numbers (a similarity matrix's cells past the last block, an infinite perplexity) become null,
so any JSON parser reads the file, not only Python's."""

from __future__ import annotations

import json
import math


def json_document(document, indent: int = 1) -> str:
    """`document` as JSON text (non-finite floats as null, other objects by `str`), newline-ended."""
    return json.dumps(_finite(document), indent=indent, default=str, allow_nan=False) + "\n"


def _finite(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(item) for item in value]
    return value
