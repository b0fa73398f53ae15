"""Embedding image files on a Ray cluster: Ray Data decodes them in tasks, a pool of actors embeds them.

The driver (the process that runs ``mmfusion index --ray`` or ``mmfusion embed --ray``) lists and diffs the
files and consumes the results in order; it alone writes. Each actor holds the model, loaded once: the
driver's own model object travels through Ray's object store, so workers need no access to the driver's
model files, only to the images, at the same paths (a shared volume on a cluster; nothing on one machine).

Faults are Ray's to handle: an actor that dies is restarted and its batch retried (Ray Data's actor pools
restart without limit and retry their tasks), a task that dies is retried, and results still arrive once, in
order. A file that cannot be read or decoded comes back as a row with a reason, never as an error.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..data.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from ..interfaces import Embedder
from .decode import Decoded
from .pipeline import EmbedPipeline, Todo

RAY_MISSING = (
    "--ray needs Ray Data, which is not installed: pip install 'mmfusion[ray]' (or: pip install 'ray[data]'); "
    "or leave out --ray to embed in this process"
)

OK, KNOWN, FAILED = 0, 1, 2  # a row's status: embedded, content already has a vector (not decoded), unreadable


def import_ray():
    """``ray`` with Ray Data, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401  (Ray Data is the part we need; ray without [data] lacks its deps)
    except ImportError as e:
        raise ImportError(RAY_MISSING) from e
    return ray


@dataclass
class RayOptions:
    """How a Ray run spreads the work (``--ray``, ``--actors``, ``--ray-batch-size``, ``--gpus-per-actor``).

    Attributes:
        address: ``local`` starts Ray in this process's machine (stopped at the end), ``auto`` joins the cluster
            that ``ray start`` runs here, ``ray://HOST:PORT`` connects to a remote cluster through Ray Client.
        actors: embedding actors (default: one per GPU when the cluster has GPUs, else one per
            ``cpus_per_actor`` CPUs: on CPUs alone, Ray runs each batch's decoding in the actor that embeds it,
            so every CPU decodes and embeds and no pixels move between processes; with GPUs, decoding runs in
            CPU tasks that feed the GPU actors).
        batch_size: images per model call in an actor.
        cpus_per_actor: CPUs each actor reserves; its PyTorch uses that many threads.
        gpus_per_actor: GPUs each actor reserves (default: 1 when the cluster has GPUs, else 0).
        decode_batch: files per decoding task.
        num_cpus: CPUs of a ``local`` cluster (default: all of this machine's).
    """

    address: str = "local"
    actors: int | None = None
    batch_size: int = 64
    cpus_per_actor: float = 1.0
    gpus_per_actor: float | None = None
    decode_batch: int = 32
    num_cpus: int | None = None


@contextlib.contextmanager
def connected(opts: RayOptions) -> Iterator[object]:
    """Ray, connected as ``opts.address`` says; a local cluster this starts is stopped at the end. A session
    that is already connected (a test's, a notebook's) is used as it is and left running."""
    ray = import_ray()
    quiet = logging.getLogger("ray.data")  # its notices (progress bars off, execution finished) are not the user's
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        if ray.is_initialized():
            yield ray
            return
        with _started(ray, opts):
            yield ray
    finally:
        quiet.setLevel(level)


@contextlib.contextmanager
def _started(ray, opts: RayOptions) -> Iterator[None]:
    if opts.address == "local":
        kwargs = {"num_cpus": opts.num_cpus} if opts.num_cpus else {}
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False, **kwargs)
    else:
        ray.init(address=opts.address, log_to_driver=False, configure_logging=False)
    try:
        yield
    finally:
        ray.shutdown()


