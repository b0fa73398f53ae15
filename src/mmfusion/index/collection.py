"""An incremental, crash-safe index of an image collection: scan, decode, embed, store, search.

``Index.open(db, model=...)`` opens (or creates) an index directory::

    index.sqlite    metadata and vectors (SQLite, WAL): the source of truth, committed in chunks
    vectors.faiss   the search structure (FAISS), saved atomically; repaired from SQLite when behind
                    (or, with --vectors milvus://..., a Milvus collection instead: see .vectors)
    write.lock      one writer at a time
    reports/        one JSON report per indexing run

Re-running on a folder costs a ``stat`` per unchanged file; a renamed or copied file is recognised by its
content hash and reuses its vector; removed files are swept unless their root is missing or empty (an
unmounted disk), which removes nothing.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import logging
import os
import uuid
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..backends import model_fingerprint
from ..data.images import DEFAULT_MAX_PIXELS
from ..interfaces import Embedder
from .ann import AnnConfig, VectorIndex
from .consistency import check_vectors
from .encoder import QueryEncoder, decode_plan
from .pipeline import UpdateOptions, update_index
from .query import SearchResult, Term, combine_terms
from .search import VectorQuery, query_terms, search_many
from .store import DB_FILE, LOCK_FILE, VECTORS_FILE, IndexMismatchError, Store, WriteLock
from .vectors import VECTORS_META, VectorsSpec, VectorStore, choose_vectors, open_milvus, parse_vectors_spec
from .video import VideoOptions
from .writer import CheckReport, IndexReport

_NEW_INDEX_NEEDS_A_MODEL = (
    "{root} is a new index: say which model embeds it, e.g. --model runs/clip "
    "(train one with: mmfusion train clip --out runs/clip)"
)

# decode_plan and VectorQuery moved to .encoder and .search; importable from here as before
__all__ = ["Index", "VectorQuery", "decode_plan", "load_embedder", "model_ref"]

log = logging.getLogger(__name__)


def load_embedder(spec: str | os.PathLike) -> Embedder:
    """A model by the name the CLI takes: a native checkpoint (or training run) directory, ``hf:<hub-id>`` or
    a Hugging Face model directory (CLIP or SigLIP)."""
    from ..backends import load

    text = os.fspath(spec)
    model = load(text)  # a missing model raises an error that says where it looked and what to do
    if not isinstance(model, Embedder):
        raise ValueError(
            f"{text} is a {type(model).__name__}, which cannot embed images and texts; the index needs an "
            "Embedder: a native CLIP checkpoint, or a CLIP or SigLIP model (hf:...)"
        )
    return model


def model_ref(spec: str | os.PathLike) -> str:
    """How the index records a model so later runs load the same one: hub ids as given, paths made absolute."""
    text = os.fspath(spec)
    if text.startswith("hf:"):
        rest = text[3:]
        return "hf:" + os.path.abspath(os.path.expanduser(rest)) if os.path.isdir(os.path.expanduser(rest)) else text
    return os.path.abspath(os.path.expanduser(text))


def model_identity(model: Embedder, ref: str | None = None) -> dict:
    """How an index (and a shard directory) records its model: name, reference, weights' fingerprint, dimension."""
    name = str(getattr(model, "name", ""))
    return {"name": name, "fingerprint": model_fingerprint(model), "ref": ref or name, "dim": int(model.embed_dim)}


class _Created:
    """What opening an index for writing creates, so that a failed first open removes it and only it."""

    def __init__(self, root: Path):
        self.root = root
        self.dir = not root.exists()
        self.lock = not (root / LOCK_FILE).exists()
        self.db = False  # set under the writer's lock

    def remove(self) -> None:
        names = [DB_FILE + sfx for sfx in ("", "-wal", "-shm", "-journal")] if self.db else []
        for name in names + ([LOCK_FILE] if self.lock else []):
            with contextlib.suppress(FileNotFoundError):
                (self.root / name).unlink()
        if self.dir:
            with contextlib.suppress(OSError):  # not empty: something else was put there meanwhile
                self.root.rmdir()


