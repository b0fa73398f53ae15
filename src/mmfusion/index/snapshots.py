"""Versioned, immutable snapshots of an index: one writer publishes, many readers hot-swap.

The index keeps one writer. After a committed update the writer publishes a snapshot: a consistent copy of the
metadata (SQLite's online backup API) and of the vectors (the FAISS file), written aside, fsynced, renamed into
place, and only then named by the version pointer, which is switched atomically (temp file, fsync, rename, fsync
of the directory), as LevelDB's ``CURRENT`` names its manifest::

    DB/snapshots/
        CURRENT             "v7": the version readers open
        v6/  v7/            index.sqlite (rollback journal, read as immutable), vectors.faiss, SNAPSHOT.json
        .tmp-v8-<pid>/      being written: never opened, removed by the next publish

A crash before the pointer switches leaves the previous version current; a reader opens only the directory the
pointer names, and a directory gets its name only once complete. Readers (:class:`SnapshotReader`, one per API
replica) look at the pointer every ``poll_s`` seconds, and at once when the writer announces a version on Redis
pub/sub (optional: the pointer is the truth, an announcement only a hint to look now). A new version is opened
beside the old one and swapped in between requests: a request holds a lease on the snapshot it started with, and
a snapshot is closed when it is no longer current and its last lease ends.

Garbage collection (after each publish, by the writer): the current version, every newer one, and the ``keep``
versions before it stay; an older version is removed only once it has been superseded for ``grace_s`` seconds
and no process holds it: a reader holds a shared ``flock`` on its snapshot's ``SNAPSHOT.json`` while it has the
snapshot open, so a reader in this process or another one on the same filesystem keeps it (on a filesystem
without locks the grace period is the rule). The same layout works on a shared volume (ReadWriteMany) and when
copied to each replica: copy a version's directory, then ``CURRENT`` last.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import shutil
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..utils.io import atomic_replace_dir, atomic_write_json, atomic_write_text, fresh_dir
from .ann import AnnConfig, VectorIndex
from .collection import Index
from .store import DB_FILE, VECTORS_FILE, Store

SNAPSHOTS, POINTER, MANIFEST = "snapshots", "CURRENT", "SNAPSHOT.json"
DEFAULT_CHANNEL = "mmfusion:snapshots"  # Redis pub/sub channel of announcements
_VERSION = re.compile(r"^v(\d+)$")

log = logging.getLogger(__name__)


@dataclass
class Published:
    """A published snapshot."""

    version: int
    path: Path
    images: int
    removed: list[int]  # versions garbage-collected by this publish


def snapshots_dir(db: str | os.PathLike) -> Path:
    return Path(db).expanduser() / SNAPSHOTS


def read_pointer(db: str | os.PathLike) -> int:
    """The current version of the index in ``db``.

    Raises:
        FileNotFoundError: nothing was published yet.
        ValueError: the pointer does not hold a version (``v<N>``).
    """
    path = snapshots_dir(db) / POINTER
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no published snapshot in {path.parent}: publish one with: mmfusion index FOLDER --db {db} --publish "
            "(or mmfusion index publish --db DB)"
        ) from None
    m = _VERSION.match(text)
    if not m:
        raise ValueError(f"{path} holds {text[:40]!r}, not a version like 'v7'")
    return int(m.group(1))


def versions(db: str | os.PathLike) -> list[int]:
    """The complete snapshot versions on disk, oldest first."""
    d = snapshots_dir(db)
    found = [int(m.group(1)) for p in d.iterdir() if (m := _VERSION.match(p.name))] if d.is_dir() else []
    return sorted(found)


# ---- publishing (the writer) ---------------------------------------------------------------------------


def publish(
    index: Index, keep: int = 2, grace_s: float = 60.0, redis_url: str | None = None, channel: str = DEFAULT_CHANNEL
) -> Published:
    """Publish the committed state of ``index`` (opened for writing) as the next version, then collect garbage.

    Args:
        index: the writer's index; its lock makes this process the only publisher.
        keep: versions kept before the current one (readers still finishing, a rollback).
        grace_s: an older version is removed only once superseded this long (readers elsewhere swap meanwhile).
        redis_url: announce the version on this Redis (pub/sub ``channel``); an unreachable Redis only logs.

    Returns:
        The version published, where, its image count, and the versions removed.
    """
    if not index.write:
        raise RuntimeError("publish from the writer: open the index with write=True (one writer at a time)")
    root = snapshots_dir(index.dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-v*"):  # a publish cut short by a crash (we hold the writer's lock)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        current = read_pointer(index.dir)
    except (FileNotFoundError, ValueError):
        current = 0
    version = max([*versions(index.dir), current]) + 1  # never reuses a name, even one a crash left unnamed
    final = _write_snapshot(index, root / f".tmp-v{version}-{os.getpid()}", root / f"v{version}", version)
    _switch(root, version)
    log.info("published %s as v%d", index.dir, version)
    if redis_url:
        announce(redis_url, version, channel)
    removed = gc(index.dir, keep=keep, grace_s=grace_s)
    return Published(version, final, index.store.count(), removed)


def _write_snapshot(index: Index, tmp: Path, final: Path, version: int) -> Path:
    """Metadata and vectors written into ``tmp`` and fsynced, then renamed to ``final`` (complete or absent)."""
    fresh_dir(tmp)
    try:
        dst = sqlite3.connect(str(tmp / DB_FILE), isolation_level=None)
        try:
            index.store.db.backup(dst)  # a consistent copy, read in one transaction of the writer's connection
            dst.execute("PRAGMA journal_mode = DELETE")  # one self-contained file, readable as immutable
        finally:
            dst.close()
        if isinstance(index.vi, VectorIndex):  # else (no vectors yet, or another store) readers use SQLite's
            index.vi.save(tmp / VECTORS_FILE)
        stored = index.store.meta("model") or {}
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        atomic_write_json(tmp / MANIFEST, {"version": version, "published": time.time(),
                                           "images": index.store.count(), "model": stored.get("fingerprint"),
                                           "files": files})  # fmt: skip
        return atomic_replace_dir(tmp, final)  # fsyncs every file and the directory, then renames
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _switch(root: Path, version: int) -> None:
    """Point readers at ``version``: the one atomic step of a publish."""
    atomic_write_text(root / POINTER, f"v{version}\n")


def announce(redis_url: str, version: int, channel: str = DEFAULT_CHANNEL) -> None:
    """Tell readers subscribed on Redis to look at the pointer now; failures only log (they poll anyway)."""
    try:
        import redis

        client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.publish(channel, json.dumps({"version": version}))
        finally:
            client.close()
    except Exception as e:  # the pointer is switched: readers find the version by polling
        log.warning("could not announce v%d on %s (%s); readers find it by polling", version, _shown(redis_url), e)


def _shown(url: str) -> str:
    """A Redis URL for a log line: without its password."""
    return re.sub(r"//[^@/]*@", "//***@", url)


def gc(db: str | os.PathLike, keep: int = 2, grace_s: float = 60.0) -> list[int]:
    """Remove old versions (see the module's docstring for the rule); returns the versions removed."""
    root = snapshots_dir(db)
    try:
        current = read_pointer(db)
    except (FileNotFoundError, ValueError):
        return []  # without a valid pointer nothing is known to be old
    found = versions(db)
    older = [v for v in found if v < current]
    kept = set(older[-keep:]) if keep > 0 else set()
    removed = []
    for i, v in enumerate(found):
        if v >= current or v in kept:
            continue
        superseded = _published(root / f"v{found[i + 1]}")  # when the next version replaced it
        if time.time() - superseded < grace_s:
            continue
        if _remove_unless_held(root / f"v{v}"):
            removed.append(v)
    return removed


def _published(path: Path) -> float:
    try:
        return float(json.loads((path / MANIFEST).read_text())["published"])
    except (OSError, ValueError, KeyError):
        return path.stat().st_mtime


def _remove_unless_held(path: Path) -> bool:
    try:
        fd = os.open(path / MANIFEST, os.O_RDONLY)
    except FileNotFoundError:
        fd = None  # not a complete snapshot: nobody can have opened it
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False  # a reader holds it
            except OSError:
                pass  # no locks on this filesystem: the grace period decided
        shutil.rmtree(path, ignore_errors=True)
        return True
    finally:
        if fd is not None:
            os.close(fd)


# ---- reading (the replicas) ----------------------------------------------------------------------------


def open_snapshot(path: str | os.PathLike, model=None, ann: AnnConfig | None = None, verified: dict | None = None):
    """A published snapshot directory as a read-only :class:`Index`, usable from any thread.

    Args:
        model: checked against the model the snapshot records, unless that is ``verified``: the identity an earlier
            version recorded and ``model`` was checked against (hashing a model's weights at every swap costs).
    """
    path = Path(path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} is not a complete snapshot ({MANIFEST} is missing)")
    store = Store(path, immutable=True)
    try:
        ix = Index(path, store, None, write=False)
        ix._ann = ann or AnnConfig()
        recorded = store.meta("model")
        if model is not None and verified is not None and _same_model(recorded, verified):
            ix._use_model(model)
        else:
            ix.bind_model(model)
        ix._load_vectors()  # the FAISS file, checked against SQLite (rebuilt in memory if missing)
    except BaseException:
        store.close()
        raise
    return ix


def _same_model(a: dict | None, b: dict | None) -> bool:
    return bool(a and b) and (a["fingerprint"], a["dim"]) == (b["fingerprint"], b["dim"])


class _Snapshot:
    """One open version, with its leases; closed when retired and its last lease ends."""

    def __init__(self, db: Path, version: int, model, ann: AnnConfig | None, verified: dict | None = None):
        path = snapshots_dir(db) / f"v{version}"
        self.fd: int | None = os.open(path / MANIFEST, os.O_RDONLY)  # FileNotFoundError: not a complete snapshot
        try:
            fcntl.flock(self.fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # held before opening: gc leaves this version alone
        except BlockingIOError:
            os.close(self.fd)
            raise FileNotFoundError(f"{path} is being removed") from None
        except OSError:
            pass  # no locks on this filesystem: the writer's grace period protects it
        try:
            self.index = open_snapshot(path, model, ann, verified)
        except BaseException:
            os.close(self.fd)
            raise
        self.version, self.refs, self.retired = version, 0, False

    def close(self) -> None:
        self.index.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


class SnapshotReader:
    """The current published snapshot of an index, swapped for a newer one between requests.

    Use :meth:`open`. Each use of the index holds a lease (:meth:`lease`), so a search that started on a version
    finishes on it; the read methods of :class:`Index` the service needs (``store``, ``search``, ``search_many``,
    ``vector_of``, ``info``, ``model``) take a lease per call.

    Args:
        db: the index directory (its ``snapshots/``; a copy of that folder is enough).
        model: the Embedder the index must have been built with (default: the one it records).
        poll_s: how often the pointer is read.
        redis_url: also subscribe to announcements on this Redis, to swap without waiting for the poll.
    """

    def __init__(self, db, model=None, ann: AnnConfig | None = None, poll_s: float = 1.0,
                 redis_url: str | None = None, channel: str = DEFAULT_CHANNEL):  # fmt: skip
        self.dir = Path(db).expanduser()
        self._model, self._ann, self.poll_s = model, ann, poll_s
        self._verified: dict | None = None  # the model identity self._model was checked against
        self.redis_url, self.channel = redis_url, channel
        self._current: _Snapshot | None = None
        self._lock, self._refreshing = threading.Lock(), threading.Lock()
        self._wake, self._stop = threading.Event(), threading.Event()
        self._threads: list[threading.Thread] = []
        self.swaps = 0

    @classmethod
    def open(cls, db, model=None, *, watch: bool = True, **kw) -> SnapshotReader:
        """Open the current version (raises when none is published) and, with ``watch``, follow new ones."""
        reader = cls(db, model, **kw)
        version = read_pointer(reader.dir)
        reader._current = _Snapshot(reader.dir, version, model, reader._ann)
        if model is not None:
            reader._verified = reader._current.index.store.meta("model")
        if watch:
            reader.start()
        return reader

    @property
    def version(self) -> int:
        return self._current.version

    @contextlib.contextmanager
    def lease(self) -> Iterator[Index]:
        """The current snapshot's index, kept open until the block ends even if a newer version comes."""
        with self._lock:
            snap = self._current
            if snap is None:
                raise RuntimeError(f"the snapshot reader of {self.dir} is closed")
            snap.refs += 1
        try:
            yield snap.index
        finally:
            with self._lock:
                snap.refs -= 1
                done = snap.retired and snap.refs == 0
            if done:
                snap.close()

    def refresh(self) -> bool:
        """Read the pointer and swap to the version it names if that is not the one served; True if swapped.
        A version that cannot be opened is logged and the current one kept (the next poll tries again)."""
        with self._refreshing:
            try:
                version = read_pointer(self.dir)
            except (OSError, ValueError) as e:
                log.warning("%s; still serving v%d", e, self.version)
                return False
            if version == self.version:
                return False
            try:
                snap = _Snapshot(self.dir, version, self._model, self._ann, self._verified)
            except Exception as e:
                log.warning("cannot open snapshot v%d of %s (%s); still serving v%d", version, self.dir, e,
                            self.version)  # fmt: skip
                return False
            with self._lock:
                old, self._current = self._current, snap
                old.retired = True
                done = old.refs == 0
            if done:
                old.close()
            self.swaps += 1
            log.info("%s: now serving snapshot v%d (was v%d)", self.dir, version, old.version)
            return True

    # ---- following new versions ------------------------------------------------------------------------

    def start(self) -> None:
        """Follow new versions in the background: the pointer every ``poll_s``, and Redis announcements."""
        targets = [self._poll] + ([self._listen] if self.redis_url else [])
        for fn in targets:
            t = threading.Thread(target=fn, name=f"mmfusion-snapshots-{fn.__name__[1:]}", daemon=True)
            t.start()
            self._threads.append(t)

    def _poll(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.refresh()
            except Exception:  # never let the watcher die: the next poll tries again
                log.exception("refreshing the snapshot of %s failed", self.dir)

    def _listen(self) -> None:
        """Wake the poller on each announcement; reconnects with backoff (polling goes on meanwhile)."""
        import redis

        backoff = 0.5
        while not self._stop.is_set():
            client = pubsub = None
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=2, health_check_interval=30)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self._wake.set()  # announcements may have been missed while disconnected
                backoff = 0.5
                while not self._stop.is_set():
                    if pubsub.get_message(timeout=0.5) is not None:
                        self._wake.set()
            except Exception as e:
                log.warning("snapshot announcements from %s unavailable (%s); polling every %ss",
                            _shown(self.redis_url), e, self.poll_s)  # fmt: skip
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 30.0)
            finally:
                for c in (pubsub, client):
                    with contextlib.suppress(Exception):
                        c is not None and c.close()

    def close(self) -> None:
        """Stop following and close the current snapshot (leases still running close theirs when they end)."""
        self._stop.set()
        self._wake.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        with self._lock:
            snap, self._current = self._current, None
            if snap is not None:
                snap.retired = True
            done = snap is not None and snap.refs == 0
        if done:
            snap.close()

    def __enter__(self) -> SnapshotReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the read side of Index, a lease per call -------------------------------------------------------

    @property
    def store(self) -> _LeasedStore:
        return _LeasedStore(self)

    @property
    def model(self):
        with self.lease() as ix:
            model = ix.model  # loaded and checked on first use
            if self._model is not model:
                self._model, self._verified = model, ix.store.meta("model")  # later versions: not reloaded
        return model

    @property
    def dim(self) -> int:
        with self.lease() as ix:
            return ix.dim

    def search(self, *args, **kw):
        with self.lease() as ix:
            return ix.search(*args, **kw)

    def search_many(self, queries: Sequence):
        with self.lease() as ix:
            return ix.search_many(queries)

    def vector_of(self, file_id: int):
        with self.lease() as ix:
            return ix.vector_of(file_id)

    def info(self) -> dict:
        with self.lease() as ix:
            return {**ix.info(), "db": str(self.dir), "snapshot": int(ix.dir.name[1:])}


class _LeasedStore:
    """``reader.store.get(ids)`` and the like: the current snapshot's store, leased for the call."""

    def __init__(self, reader: SnapshotReader):
        self._reader = reader

    def __getattr__(self, name: str):
        def call(*args, **kw):
            with self._reader.lease() as ix:
                return getattr(ix.store, name)(*args, **kw)

        return call
