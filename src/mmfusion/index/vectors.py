"""Where an index keeps its searchable vectors: one small interface, two engines, picked by a spec.

SQLite holds every vector (the source of truth); the vector store is what searches them, and can always be
repopulated from SQLite. Two engines satisfy :class:`VectorStore`:

- FAISS (:class:`~mmfusion.index.ann.VectorIndex`), the default: ``vectors.faiss`` in the index directory,
  searched in the process that opened it.
- Milvus (:class:`~mmfusion.index.milvus.MilvusVectors`): a collection in a Milvus server, which every
  replica searches, or in a milvus-lite file (the same client code, in one process: tests and laptops).

Specs (``--vectors`` on ``mmfusion index`` / ``search``, the service's ``vectors`` setting)::

    faiss                                    the default
    milvus://HOST:PORT/COLLECTION[?OPTIONS]  a Milvus server (a token, if it needs one: MMFUSION_MILVUS_TOKEN)
    milvus-lite:PATH.db[/COLLECTION]         milvus-lite; a plain PATH.db[/COLLECTION] means the same
    OPTIONS: index=HNSW|FLAT|IVF_FLAT|AUTOINDEX (server default HNSW, milvus-lite FLAT), and its numbers:
             M, efConstruction, nlist (building), ef, nprobe (searching); e.g. ?index=HNSW&M=32&ef=128

The index records its spec in its SQLite meta, so later runs and the service find the same store without
the flag. Credentials never go into a spec (it is recorded): they come from ``MMFUSION_MILVUS_TOKEN``.
"""

from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, urlencode

import numpy as np

VECTORS_META = "vectors"  # the SQLite meta key: {"spec": text, "owner": uid of the Milvus collection's index}
TOKEN_ENV = "MMFUSION_MILVUS_TOKEN"
_FORMS = (
    "faiss (the default), milvus://HOST:PORT/COLLECTION (a Milvus server) or milvus-lite:PATH.db[/COLLECTION] "
    "(milvus-lite in this process; a plain PATH.db[/COLLECTION] also works)"
)
_OPTIONS = {"index": str, "M": int, "efConstruction": int, "nlist": int, "ef": int, "nprobe": int}
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,254}")


