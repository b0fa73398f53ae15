"""``mmfusion serve``: the HTTP service (FastAPI + uvicorn, extra ``[serve]``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing

EXAMPLES = """
examples:
  mmfusion serve --db ~/.mmfusion/photos                        # search the index with its own model
  mmfusion serve --model hf:openai/clip-vit-base-patch32        # embeddings only
  # captions and questions too: by runs of mmfusion train caption / vqa, or by Hugging Face models
  mmfusion serve --db runs/demo/index --captioner runs/demo/caption --answerer runs/demo/vqa
  mmfusion serve --db photos/ --captioner hf:Salesforce/blip-image-captioning-base
  mmfusion serve --db photos/ --answerer hf:Qwen/Qwen2.5-VL-3B-Instruct --device cuda
  mmfusion serve --config serve.yaml --port 9000
  mmfusion serve --db photos/ --redis redis://localhost:6379/0 --no-worker   # an API replica: jobs go to
                                                        # mmfusion worker processes, cache and jobs shared in Redis
  MMFUSION_API_KEYS=key1,key2 mmfusion serve --db photos/       # every request needs 'Authorization: Bearer key1'

Routes: POST /v1/embeddings and GET /v1/models (OpenAI shapes; images as data URLs with "modality": "image"),
POST /search (text, image, id or weighted terms; k, threshold, path, after, before), POST /search/upload,
GET /images/{id}, GET /thumbs/{id}, POST /classify, POST /v1/chat/completions (questions and captions; images as
data URLs or mmfusion://images/<id>; stream: true for server-sent events), POST /jobs and GET /jobs/{id}
(captions, answers or embeddings for many images, kept in SQLite or Redis; GET /jobs/{id}/events streams them),
GET /healthz, GET /metrics (Prometheus), and the web page at /. --captioner takes a run of mmfusion train caption
or an hf: BLIP; --answerer a run of mmfusion train vqa (a classifier, or --preset caption-tiny: answers by
generation) or an hf: Qwen2.5-VL.
The OpenAPI page (every body documented) is at /docs. Settings: flags > MMFUSION_<NAME> environment
variables > --config YAML > defaults. The service binds 127.0.0.1 unless --host says otherwise.
"""


# list settings take one value per flag, named in the singular: --label a --label b
REPEATED = {
    "labels": "--label",
    "api_keys": "--api-key",
    "cors_origins": "--cors-origin",
    "allowed_hosts": "--allowed-host",
}


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve embeddings, search and labels over HTTP (OpenAI-compatible)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run the HTTP service on 127.0.0.1 (by default) for an image index and/or a model.",
        epilog=EXAMPLES,
    )
    p.add_argument("--config", help="a YAML file with any of the settings below")
    add_setting_flags(p)
    p.set_defaults(func=cmd_serve)


ALIASES = {"redis_url": ("--redis",)}  # shorter names a flag also answers to


def add_setting_flags(p: argparse.ArgumentParser, only: typing.Collection[str] | None = None) -> None:
    """A flag for every field of :class:`ServeSettings` (or the fields named in ``only``), with its help and
    default: a new setting is added there alone. Flags default to None, so that only the ones given override the
    YAML file and the environment."""
    from ..serve.settings import ServeSettings, setting_types

    types = setting_types()
    for f in dataclasses.fields(ServeSettings):
        if only is not None and f.name not in only:
            continue
        tp = types[f.name]
        kinds = [a for a in typing.get_args(tp) if a is not type(None)] or [tp]
        default = None if f.default is dataclasses.MISSING else f.default
        help = f.metadata.get("help", "") + (f" (default {default})" if default not in (None, "", False) else "")
        if typing.get_origin(tp) is list:
            flag = REPEATED.get(f.name, "--" + f.name.replace("_", "-"))
            p.add_argument(flag, action="append", dest=f.name, metavar=flag[2:].replace("-", "_").upper(),
                           help=help + " (repeatable)")  # fmt: skip
        elif kinds[0] is bool:
            p.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction, default=None,
                           help=help)  # fmt: skip
        else:
            p.add_argument("--" + f.name.replace("_", "-"), *ALIASES.get(f.name, ()), type=kinds[0], help=help)


def cmd_serve(args: argparse.Namespace, extra: list[str]) -> int:
    from ..config import ConfigError

    if extra:
        raise ConfigError(f"unrecognised arguments {extra}; see mmfusion serve --help")
    try:
        import uvicorn
    except ImportError as e:
        raise RuntimeError("the service needs FastAPI and uvicorn: pip install 'mmfusion[serve]'") from e
    from ..serve.app import create_app
    from ..serve.settings import ServeSettings

    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServeSettings)}
    settings = ServeSettings.load(args.config, **flags)
    if not (settings.db or settings.model or settings.captioner or settings.answerer or settings.redis_url):
        raise ValueError("nothing to serve: give --db (an index), --model, --captioner, --answerer and/or --redis")
    app = create_app(settings)  # the models and the index load when the server starts (the app's lifespan)
    print(f"mmfusion serving on http://{settings.host}:{settings.port}  (API docs: /docs)", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=settings.host, port=settings.port,
                                           log_level="warning" if args.quiet else "info"))  # fmt: skip
    server.run()
    if not server.started:  # the start-up failed (a model or the index could not load): uvicorn logged why
        raise RuntimeError("the service did not start; the error is above")
    return 0
