"""The image-collection index: scan folders, decode, embed, store in SQLite + FAISS, search by text or example."""

from .ann import AnnConfig, VectorIndex
from .collection import Index, VectorQuery, load_embedder, model_fingerprint
from .query import SearchResult, Term, parse_query
from .store import IndexLockedError, IndexMismatchError
from .writer import CheckReport, IndexReport

__all__ = [
    "AnnConfig",
    "CheckReport",
    "Index",
    "IndexLockedError",
    "IndexMismatchError",
    "IndexReport",
    "SearchResult",
    "Term",
    "VectorIndex",
    "VectorQuery",
    "load_embedder",
    "model_fingerprint",
    "parse_query",
]
