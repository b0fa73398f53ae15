"""``mmfusion index`` and ``mmfusion search``: keep a collection of images and videos indexed, and search it."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator

from ..config import ConfigError
from .common import add_decode_options, add_ray_options, command, positive_int, ray_options

EXAMPLES_INDEX = """
examples:
  mmfusion index ~/Pictures --model runs/clip --db ~/.mmfusion/photos   # first run: say which model
  mmfusion index ~/Pictures --model hf:openai/clip-vit-base-patch32 --db ~/.mmfusion/clip-b32
  mmfusion index ~/Pictures --db ~/.mmfusion/photos                     # later runs: only what changed
  mmfusion index info --db ~/.mmfusion/photos                           # counts, model, index type, size
  mmfusion index check --db ~/.mmfusion/photos                          # full consistency check
  mmfusion index /data/coco --model runs/clip --db coco --ray           # decode and embed on a local Ray
  mmfusion index /mnt/shared/photos --db photos --ray auto --actors 8   # on the cluster 'ray start' runs
  mmfusion index --from-embeddings embeddings/ --db photos              # from 'mmfusion embed' shards
  mmfusion index ~/Pictures --model runs/clip --db photos --vectors milvus://localhost:19530/photos
  mmfusion index ~/Pictures --model runs/clip --db photos --vectors ~/.mmfusion/vectors.db/photos  # milvus-lite
  mmfusion index rebuild --db photos --vectors milvus://milvus:19530/photos  # move the vectors (from SQLite)
  mmfusion index ~/Pictures --db photos --publish                       # then a snapshot: serve --snapshots
  mmfusion index publish --db photos                                    # publish what is committed now
  mmfusion index ~/Videos --db photos --video-every 2s                  # videos: a frame every 2 s (+ scene cuts)

Re-running costs one stat per unchanged file; renamed and copied files reuse their vectors (a renamed file
keeps its id). A root that is missing or empty (an unmounted disk) removes nothing. Killing a run keeps
every committed chunk; Ctrl-C or SIGTERM also records the run as interrupted and prints what it committed
(exit 130 or 143): re-running resumes.
Video files (.mp4 .m4v .mov .webm .mkv .avi; needs pip install 'mmfusion[video]') are indexed too: a frame
every --video-every seconds and at scene cuts, pooled into segments that search returns with their time range.
(To index a folder literally named 'info', 'check', 'publish' or 'rebuild', write ./info.)
"""

EXAMPLES_SEARCH = """
examples:
  mmfusion search "a dog on a beach" --db ~/.mmfusion/photos
  mmfusion search --image holiday.jpg --db ~/.mmfusion/photos -k 20
  mmfusion search --like 1234 --db ~/.mmfusion/photos             # more like an indexed image (its id)
  mmfusion search "beach" + holiday.jpg - "people" --db ~/.mmfusion/photos
  mmfusion search "0.5*sunset" + id:42 --path '*/2024/*' --after 2024-06-01 --json --db ~/.mmfusion/photos
  mmfusion search "a red circle left of a blue square" --db shapes.index --rerank runs/rerank   # top 20 re-ranked

A video is one result, at its best-matching segment, shown with its time range (00:04-00:06); its other
segments that rank among the first k hits follow it as 'also at' lines (in --json: media, start, end, thumb
and segments).

