"""Search queries: texts, images and indexed images, added and subtracted with weights.

The CLI reads a query as tokens: ``"beach" + photo.jpg - "people"`` or ``2*sunset + id:42``. A token that
names an existing image file is an image, ``id:N`` is an indexed image, anything else is text; ``+`` and
``-`` between terms set the sign of the next one and ``W*`` in front of a term weights it. The query vector
is the weighted sum of the terms' normalised embeddings, normalised again (so ``a + b`` asks for images
like both, and ``- c`` pushes away from ``c``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .scan import image_extensions
from .store import is_video_format

if TYPE_CHECKING:
    from .store import FileRow


class QuerySource(Protocol):
    """What turns query terms into vectors (an :class:`~mmfusion.index.Index`): embeddings and stored vectors."""

    def embed_text(self, text: str, ensemble: bool = False) -> np.ndarray: ...

    def embed_image(self, image: Any) -> np.ndarray: ...

    def vector_of(self, file_id: int) -> np.ndarray: ...


@dataclass
class Term:
    weight: float
    kind: str  # text | image | id | vector
    value: Any


_WEIGHT = re.compile(r"^([+-]?\d+(?:\.\d*)?|[+-]?\.\d+)\*(.+)$", re.S)


def _classify(token: str) -> tuple[str, Any]:
    if token.startswith("id:") and token[3:].strip().isdigit():
        return "id", int(token[3:])
    if token.lower().endswith(image_extensions()) and " " not in token.strip():
        if not os.path.isfile(token):
            raise ValueError(f"{token}: no such image file (a query term ending in an image extension is a file)")
        return "image", token
    return "text", token


def parse_query(query: str | Sequence[str] | Sequence[Term]) -> list[Term]:
    """Terms of a query given as CLI tokens (or one string of them), or passed through if already terms.

    Raises:
        ValueError: an operator with no term after it, or an empty query.
    """
    if isinstance(query, str):
        query = _split(query)
    query = list(query)
    if query and all(isinstance(t, Term) for t in query):
        return list(query)
    terms, sign, pending = [], 1.0, False
    for token in query:
        token = str(token).strip()
        if token in ("+", "-"):
            sign, pending = (1.0 if token == "+" else -1.0) * (sign if pending else 1.0), True
            continue
        if not token:
            continue
        weight = 1.0
        m = _WEIGHT.match(token)
        if m:
            weight, token = float(m.group(1)), m.group(2).strip()
        kind, value = _classify(token)
        terms.append(Term(sign * weight, kind, value))
        sign, pending = 1.0, False
    if pending:
        raise ValueError("the query ends with + or -: put a text, an image file or id:N after it")
    if not terms:
        raise ValueError("empty query: give a text, an image file or id:N")
    return terms


def _split(text: str) -> list[str]:
    """Split one query string at ``+`` / ``-`` that stand alone between spaces; quotes group words."""
    tokens, cur, quote = [], "", None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
            else:
                cur += ch
        elif ch in "\"'":
            quote = ch
        else:
            cur += ch
    parts = re.split(r"\s+([+-])\s+", " " + cur.strip() + " ")
    for p in parts:
        if p.strip():
            tokens.append(p.strip())
    return tokens


def combine_terms(terms: Sequence[Term], index: QuerySource, ensemble: bool = False) -> np.ndarray:
    """(D,) normalised query vector: the weighted sum of the terms' embeddings."""
    total = None
    for t in terms:
        if t.kind == "text":
            v = index.embed_text(str(t.value), ensemble)
        elif t.kind == "image":
            v = index.embed_image(t.value)
        elif t.kind == "id":
            v = index.vector_of(int(t.value))
        elif t.kind == "vector":
            v = np.asarray(t.value, dtype=np.float32).reshape(-1)
            v = v / max(float(np.linalg.norm(v)), 1e-12)
        else:
            raise ValueError(f"unknown query term kind {t.kind!r}; use text, image, id or vector")
        total = t.weight * v if total is None else total + t.weight * v
    norm = float(np.linalg.norm(total))
    if not np.isfinite(norm) or norm < 1e-6:
        raise ValueError("the query's terms cancel out (their weighted sum is zero): change a weight or a sign")
    return (total / norm).astype(np.float32)


@dataclass
class SearchResult:
    id: int
    path: str
    score: float
    metadata: dict

    @classmethod
    def from_row(cls, row: FileRow, score: float) -> SearchResult:
        meta = {
            "width": row.width,
            "height": row.height,
            "format": row.format,
            "size": row.size,
            "modified": _iso(row.mtime_ns / 1e9),
            "taken": _iso(row.taken) if row.taken is not None else None,
            "media": "video" if is_video_format(row.format) else "image",  # a video's time range: see .video
        }
        return cls(row.id, row.display, score, meta)

    def to_dict(self) -> dict:
        return {"id": self.id, "path": self.path, "score": round(self.score, 6), **self.metadata}


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_date(text: str | None) -> float | None:
    """ISO date or date-time (``2024-06-01``, ``2024-06-01T12:00``) as unix seconds, read as UTC."""
    if not text:
        return None
    try:
        d = datetime.fromisoformat(text)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a date: write it as YYYY-MM-DD or YYYY-MM-DDTHH:MM") from e
    return (d if d.tzinfo else d.replace(tzinfo=UTC)).timestamp()
