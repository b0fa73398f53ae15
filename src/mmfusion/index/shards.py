"""Embeddings as data: a folder of Parquet shards that ``mmfusion embed`` writes and other tools can read.

A shard directory holds::

    manifest.json          the format, the model (name, reference, weights' fingerprint) and the dimension
    shard-00000.parquet    one row per file: path, root, size, mtime_ns, hash, vector, width, height,
    shard-00001.parquet    format, taken, error (a file that could not be read has an error, and zeros)
    ...

Each shard is written whole (a temporary file, fsynced, renamed) once its files are all embedded, so a run
killed half way keeps every finished shard, and running again embeds only the files that no shard holds
(at their current size and mtime): a finished shard is never redone. A file changed since it was embedded
is embedded again into a new shard; the latest shard wins. ``mmfusion index --from-embeddings`` builds an
index from the shards without the model (:func:`index_embeddings`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..data.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from ..utils.io import atomic_write_json
from .decode import Decoded, decode_file
from .encoder import QueryEncoder
from .pipeline import record_run
from .ray_embed import FAILED, OK, Embedded, RayOptions, connected, embed_files
from .scan import FileEntry, scan
from .store import Store
from .vectors import VectorStore
from .writer import ChunkWriter, IndexReport

FORMAT = "mmfusion-embeddings/1"
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^shard-(\d{5,})\.parquet$")


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError("embedding shards are Parquet files: pip install 'mmfusion[parquet]' (pyarrow)") from e
    return pa, pq


@dataclass
class EmbedReport:
    """What an ``mmfusion embed`` run did."""

    out: str = ""
    files: int = 0  # image files found
    already: int = 0  # held by finished shards at their current size and mtime
    embedded: int = 0
    skipped: list[tuple[str, str]] | None = None  # (path, reason)
    shards_written: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> list[str]:
        rate = self.embedded / self.elapsed_s if self.elapsed_s else 0.0
        lines = [
            f"{self.files} image files: {self.already} already in shards, {self.embedded} embedded "
            f"({rate:.1f}/s), {len(self.skipped or [])} unreadable",
            f"{self.shards_written} new shard(s) in {self.out}",
        ]
        lines += [f"skipped {p}: {why}" for p, why in (self.skipped or [])[:20]]
        return lines


# ---- reading ----------------------------------------------------------------------------------------------------


def read_manifest(out: str | os.PathLike) -> dict:
    path = Path(out) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{out} holds no embeddings ({MANIFEST} is missing): write them with mmfusion embed PATH --out {out}"
        ) from None
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} is not an mmfusion embeddings manifest (format {manifest.get('format')!r})")
    return manifest


def shard_paths(out: str | os.PathLike) -> list[Path]:
    """The finished shards of ``out``, in the order they were written."""
    found = [(int(m.group(1)), p) for p in Path(out).glob("shard-*.parquet") if (m := _SHARD.match(p.name))]
    return [p for _, p in sorted(found)]


def _done(out: Path) -> tuple[set[tuple[bytes, int, int]], int]:
    """(path, size, mtime_ns) of every file the shards hold, and the next shard's number."""
    _, pq = _pyarrow()
    done: set[tuple[bytes, int, int]] = set()
    shards = shard_paths(out)
    for p in shards:
        t = pq.read_table(p, columns=["path_bytes", "size", "mtime_ns"])
        done.update(zip(t["path_bytes"].to_pylist(), t["size"].to_pylist(), t["mtime_ns"].to_pylist()))
    last = int(_SHARD.match(shards[-1].name).group(1)) if shards else -1
    return done, last + 1


# ---- writing ----------------------------------------------------------------------------------------------------


def _schema(dim: int):
    pa, _ = _pyarrow()
    return pa.schema(
        [
            ("path", pa.string()),  # for reading; path_bytes is exact (names that are not UTF-8)
            ("path_bytes", pa.binary()),
            ("root", pa.string()),
            ("size", pa.int64()),
            ("mtime_ns", pa.int64()),
            ("hash", pa.binary()),  # BLAKE2b-128 of the file's bytes
            ("vector", pa.list_(pa.float32(), dim)),  # as the model gave it; zeros when error is set
            ("width", pa.int32()),
            ("height", pa.int32()),
            ("format", pa.string()),
            ("taken", pa.float64()),  # EXIF capture time (unix seconds), null when absent
            ("error", pa.string()),  # why the file could not be embedded; null when it was
        ]
    )