A query term that names an image file is an image, id:N is an indexed image, anything else is text;
'+' and '-' between terms add or subtract them, 'W*term' weights one.
"""


_VECTORS_HELP = (
    "where the vectors are searched: faiss (default), milvus://HOST:PORT/COLLECTION (a Milvus server; token in "
    "MMFUSION_MILVUS_TOKEN) or PATH.db[/COLLECTION] (milvus-lite, one process); recorded by the index, so later "
    "runs can leave it out"
)


def add_parser(sub) -> None:
    ix = command(
        sub,
        "index",
        cmd_index,
        help="index folders of images for search (incremental, crash-safe)",
        description="Add the images under PATH(s) to the index in --db, or update it: new and changed files are "
        "embedded, renamed and copied ones reuse their vectors, deleted ones are removed. 'index info' and "
        "'index check' describe and verify an index.",
        epilog=EXAMPLES_INDEX,
    )
    ix.add_argument("paths", nargs="*", metavar="PATH", help="folders or files to index (or: info, check)")
    ix.add_argument("--db", required=True, help="index directory (created on first use)")
    ix.add_argument(
        "--model",
        help="the model, needed the first time: a native checkpoint or training run directory, hf:<hub-id> "
        "(a CLIP or SigLIP in the Hugging Face cache) or a save_pretrained directory",
    )
    add_decode_options(ix)
    ix.add_argument(
        "--workers",
        type=positive_int,
        help="decoding threads (default: one per CPU, half of them while the model is the bottleneck)",
    )
    ix.add_argument("--chunk", type=positive_int, default=256, help="files per committed transaction (default 256)")
    ix.add_argument("--json", action="store_true", help="print the run's report (or info) as JSON")
    ix.add_argument(
        "--from-embeddings",
        metavar="DIR",
        help="build the index from embedding shards written by 'mmfusion embed' (no model is run; PATH unused)",
    )
    ix.add_argument("--vectors", metavar="SPEC", help=_VECTORS_HELP + "; 'index rebuild --vectors SPEC' moves them")
    ix.add_argument("--video-every", default="1s", metavar="DURATION",
                    help="videos: sample a frame this often, plus one at each scene cut (default 1s; e.g. 0.5s, "
                    "2s, 500ms); a file already indexed keeps its segments until it changes")  # fmt: skip
    ix.add_argument("--video-similarity", type=float, default=0.9, metavar="COS",
                    help="videos: a frame joins the current segment while its cosine to the segment's mean is at "
                    "least this (default 0.9; a scene cut always starts a new segment)")  # fmt: skip
    ix.add_argument("--no-video", action="store_true", help="leave video files out (and drop those indexed)")
    add_ray_options(ix)
    ix.add_argument(
        "--publish",
        action="store_true",
        help="after the run, publish a snapshot for 'mmfusion serve --snapshots' replicas (DB/snapshots/)",
    )
    ix.add_argument("--keep-snapshots", type=int, default=2, metavar="N",
                    help="with --publish: older versions kept besides the current one (default 2)")  # fmt: skip
    ix.add_argument("--redis", default=os.environ.get("MMFUSION_REDIS_URL"), metavar="URL",
                    help="with --publish: announce the version on this Redis so replicas swap at once "
                    "(default $MMFUSION_REDIS_URL; without it they poll)")  # fmt: skip

    s = command(
        sub,
        "search",
        cmd_search,
        help="search an index by text, by image, or both",
        description="Rank the indexed images by cosine similarity to a query.",
        epilog=EXAMPLES_SEARCH,
    )
    s.add_argument("query", nargs="*", help="text, image files and id:N, joined by + and -")
    s.add_argument("--db", required=True, help="index directory")
    s.add_argument("--image", action="append", default=[], help="an image file to search by (repeatable)")
    s.add_argument("--like", type=int, action="append", default=[], help="an indexed image id (repeatable)")
    s.add_argument("-k", "--top", type=positive_int, default=10, help="results, 1 or more (default 10)")
    s.add_argument("--threshold", type=float, help="drop results below this score (cosine, -1..1)")
    s.add_argument("--path", help="only paths matching this glob ('*/2024/*') or containing this text")
    s.add_argument("--after", help="only images dated on or after (EXIF date, else mtime): YYYY-MM-DD")
    s.add_argument("--before", help="only images dated before: YYYY-MM-DD")
    s.add_argument("--ensemble", action="store_true", help="average text queries over photo prompts")
    s.add_argument("--json", action="store_true", help="print results as JSON")
    s.add_argument("--vectors", metavar="SPEC", help=_VECTORS_HELP + " (another address of the same Milvus)")
    s.add_argument("--rerank", metavar="RUN", help="re-order the top results with a re-ranker that reads the query's "
                   "text against each image: a mmfusion train rerank run, or any captioner run (the likelihood of the "
                   "query's words given the image, mixed with the first stage's similarity)")  # fmt: skip
    s.add_argument("--rerank-k", type=positive_int, default=20, help="with --rerank: results re-ranked (default 20)")


def _is_action(paths: list[str], name: str) -> bool:
    return paths[0] == name and not os.path.exists(name)


def cmd_index(args: argparse.Namespace, extra: list[str]) -> int:
    from ..index import Index

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion index --help")
    if args.from_embeddings:
        return _index_embeddings(args)
    if not args.paths:
        raise ConfigError("say what to index: mmfusion index PATH --db DB (or --from-embeddings DIR)")
    if _is_action(args.paths, "info"):
        with Index.open(args.db, vectors=args.vectors) as ix:
            info = ix.info()
        print(json.dumps(info, indent=2) if args.json else "\n".join(_info_lines(info)))
        return 0
    if _is_action(args.paths, "publish"):
        with Index.open(args.db, write=True) as ix:
            _publish(ix, args, force=True)
        return 0
    if _is_action(args.paths, "rebuild"):
        with Index.open(args.db, write=True) as ix:
            n = ix.rebuild_vectors(args.vectors)
            print(f"rebuilt {n:,} vectors from the database into {ix.vectors_spec.text}")
        return 0
    if _is_action(args.paths, "check"):
        with Index.open(args.db, write=True, vectors=args.vectors) as ix:
            report = ix.check(repair=True, full=True)
        for p in report.problems:
            print(f"problem: {p}")
        for r in report.repaired:
            print(f"repaired: {r}")
        print("index is consistent" if not report.problems else "index repaired" if report.ok else "index is damaged")
        return 0 if report.ok else 1
    ray = ray_options(args)
    video = _video_options(args)
    with _sigterm_interrupts() as received:
        try:
            with Index.open(args.db, model=args.model, write=True, vectors=args.vectors) as ix:
                report = ix.update(
                    args.paths,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    chunk_size=args.chunk,
                    max_pixels=args.max_pixels,
                    draft=not args.full_decode,
                    progress=not args.quiet,
                    ray=ray,
                    video=video,
                )
                _publish(ix, args)
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM: exit 128 + the signal's number, as shells do
            report = getattr(e, "report", None)  # IndexInterrupted: the run is recorded with what it committed
            if report is None:
                print("\ninterrupted before indexing began: nothing was changed", file=sys.stderr)
            else:
                print(file=sys.stderr)
                _print_report(report, args.json)
            return 128 + received[-1]
    _print_report(report, args.json)
    return 0


def _video_options(args: argparse.Namespace):
    """The video options of ``mmfusion index`` (False with --no-video)."""
    from ..index.video import VideoOptions, parse_every

    if args.no_video:
        return False
    if not 0.0 < args.video_similarity <= 1.0:
        raise ConfigError(f"--video-similarity {args.video_similarity}: give a cosine in (0, 1], e.g. 0.9")
    try:
        return VideoOptions(every_s=parse_every(args.video_every), similarity=args.video_similarity)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _index_embeddings(args: argparse.Namespace) -> int:
    """``mmfusion index --from-embeddings DIR``: rows from shards, the model recorded from their manifest."""
    from ..index import Index
    from ..index.shards import read_manifest

    if args.paths:
        raise ConfigError("give either PATH or --from-embeddings DIR, not both")
    if args.model or args.ray:
        raise ConfigError("--from-embeddings runs no model: leave out --model and --ray (the shards name the model)")
    manifest = read_manifest(args.from_embeddings)
    with Index.open(args.db, model=manifest["model"], write=True, vectors=args.vectors) as ix:
        report = ix.add_embeddings(args.from_embeddings, chunk_size=args.chunk, progress=not args.quiet)
        _publish(ix, args)
    _print_report(report, args.json)
    return 0


def _publish(ix, args: argparse.Namespace, force: bool = False) -> None:
    """With --publish (or ``index publish``): the committed state as the next snapshot version."""
    if not (args.publish or force):
        return
    from ..index.snapshots import publish

    done = publish(ix, keep=args.keep_snapshots, redis_url=args.redis)
    gone = f"; removed v{', v'.join(map(str, done.removed))}" if done.removed else ""
    print(f"published snapshot v{done.version} ({done.images:,} images) in {done.path}{gone}", file=sys.stderr)


def _print_report(report, as_json: bool) -> None:
    if as_json:
        from dataclasses import asdict

        print(json.dumps(asdict(report), indent=2))
    else:
        print("\n".join(report.summary()))


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[list[int]]:
    """While indexing, SIGTERM interrupts like Ctrl-C (the run stops cleanly, keeping what it committed); the
    list it yields ends with the number of the signal that came (SIGINT unless SIGTERM did)."""
    received = [int(signal.SIGINT)]

    def on_sigterm(signum, frame):
        received.append(signum)
        raise KeyboardInterrupt("terminated (SIGTERM)")

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield received
        return
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _info_lines(info: dict) -> list[str]:
    lines = [
        f"index:    {info['db']}",
        f"images:   {info['images'] - info.get('videos', 0):,}",
        *([f"videos:   {info['videos']:,} ({info['segments']:,} segments)"] if info.get("videos") else []),
        f"model:    {info['model']} ({info['dim']}-d, weights {info['fingerprint']})",
        f"search:   {info['index_type']}",
        f"vectors:  {info.get('vectors', 'faiss')}",
        f"on disk:  {_human(info['size_on_disk_bytes'])}",
    ]
    for r in info["roots"]:
        lines.append(f"root:     {r['root']} ({r['images']:,} file{'' if r['images'] == 1 else 's'})")
    last = info.get("last_run")
    if last:
        lines.append(
            f"last run: {last.get('added', 0)} added, {last.get('removed', 0)} removed, "
            f"{last.get('skipped', 0)} skipped in {last.get('elapsed_s', 0):.1f}s"
            + (" (interrupted: re-run to finish)" if last.get("interrupted") else "")
        )
    return lines


def cmd_search(args: argparse.Namespace, extra: list[str]) -> int:
    from ..index import Index
    from ..index.query import parse_date
    from ..index.video import format_range

    if extra:  # "-people" arrives here as an unknown option; keep it as a subtracted term
        if any(not t.startswith("-") or t.startswith("--") for t in extra):
            raise ConfigError(f"unrecognised arguments {extra}; see mmfusion search --help")
        args.query += [x for t in extra for x in ("-", t[1:])]
    query = _query_terms(args)
    options = {"threshold": args.threshold, "path": args.path, "after": parse_date(args.after),
               "before": parse_date(args.before), "ensemble": args.ensemble}  # fmt: skip
    with Index.open(args.db, vectors=args.vectors) as ix:
        if args.rerank:
            from ..index.rerank import load_reranker, search_reranked

            results = search_reranked(ix, load_reranker(args.rerank), query, args.top, args.rerank_k, **options)
        else:
            results = ix.search(query, k=args.top, **options)
    if args.json:
        print(json.dumps([r.to_dict() for r in results], indent=2))
        return 0
    if not results:
        print("no results", file=sys.stderr)
        return 0
    width = shutil.get_terminal_size((120, 20)).columns
    print(f"{'#':>3}  {'score':>6}  {'id':>7}  {'size':>9}  {'date':10}  path")
    for rank, r in enumerate(results, 1):
        m = r.metadata
        size = f"{m['width']}x{m['height']}" if m.get("width") else "?"
        date = (m.get("taken") or m.get("modified") or "")[:10]
        when = f"  {format_range(m['start'], m['end'])}" if m.get("media") == "video" else ""
        head = f"{rank:>3}  {r.score:6.3f}  {r.id:>7}  {size:>9}  {date:10}  "
        room = max(8, width - len(head) - len(when))  # a long path gives way at its start: the name and range stay
        print(head + (r.path if len(r.path) <= room else "…" + r.path[-(room - 1) :]) + when)
        for seg in m.get("segments", [])[1:]:
            pad = " " * 38  # under the path
            print(f"{'':>3}  {seg['score']:6.3f}{pad}also at {format_range(seg['start'], seg['end'])}")
    return 0


def _query_terms(args: argparse.Namespace):
    """The positional query plus --image and --like terms, as one list of terms (or None)."""
    from ..index.query import Term, parse_query

    terms = parse_query(args.query) if args.query else []
    terms += [Term(1.0, "image", p) for p in args.image] + [Term(1.0, "id", i) for i in args.like]
    return terms or None