@runtime_checkable
class VectorStore(Protocol):
    """What the index needs of a vector store: vectors by int64 id (the file's id), inner-product search."""

    dim: int

    @property
    def kind(self) -> str:  # a line for `mmfusion index info`
        ...

    def __len__(self) -> int: ...

    def ids(self) -> np.ndarray:
        """Every stored id (for consistency checks against SQLite)."""

    def add(self, ids, vectors: np.ndarray) -> None:
        """Store ``vectors`` (N, dim) under ``ids`` (ids not already stored)."""

    def remove(self, ids) -> int: ...

    def vectors(self, ids) -> np.ndarray:
        """(N, dim) stored vectors of ``ids`` (each must be present)."""

    def search(self, queries: np.ndarray, k: int, allowed=None) -> tuple[np.ndarray, np.ndarray]:
        """(Q, k) scores and ids by inner product, among ``allowed`` ids if given; -inf / -1 pad missing hits."""

    def needs_rebuild(self) -> bool: ...

    def rebuild(self, seed: int = 0) -> None:
        """Choose the search layout for the current size (engines that manage their own may do nothing)."""

    def layout_problems(self) -> list[str]:
        """What is wrong with the search layout beyond the ids (a repair then rebuilds it)."""

    def clear(self) -> None:
        """Drop every vector (a rebuild from SQLite follows)."""

    def save(self, path: str | os.PathLike) -> None:
        """Make what was written durable: FAISS writes ``path``; a database engine persists by itself."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class VectorsSpec:
    """A parsed ``--vectors`` spec."""

    kind: str  # "faiss", "milvus" (a server) or "milvus-lite"
    uri: str = ""  # http://HOST:PORT, or the milvus-lite path (absolute)
    collection: str = ""
    options: tuple[tuple[str, str | int], ...] = ()  # index type and its numbers, in the order given

    @property
    def text(self) -> str:
        """The canonical spec, as recorded in the index."""
        if self.kind == "faiss":
            return "faiss"
        query = f"?{urlencode(self.options)}" if self.options else ""
        if self.kind == "milvus":
            return f"milvus://{self.uri.removeprefix('http://')}/{self.collection}{query}"
        return f"milvus-lite:{self.uri}/{self.collection}{query}"

    def same_store(self, other: VectorsSpec) -> bool:
        """Do both name one store? A server may be reached by other addresses (its collection's owner id is
        checked when it is opened); a milvus-lite file only by its path."""
        if self.kind != other.kind or self.collection != other.collection:
            return False
        return self.kind != "milvus-lite" or self.uri == other.uri


def parse_vectors_spec(text: str | None) -> VectorsSpec | None:
    """Parse a ``--vectors`` spec (None or empty: none given).

    Raises:
        ValueError: not one of the forms, naming them.
    """
    if text is None or not str(text).strip():
        return None
    raw = str(text).strip()
    if raw.lower() == "faiss":
        return VectorsSpec("faiss")
    body, _, query = raw.partition("?")
    options = _options(raw, query)
    if body.startswith("milvus://"):
        rest = body.removeprefix("milvus://")
        address, _, collection = rest.partition("/")
        if "@" in address:
            raise ValueError(
                f"--vectors {raw!r}: leave credentials out of the spec (the index records it); give them in "
                f"{TOKEN_ENV} (user:password or an API key)"
            )
        if not re.fullmatch(r"[A-Za-z0-9.\-\[\]:]+:\d+", address):
            raise ValueError(
                f"--vectors {raw!r}: expected milvus://HOST:PORT/COLLECTION, e.g. milvus://localhost:19530/photos"
            )
        return VectorsSpec("milvus", f"http://{address}", _collection(raw, collection), options)
    lite = body.removeprefix("milvus-lite:")
    m = re.fullmatch(r"(.+?\.db)(?:/([^/]*))?/?", lite)
    if m is None or (body == lite and lite.startswith(("milvus:", "http:", "https:"))):
        raise ValueError(f"--vectors {raw!r} is not a vector store spec; give {_FORMS}")
    path = os.path.abspath(os.path.expanduser(m.group(1)))
    return VectorsSpec("milvus-lite", path, _collection(raw, m.group(2) or "images"), options)


def _collection(raw: str, name: str) -> str:
    if not _NAME.fullmatch(name or ""):
        raise ValueError(
            f"--vectors {raw!r}: the collection name {name!r} must be letters, digits and underscores, starting "
            "with a letter or underscore (e.g. milvus://localhost:19530/photos)"
        )
    return name


def _options(raw: str, query: str) -> tuple[tuple[str, str | int], ...]:
    out = []
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in _OPTIONS:
            raise ValueError(f"--vectors {raw!r}: unknown option {key!r}; known: {', '.join(_OPTIONS)}")
        try:
            out.append((key, _OPTIONS[key](value.upper() if key == "index" else value)))
        except ValueError:
            raise ValueError(f"--vectors {raw!r}: {key} must be a whole number, not {value!r}") from None
    return tuple(out)


def choose_vectors(recorded: dict | None, given: VectorsSpec | None, has_rows, where) -> tuple[VectorsSpec, str]:
    """The store an index uses, and its owner id: the one it recorded, or the one given for a new index.

    Args:
        recorded: the index's ``vectors`` meta (None: FAISS, as every index before Milvus).
        given: the spec of ``--vectors`` (None: the recorded one).
        has_rows: a callable, True when the index already holds images (only asked when it matters).
        where: the index directory, for messages.

    Raises:
        ValueError: ``given`` is not the store the index uses; the message says how to move the vectors.
    """
    old = parse_vectors_spec(recorded["spec"]) if recorded else VectorsSpec("faiss")
    owner = recorded.get("owner", "") if recorded else ""
    if given is None or given.same_store(old):
        spec = old if given is None else given  # a server's address and search options may differ per process
        return spec, owner
    if recorded is None and not has_rows():
        return given, uuid.uuid4().hex  # a new (or still empty) index takes the store it is given
    raise ValueError(
        f"{where} keeps its vectors in {old.text}, not {given.text}; leave out --vectors (it is recorded) or "
        f"move them with: mmfusion index rebuild --db {where} --vectors {given.text}"
    )


def open_milvus(spec: VectorsSpec, dim: int, owner: str, create: bool):
    """The :class:`~mmfusion.index.milvus.MilvusVectors` of ``spec`` (imports pymilvus only now)."""
    from .milvus import MilvusVectors

    options = dict(spec.options)
    return MilvusVectors(
        spec.uri, spec.collection, dim, owner=owner, create=create, token=os.environ.get(TOKEN_ENV, ""),
        index_type=str(options.pop("index", "FLAT" if spec.kind == "milvus-lite" else "HNSW")), params=options,
    )  # fmt: skip