def _write_shard(path: Path, rows: list[tuple[FileEntry, Embedded]], dim: int) -> None:
    """Write one shard whole: a temporary file in the same folder, fsynced, then renamed."""
    pa, pq = _pyarrow()
    vectors = np.zeros((len(rows), dim), dtype=np.float32)
    for j, (_, r) in enumerate(rows):
        if r.status == OK:
            vectors[j] = r.vector
    vec = pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), dim)
    table = pa.table(
        {
            "path": [f.path.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for f, _ in rows],
            "path_bytes": [os.fsencode(f.path) for f, _ in rows],
            "root": [f.root.encode("utf-8", "surrogateescape").decode("utf-8", "replace") for f, _ in rows],
            "size": [f.size for f, _ in rows],
            "mtime_ns": [f.mtime_ns for f, _ in rows],
            "hash": [r.digest if r.status != FAILED else None for _, r in rows],
            "vector": vec,
            "width": [r.width if r.status == OK else None for _, r in rows],
            "height": [r.height if r.status == OK else None for _, r in rows],
            "format": [r.format or None for _, r in rows],
            "taken": [r.taken for _, r in rows],
            "error": [r.error if r.status == FAILED else None for _, r in rows],
        },
        schema=_schema(dim),
    )
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            pq.write_table(table, fh, compression="zstd")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def embed_local(
    paths: Sequence[str],
    encoder: QueryEncoder,
    batch_size: int = 64,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    workers: int | None = None,
) -> Iterator[Embedded]:
    """Embed ``paths`` in this process (decoding in threads ahead of the model); yields one result per path, in
    order, as :func:`~mmfusion.index.ray_embed.embed_files` does on a cluster."""
    from ..utils.threads import configure_threads

    threads = configure_threads(workers=workers).workers

    def decode(path: str):
        try:
            return decode_file(path, encoder.size, max_pixels, draft, crop=encoder.crop)
        except ImageDecodeError as e:
            return str(e)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(range(start, min(start + batch_size, len(paths))))
            decoded = list(pool.map(decode, [paths[i] for i in chunk]))
            good = [j for j, d in enumerate(decoded) if isinstance(d, Decoded)]
            vecs = encoder.encode_pixels([decoded[j].pixels for j in good], encoder.transform) if good else []
            by_j = dict(zip(good, vecs))
            for j, i in enumerate(chunk):
                d = decoded[j]
                if isinstance(d, str):
                    yield Embedded(i, FAILED, b"", None, 0, 0, "", None, d)
                else:
                    yield Embedded(i, OK, d.digest, by_j[j], d.width, d.height, d.format, d.taken, "")


def embed_to_shards(
    roots: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    encoder: QueryEncoder,
    identity: dict,
    *,
    shard_size: int = 10_000,
    batch_size: int = 64,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ray: RayOptions | None = None,
    progress: bool = True,
) -> EmbedReport:
    """Embed the images under ``roots`` into Parquet shards in ``out`` (see the module's docstring).

    Args:
        identity: the model as the index records it: ``name``, ``ref``, ``fingerprint``, ``dim``.
        shard_size: files per shard (the unit of resumption).
        ray: embed on a Ray cluster; None: in this process.

    Raises:
        ValueError: ``out`` holds embeddings of another model.
    """
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    dim = int(identity["dim"])
    manifest = {"format": FORMAT, "model": identity, "dim": dim}
    if (out / MANIFEST).exists():
        old = read_manifest(out)
        if (old["model"]["fingerprint"], old["dim"]) != (identity["fingerprint"], dim):
            raise ValueError(
                f"{out} holds embeddings by {old['model']['ref']} (weights {old['model']['fingerprint']}), not "
                f"{identity['ref']} ({identity['fingerprint']}): write them to another --out"
            )
    else:
        atomic_write_json(out / MANIFEST, manifest)
    for tmp in out.glob(".shard-*.tmp"):  # a shard cut short by a kill: its files are embedded again below
        tmp.unlink(missing_ok=True)
    found = scan([os.fspath(r) for r in roots])
    done, next_shard = _done(out)
    todo = [f for f in found.files if (os.fsencode(f.path), f.size, f.mtime_ns) not in done]
    report = EmbedReport(str(out), len(found.files), len(found.files) - len(todo), skipped=list(found.skipped))
    bar = tqdm(total=len(todo), unit="img", desc="embed", disable=not progress or not todo, smoothing=0.1)
    paths = [f.path for f in todo]

    def results(r) -> Iterator[Embedded]:
        if r is None:
            return embed_local(paths, encoder, batch_size, draft, max_pixels)
        size, crop = encoder.size, encoder.crop
        return embed_files(r, paths, encoder.embedder, ray, size=size, crop=crop, draft=draft, max_pixels=max_pixels)

    rows: list[tuple[FileEntry, Embedded]] = []

    def flush() -> None:
        nonlocal next_shard
        _write_shard(out / f"shard-{next_shard:05d}.parquet", rows, dim)
        next_shard += 1
        report.shards_written += 1
        rows.clear()

    try:
        with connected(ray) if ray is not None else contextlib.nullcontext() as r:
            for e in results(r):
                bar.update(1)
                f = todo[e.index]
                rows.append((f, e))
                if e.status == FAILED:
                    report.skipped.append((f.path, e.error))
                else:
                    report.embedded += 1
                if len(rows) >= shard_size:
                    flush()
            if rows:
                flush()
    finally:
        bar.close()
    report.elapsed_s = time.perf_counter() - t0
    return report