class Index:
    """A searchable image collection stored in a directory.

    Use :meth:`open`; close it (or use it as a context manager) when done writing. Storage and consistency live
    here; indexing runs in :mod:`.pipeline`, searching in :mod:`.search`, query encoding in :mod:`.encoder`.
    """

    def __init__(self, root: Path, store: Store, vectors: VectorStore | None, write: bool):
        self.dir, self.store, self.write = root, store, write
        self.vi = vectors
        self.vectors_spec = VectorsSpec("faiss")  # where the vectors are searched (recorded in the meta)
        self._vectors_given: VectorsSpec | None = None
        self._ann = AnnConfig()
        self._model: Embedder | None = None
        self._encoder: QueryEncoder | None = None
        self._lock: WriteLock | None = None
        self._text_cache: dict[tuple[str, bool], np.ndarray] = {}

    # ---- opening ----------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        root: str | os.PathLike,
        model: Embedder | str | os.PathLike | None = None,
        write: bool = False,
        ann: AnnConfig | None = None,
        vectors: str | None = None,
    ) -> Index:
        """Open an index directory; ``write=True`` creates it if needed and takes the writer's lock.

        Args:
            root: the index directory (``--db``).
            model: an Embedder or a model spec; required to create an index, and checked against the one that
                made it otherwise (an index never mixes models). Default: the model it was made with.
            write: open for indexing (one writer at a time); readers need no lock.
            ann: when the search structure turns approximate (tests lower the threshold).
            vectors: the vector store, a spec (:mod:`.vectors`: ``faiss``, ``milvus://HOST:PORT/COLLECTION``,
                ``PATH.db[/COLLECTION]``); a new index records it, an existing one checks it is the one it
                records (a server may be given by another address). Default: the recorded one (FAISS if none).

        A first open for writing that fails (no model, or one that cannot be loaded) leaves nothing behind: what it
        created (the directory, the lock file, the database) is removed, and nothing else.

        Raises:
            IndexLockedError: another process is writing.
            IndexMismatchError: ``model`` is not the model that made the index.
            ValueError: a new index opened for writing without a model.
        """
        root = Path(root).expanduser()
        given = parse_vectors_spec(vectors)  # a bad spec fails before anything is created
        created = _Created(root) if write else None
        lock = store = None
        try:
            if write:
                lock = WriteLock(root)
                lock.acquire()  # creates the directory and the lock file when needed
                created.db = not (root / DB_FILE).exists()  # decided under the lock: no other writer races it
            ref = None
            if model is None and created is not None and created.db:
                raise ValueError(_NEW_INDEX_NEEDS_A_MODEL.format(root=root))
            if write and model is not None and not isinstance(model, Embedder | dict):  # before a database exists
                ref, model = model_ref(model), load_embedder(model)
            store = Store(root, readonly=not write)
            idx = cls(root, store, None, write)
            idx._lock = lock
            idx._ann = ann or AnnConfig()
            idx._vectors_given = given
            idx.bind_model(model, ref=ref)
            idx._load_vectors()
        except BaseException:
            if store is not None:
                store.close()
            if created is not None and lock is not None and lock.fd is not None:
                created.remove()  # a failed first run leaves nothing behind (decided while holding the lock)
            if lock is not None:
                lock.release()
            raise
        return idx

    def close(self) -> None:
        if self.vi is not None:
            self.vi.close()  # a Milvus client's connection; nothing for FAISS
        self.store.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the model --------------------------------------------------------------------------------

    def bind_model(self, model: Embedder | str | os.PathLike | None, ref: str | None = None) -> None:
        """Use ``model`` (an Embedder already loaded, or a model spec) for this index's queries and indexing; a
        dict is a model's recorded identity (:func:`model_identity`, from embeddings made elsewhere): it is
        recorded or checked, and the model is loaded from its ``ref`` when first needed.

        A new index opened for writing records it; an existing one checks it is the model that made the index.
        None leaves the model to be loaded, when first needed, from what the index recorded. ``ref``: how to
        record an Embedder loaded from a spec (:func:`model_ref`); default: its name.

        Raises:
            IndexMismatchError: ``model`` is not the model that made the index.
            ValueError: None for a new index opened for writing, which must be told its model.
        """
        stored = self.store.meta("model")
        if model is None:
            if stored is None and self.write:
                raise ValueError(_NEW_INDEX_NEEDS_A_MODEL.format(root=self.dir))
            return  # loaded on first use
        if isinstance(model, dict):  # a recorded identity (embeddings made elsewhere): checked, not loaded
            identity, model = {k: model[k] for k in ("name", "fingerprint", "ref", "dim")}, None
        else:
            if not isinstance(model, Embedder):
                ref = model_ref(model)
                model = load_embedder(model)
            identity = model_identity(model, ref)
        if stored is not None:
            if stored["fingerprint"] != identity["fingerprint"] or stored["dim"] != identity["dim"]:
                raise IndexMismatchError(
                    f"{self.dir} was built with the model {stored['ref']} ({stored['dim']}-d, weights "
                    f"{stored['fingerprint']}), not {identity['ref']} ({identity['dim']}-d, weights "
                    f"{identity['fingerprint']}); an index never mixes models: index into another --db, or "
                    "leave out --model to use the one it was built with"
                )
        elif self.write:
            self.store.set_meta({"model": identity})
        if model is not None:
            self._use_model(model)

    def _use_model(self, model: Embedder) -> None:
        if model is not self._model:
            self._model, self._encoder = model, None
            self._text_cache.clear()

    @property
    def model(self) -> Embedder:
        """The index's model, loaded on first use from what the index recorded (and checked to be unchanged)."""
        if self._model is None:
            stored = self.store.meta("model")
            if stored is None:
                raise ValueError(f"{self.dir} holds no images yet, so it has no model: index a folder first")
            model = load_embedder(stored["ref"])
            if model_fingerprint(model) != stored["fingerprint"]:
                raise IndexMismatchError(
                    f"the model at {stored['ref']} has changed since {self.dir} was built (weights "
                    f"{model_fingerprint(model)}, index made with {stored['fingerprint']}); rebuild the index into "
                    "a new --db with the current model"
                )
            self._use_model(model)
        return self._model

    @property
    def query_encoder(self) -> QueryEncoder:
        """How this index turns texts and images into vectors, for queries and for indexing alike."""
        if self._encoder is None:
            self._encoder = QueryEncoder(self.model)
        return self._encoder

    @property
    def dim(self) -> int:
        stored = self.store.meta("model")
        return int(stored["dim"]) if stored else int(self.model.embed_dim)

    # ---- the vector store (FAISS or Milvus) and its consistency with SQLite ----------------------------

    def _load_vectors(self) -> None:
        recorded = self.store.meta(VECTORS_META)
        spec, owner = choose_vectors(recorded, self._vectors_given, lambda: self.store.count() > 0, self.dir)
        self.vectors_spec = spec
        if spec.kind != "faiss":
            self._open_milvus(spec, owner, record=recorded is None)
            return
        path = self.dir / VECTORS_FILE
        if self.write:
            for tmp in glob.glob(str(self.dir / f".{VECTORS_FILE}.*.tmp")):  # a save cut short by a crash
                os.unlink(tmp)
        if self.store.meta("model") is None:
            self.vi = None
            return
        vi = None
        if path.is_file():
            try:
                vi = VectorIndex.load(path, self._ann)
                vi.cfg = self._ann
            except Exception as e:  # unreadable: rebuilt from SQLite below
                log.warning("%s is unreadable (%s); rebuilding it from the database", path, e)
        if vi is None or vi.dim != self.dim:
            vi = VectorIndex(self.dim, self._ann)
        self.vi = vi
        report = self.check(repair=True)
        if report.repaired and self.write:
            self.save_vectors()

    def _open_milvus(self, spec: VectorsSpec, owner: str, record: bool) -> None:
        if self.write and record:
            self.store.set_meta({VECTORS_META: {"spec": spec.text, "owner": owner}})
        if self.store.meta("model") is None:
            self.vi = None
            return
        self.vi = open_milvus(spec, self.dim, owner, create=self.write)
        if self.write:  # readers trust the shared collection: its one writer repairs it (listing ids costs)
            self.check(repair=True)

    def _new_vectors(self) -> VectorStore:
        if self.vectors_spec.kind == "faiss":
            return VectorIndex(self.dim, self._ann)
        owner = (self.store.meta(VECTORS_META) or {}).get("owner", "")
        return open_milvus(self.vectors_spec, self.dim, owner, create=True)

    def rebuild_vectors(self, vectors: str | None = None) -> int:
        """Refill the vector store from SQLite, the source of truth; into the store ``vectors`` names when given,
        which moves the index there (FAISS to Milvus or back) and records it.

        Returns:
            The number of vectors written.
        """
        if not self.write:
            raise RuntimeError("open the index with write=True to rebuild its vectors")
        if self.store.meta("model") is None:
            raise ValueError(f"{self.dir} holds no images yet: nothing to rebuild")
        target = parse_vectors_spec(vectors) or self.vectors_spec
        same = target.same_store(self.vectors_spec)
        recorded = self.store.meta(VECTORS_META) or {}
        owner = recorded.get("owner") or uuid.uuid4().hex  # names the index (and the collections it owns)
        if same and self.vi is not None:
            new = self.vi
            new.clear()
        elif target.kind == "faiss":
            new = VectorIndex(self.dim, self._ann)
        else:
            new = open_milvus(target, self.dim, owner, create=True)
            new.clear()
        n = 0
        for ids, vecs in self.store.iter_vectors():
            new.add(ids, vecs)
            n += len(ids)
        if new.needs_rebuild():
            new.rebuild()
        if not same and self.vi is not None:
            self.vi.close()
        self.vi, self.vectors_spec = new, (self.vectors_spec if same else target)
        self.store.set_meta({VECTORS_META: {"spec": self.vectors_spec.text, "owner": owner}})
        if target.kind == "faiss":
            self.save_vectors()
        else:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / VECTORS_FILE).unlink()  # stale now: the vectors live in Milvus
        return n

    def save_vectors(self) -> None:
        """Save the FAISS side atomically (SQLite is committed as it goes); a Milvus collection keeps its writes."""
        if self.vi is not None:
            self.vi.save(self.dir / VECTORS_FILE)

    def check(self, repair: bool = False, full: bool = False) -> CheckReport:
        """Compare FAISS ids with the live SQLite rows (and, with ``full``, look for NaN vectors).

        Args:
            repair: make FAISS agree with SQLite (in memory; a writer saves the result).
            full: also read every vector and check that it is finite and the same in both stores.
        """
        report, self.vi = check_vectors(self.store, self.vi, self._ann, repair, full)
        for msg in report.repaired:
            log.info("%s: %s", self.dir, msg)
        return report

    # ---- indexing ---------------------------------------------------------------------------------

    def update(
        self,
        roots: Sequence[str | os.PathLike],
        batch_size: int = 64,
        workers: int | None = None,
        chunk_size: int = 256,
        commit_every_s: float = 10.0,
        save_every_s: float = 60.0,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
        draft: bool = True,
        progress: bool = True,
        ray=None,
        video: VideoOptions | bool = True,
    ) -> IndexReport:
        """Bring the index up to date with the image and video files under ``roots``.

        Args:
            roots: folders (or files) to index; several may be given.
            batch_size: images per model call.
            workers: decoding threads (default: one per CPU, of which only half run while the model, not
                decoding, is the bottleneck); decoding overlaps the model's work.
            chunk_size: files per committed transaction (a killed run keeps every finished chunk).
            commit_every_s: also commit when this much time passed since the last commit.
            save_every_s: save the FAISS file at most this often during a run (and at the end).
            max_pixels: refuse images with more pixels than this (checked from the header; this limit, not
                Pillow's, applies); None: no limit.
            draft: decode JPEGs at reduced scale when the model needs few pixels.
            progress: show a progress bar.
            ray: a :class:`~mmfusion.index.ray_embed.RayOptions` to decode and embed on a Ray cluster (this
                process still scans, diffs and writes); None: in this process.
            video: how videos are sampled and pooled into segments (:class:`~mmfusion.index.video.VideoOptions`);
                True: the defaults; False: video files are not indexed (nor kept: a root's videos then go).

        Returns:
            What was added, updated, renamed, removed and skipped (also saved under ``reports/``).

        Raises:
            IndexInterrupted: Ctrl-C (a KeyboardInterrupt); its ``report`` counts what was committed, which is
                kept, and the run is recorded as interrupted. Running again resumes.
        """
        if not self.write:
            raise RuntimeError("open the index with write=True to update it")
        encoder = self.query_encoder  # fails before scanning when the model cannot be loaded
        if self.vi is None:
            self.vi = self._new_vectors()
        video = (VideoOptions() if video else None) if isinstance(video, bool) else video
        opts = UpdateOptions(
            batch_size, workers, chunk_size, commit_every_s, save_every_s, max_pixels, draft, progress, video
        )
        if ray is None:
            return update_index(self.store, self.vi, encoder, roots, opts, self.save_vectors, self.dir / "reports")
        from .ray_embed import RayEmbedPipeline, connected

        with connected(ray) as r:
            return update_index(
                self.store, self.vi, encoder, roots, opts, self.save_vectors, self.dir / "reports",
                pipeline=functools.partial(RayEmbedPipeline, r, ray),
            )  # fmt: skip

    def add_embeddings(self, out: str | os.PathLike, chunk_size: int = 256, progress: bool = True) -> IndexReport:
        """Add (or update) rows from the embedding shards in ``out`` (``mmfusion embed``), without the model; see
        :func:`.shards.index_embeddings`. Open the index with ``model=read_manifest(out)["model"]``."""
        from .shards import index_embeddings

        if not self.write:
            raise RuntimeError("open the index with write=True to update it")
        if self.vi is None:
            self.vi = self._new_vectors()
        return index_embeddings(self.store, self.vi, out, chunk_size, self.save_vectors, self.dir / "reports", progress)

    # ---- searching --------------------------------------------------------------------------------

    def embed_text(self, text: str, ensemble: bool = False) -> np.ndarray:
        """(D,) normalised embedding of a text query; with ``ensemble``, averaged over photo prompts."""
        key = (text, ensemble)
        if key not in self._text_cache:
            self._text_cache[key] = self.query_encoder.encode_texts([text], ensemble)[0]
        return self._text_cache[key]

    def embed_image(self, image: str | os.PathLike | Image.Image) -> np.ndarray:
        """(D,) normalised embedding of an image file or PIL image, decoded as indexing decodes it."""
        return self.query_encoder.encode_images([image])[0]

    def vector_of(self, file_id: int) -> np.ndarray:
        ids, vecs = self.store.vectors([int(file_id)])
        if not len(ids):
            raise KeyError(f"no image with id {file_id} in {self.dir}; ids are shown by mmfusion search")
        return vecs[0]

    def search(
        self,
        query: str | Sequence[str] | Sequence[Term] | None = None,
        *,
        text: str | None = None,
        image: str | os.PathLike | Image.Image | None = None,
        like: int | None = None,
        k: int = 10,
        threshold: float | None = None,
        path: str | None = None,
        after: float | None = None,
        before: float | None = None,
        ensemble: bool = False,
    ) -> list[SearchResult]:
        """Search by text, by image, by an indexed image, or by a weighted sum of them.

        Args:
            query: a query in the CLI's syntax (``'beach' + photo.jpg - 'people'``, as one string or its tokens),
                or a list of :class:`Term`.
            text, image, like: shortcuts added to the query with weight 1.
            k: results wanted.
            threshold: drop results scoring below this cosine similarity.
            path: only files whose path matches this glob (or contains this text).
            after, before: only files whose date (EXIF capture time, else mtime; unix seconds) is in range.
            ensemble: average text queries over photo prompts ("a photo of a {}.", ...).

        Returns:
            Up to ``k`` results, best first.
        """
        q = combine_terms(query_terms(query, text, image, like), self, ensemble)
        return self.search_many([VectorQuery(q, k, threshold, path, after, before)])[0]

    def search_many(self, queries: Sequence[VectorQuery]) -> list[list[SearchResult]]:
        """Several searches by query vector at once, each with its own ``k``, threshold and filters; a query gets
        what :meth:`search` would give it alone (see :func:`.search.search_many`)."""
        return search_many(self.store, self.vi, queries)

    # ---- information ------------------------------------------------------------------------------

    def info(self) -> dict:
        stored = self.store.meta("model") or {}
        size = sum(p.stat().st_size for p in self.dir.iterdir() if p.is_file())
        last = self.store.last_run()
        return {
            "db": str(self.dir),
            "images": self.store.count(),  # every file, videos included
            **self.store.video_counts(),
            "model": stored.get("ref"),
            "fingerprint": stored.get("fingerprint"),
            "dim": stored.get("dim"),
            "index_type": self.vi.kind if self.vi is not None else "empty",
            "vectors": self.vectors_spec.text,
            "size_on_disk_bytes": size,
            "roots": [{"root": r, "images": n} for r, n in self.store.roots()],
            "last_run": last,
        }
