"""The image-collection index: scan folders, decode, embed, store in SQLite + FAISS, search by text or example."""

from ..backends import model_fingerprint
from .ann import AnnConfig, VectorIndex
from .collection import Index, load_embedder, model_ref
from .encoder import QueryEncoder
from .query import SearchResult, Term, parse_query
from .search import VectorQuery
from .store import IndexLockedError, IndexMismatchError
from .writer import CheckReport, IndexInterrupted, IndexReport

__all__ = [
    "AnnConfig",
    "CheckReport",
    "Index",
    "IndexInterrupted",
    "IndexLockedError",
    "IndexMismatchError",
    "IndexReport",
    "QueryEncoder",
    "SearchResult",
    "Term",
    "VectorIndex",
    "VectorQuery",
    "load_embedder",
    "model_fingerprint",
    "model_ref",
    "parse_query",
]