# ---- building an index from shards ------------------------------------------------------------------------------


def index_embeddings(
    store: Store,
    vectors: VectorStore,
    out: str | os.PathLike,
    chunk_size: int,
    save_vectors: Callable[[], None],
    reports_dir: Path,
    progress: bool = True,
) -> IndexReport:
    """Add or update the index's rows from the shards in ``out`` (the latest shard wins for a path); a file whose
    row already holds the same content at the same size and mtime is left as it is. Rows of files that the
    shards do not hold are kept (``mmfusion index PATH`` sweeps removed files). The search structure is then
    rebuilt as the plain indexer would (an IVF trained on a sample when the index is large)."""
    from tqdm.auto import tqdm

    _, pq = _pyarrow()
    t0 = time.perf_counter()
    shards = shard_paths(out)
    latest: dict[bytes, tuple[int, int]] = {}  # path -> (shard, row) of its latest record
    for s, p in enumerate(shards):
        for j, pb in enumerate(pq.read_table(p, columns=["path_bytes"])["path_bytes"].to_pylist()):
            latest[pb] = (s, j)
    report = IndexReport()
    run_id = store.start_run()
    known = store.stats_by_path()
    writer = ChunkWriter(store, vectors, report, chunk_size, 10.0, 60.0, save_vectors)
    bar = tqdm(total=len(latest), unit="img", desc="index", disable=not progress or not latest)
    try:
        for s, p in enumerate(shards):
            t = pq.read_table(p)
            cols = {name: t[name].to_pylist() for name in t.column_names if name != "vector"}
            vecs = t["vector"].combine_chunks().flatten().to_numpy().reshape(len(t), -1)
            for j, pb in enumerate(cols["path_bytes"]):
                if latest[pb] != (s, j):
                    continue
                bar.update(1)
                path = os.fsdecode(pb)
                if cols["error"][j] is not None:
                    report.skipped.append((path, cols["error"][j]))
                    continue
                f = FileEntry(path, cols["root"][j], cols["size"][j], cols["mtime_ns"][j])
                d = Decoded(cols["hash"][j], None, cols["width"][j] or 0, cols["height"][j] or 0,
                            cols["format"][j] or "", cols["taken"][j])  # fmt: skip
                row = known.get(path)
                if row is not None and row[3] == d.digest:
                    if (row[1], row[2]) != (f.size, f.mtime_ns):
                        writer.touch(row[0], f.size, f.mtime_ns)
                    else:
                        report.unchanged += 1
                    continue
                writer.add(f, d, vecs[j].copy(), replaces=row, kind="updated" if row else "added")
                writer.maybe_commit()
        writer.flush()
        if vectors.needs_rebuild():
            vectors.rebuild()
        save_vectors()
    finally:
        bar.close()
    record_run(store, run_id, report, reports_dir, time.perf_counter() - t0)
    return report