def plan_actors(ray, opts: RayOptions) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the connected cluster."""
    res = ray.cluster_resources()
    gpus = float(res.get("GPU", 0))
    per_gpu = opts.gpus_per_actor if opts.gpus_per_actor is not None else (1.0 if gpus else 0.0)
    if opts.actors:
        return opts.actors, opts.cpus_per_actor, per_gpu
    if per_gpu:
        return max(1, int(gpus / per_gpu)), opts.cpus_per_actor, per_gpu
    cpus = float(res.get("CPU", 1))
    return max(1, int(cpus // opts.cpus_per_actor)), opts.cpus_per_actor, 0.0


# ---- the work that runs on the cluster ---------------------------------------------------------------------


def decode_batch(
    batch: dict[str, np.ndarray],
    size: int | None,
    crop: bool,
    draft: bool,
    max_pixels: int | None,
    known_box: list,
) -> dict[str, np.ndarray]:
    """Read, hash and decode a batch of files (a Ray Data task): pixels as raw bytes and a shape, or a reason.

    ``known_box``: ``[ObjectRef]`` of the sorted hex digests that already have a vector (put in the object
    store once, read without a copy by every task); such files are hashed, not decoded.
    """
    import ray

    from .decode import decode_file

    known_hex = ray.get(known_box[0])

    def is_known(digest: bytes) -> bool:
        key = digest.hex().encode()
        i = int(np.searchsorted(known_hex, key))
        return i < len(known_hex) and known_hex[i] == key

    n = len(batch["i"])
    status = np.zeros(n, dtype=np.int8)
    digests, pixels, errors, formats = [b""] * n, [b""] * n, [""] * n, [""] * n
    shapes = np.zeros((n, 3), dtype=np.int32)
    width, height = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    taken = np.full(n, np.nan)
    for j, raw in enumerate(batch["path"]):
        try:
            d = decode_file(os.fsdecode(bytes(raw)), size, max_pixels, draft, is_known, crop)
        except ImageDecodeError as e:
            status[j], errors[j] = FAILED, str(e)
            continue
        digests[j] = d.digest
        if d.pixels is None:
            status[j] = KNOWN
            continue
        arr = np.ascontiguousarray(np.asarray(d.pixels, dtype=np.uint8))
        pixels[j], shapes[j] = arr.tobytes(), arr.shape
        width[j], height[j], formats[j] = d.width, d.height, d.format
        taken[j] = np.nan if d.taken is None else d.taken
    return {
        "i": batch["i"],
        "status": status,
        "digest": np.array(digests, dtype=object),
        "pixels": np.array(pixels, dtype=object),
        "shape": shapes,
        "width": width,
        "height": height,
        "format": np.array(formats, dtype=object),
        "taken": taken,
        "error": np.array(errors, dtype=object),
    }


class EmbedActor:
    """Holds the model (loaded once per actor) and embeds decoded batches (a Ray Data actor's callable).

    Args:
        model_box: ``[ObjectRef]`` of the driver's Embedder (boxed so that Ray hands over the reference and the
            actor fetches the model itself).
        fingerprint: the weights' fingerprint the driver expects; an actor that sees other weights stops the run.
        threads: PyTorch threads (the CPUs the actor reserved).
    """

    def __init__(self, model_box: list, fingerprint: str, threads: int):
        import ray
        import torch

        from ..backends import model_fingerprint
        from .encoder import QueryEncoder

        torch.set_num_threads(max(1, threads))
        model = ray.get(model_box[0])
        if ray.get_gpu_ids() and hasattr(model, "to"):
            model = model.to("cuda")
        if model_fingerprint(model) != fingerprint:
            raise RuntimeError(f"an actor's model has weights {model_fingerprint(model)}, not {fingerprint}")
        self.encoder = QueryEncoder(model)
        self.dim = self.encoder.embed_dim

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from PIL import Image

        n = len(batch["i"])
        vectors = np.zeros((n, self.dim), dtype=np.float32)
        todo = np.flatnonzero(batch["status"] == OK)
        if len(todo):
            pixels = []
            for j in todo:
                arr = np.frombuffer(batch["pixels"][j], dtype=np.uint8).reshape(batch["shape"][j])
                pixels.append(arr if self.encoder.transform is not None else Image.fromarray(arr))
            vectors[todo] = self.encoder.encode_pixels(pixels, self.encoder.transform)
        out = {k: v for k, v in batch.items() if k not in ("pixels", "shape")}
        out["vector"] = vectors
        return out


# ---- the driver's side -------------------------------------------------------------------------------------


@dataclass
class Embedded:
    """One file's result, in the order the files were given."""

    index: int  # position in the list given to :func:`embed_files`
    status: int  # OK, KNOWN or FAILED
    digest: bytes
    vector: np.ndarray | None  # (D,) as the model gave it, for OK rows
    width: int
    height: int
    format: str
    taken: float | None
    error: str


def embed_files(
    ray,
    paths: Sequence[str],
    model: Embedder,
    opts: RayOptions,
    *,
    size: int | None,
    crop: bool,
    draft: bool = True,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    known: frozenset[bytes] = frozenset(),
) -> Iterator[Embedded]:
    """Embed ``paths`` on the connected cluster; yields one :class:`Embedded` per path, in order.

    Args:
        ray: the connected ``ray`` module (:func:`connected`).
        paths: image files, readable at these paths wherever the tasks run.
        model: the Embedder; sent once through the object store to each actor.
        size, crop: how to decode for this model (:func:`~mmfusion.index.encoder.decode_plan`).
        draft, max_pixels: as the plain indexer's.
        known: content hashes that already have a vector: such files are hashed, not decoded or embedded.
    """
    import pyarrow as pa

    from ..backends import model_fingerprint

    if not paths:
        return
    actors, cpus, gpus = plan_actors(ray, opts)
    known_ref = ray.put(np.array(sorted(d.hex().encode() for d in known), dtype="S32"))
    model_ref = ray.put(model)  # held here for the whole run: a restarted actor fetches it again
    table = pa.table(
        {"i": np.arange(len(paths), dtype=np.int64), "path": pa.array([os.fsencode(p) for p in paths], pa.binary())}
    )
    blocks = max(1, min(math.ceil(len(paths) / opts.decode_batch), 4096))
    actors = min(actors, blocks)  # an actor with no block to take would only cost its start
    ctx = ray.data.DataContext.get_current()
    saved = ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start
    ctx.execution_options.preserve_order = True  # results in the order given: the writer's ids are deterministic
    ctx.enable_progress_bars = False  # the driver draws one bar for the whole run
    ctx.print_on_execution_start = False
    try:
        step = math.ceil(len(table) / blocks)
        # blocks made here, not by a repartition: its split tasks would wait for CPUs that the actors hold
        ds = ray.data.from_arrow([table.slice(o, step) for o in range(0, len(table), step)])
        ds = ds.map_batches(
            decode_batch,
            batch_size=opts.decode_batch,
            batch_format="numpy",
            fn_kwargs={"size": size, "crop": crop, "draft": draft, "max_pixels": max_pixels, "known_box": [known_ref]},
            num_cpus=1,
        )
        ds = ds.map_batches(
            EmbedActor,
            batch_size=opts.batch_size,
            batch_format="numpy",
            fn_constructor_args=([model_ref], model_fingerprint(model), max(1, int(cpus))),
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=cpus,
            num_gpus=gpus,
        )
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2):
            for j in range(len(batch["i"])):
                status = int(batch["status"][j])
                t = float(batch["taken"][j])
                yield Embedded(
                    int(batch["i"][j]),
                    status,
                    bytes(batch["digest"][j]),
                    batch["vector"][j] if status == OK else None,
                    int(batch["width"][j]),
                    int(batch["height"][j]),
                    str(batch["format"][j]),
                    None if math.isnan(t) else t,
                    str(batch["error"][j]),
                )
    finally:  # a notebook's own datasets keep its settings
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = saved


# ---- indexing through Ray ----------------------------------------------------------------------------------


class RayEmbedPipeline(EmbedPipeline):
    """The indexer's pipeline with decoding and embedding on a Ray cluster; this process stays the one writer.

    Results are taken in order exactly as the plain pipeline takes them (reused vectors, renames, duplicates,
    chunked commits), so a run gives the rows a plain run gives. A file whose content was known when the run
    started but whose only row went earlier in the run is embedded here at the end (rare: a few files).
    """

    def __init__(self, ray, ray_opts: RayOptions, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ray, self.ray_opts = ray, ray_opts

    def run(self, todo: list[Todo]) -> None:
        from tqdm.auto import tqdm

        enc, opts = self.encoder, self.opts
        redo: list[Todo] = []
        bar = tqdm(total=len(todo), unit="file", desc="index (ray)", disable=not opts.progress or not todo)
        try:
            results = embed_files(
                self.ray, [f.path for f, _ in todo], enc.embedder, self.ray_opts, size=enc.size, crop=enc.crop,
                draft=opts.draft, max_pixels=opts.max_pixels, known=frozenset(self.known),
            )  # fmt: skip
            for r in results:
                bar.update(1)
                f, row = todo[r.index]
                if r.status == FAILED:
                    self.report.skipped.append((f.path, r.error))
                    continue
                d = Decoded(r.digest, None, r.width, r.height, r.format, r.taken)
                if r.status == OK:
                    self.embedded += 1
                    self.report.model_calls += 1  # an actor embedded it, whether or not its vector is used
                if (r.status == KNOWN or r.digest in self.embedded_now) and self._reuse(f, row, d):
                    pass
                elif r.status == KNOWN:  # its content's only row went earlier in this run
                    redo.append((f, row))
                else:
                    self._write_vector(f, row, d, r.vector)
                self.writer.maybe_commit()
        finally:
            bar.close()
        if redo:
            super().run(redo)
