"""A job worker without HTTP: the :class:`~.service.Service` of a replica, its models and runner, and no routes.

``mmfusion worker --redis URL --captioner ...`` runs :func:`run_worker`: it opens the service (models, the index
for ``mmfusion://images/<id>``, the job store), takes job items until SIGTERM or SIGINT, then stops taking new
ones, finishes the current item within ``grace`` seconds (or hands it back to the queue, unfinished, for another
worker) and returns 0. Workers scale apart from the API replicas: each reads only the queues of the tasks it has
a model for.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable

from .service import Service
from .settings import ServeSettings

log = logging.getLogger(__name__)


async def run_worker(
    settings: ServeSettings, grace: float = 30.0, ready: Callable[[Service], None] | None = None
) -> int:
    """Run job items until a stop signal; 0 after a clean stop.

    Args:
        settings: the models and the store (``redis_url``, or ``jobs_db`` for SQLite jobs on this machine).
        grace: seconds the current item may take to finish after a stop signal before it is handed back.
        ready: called once the models are loaded and items are being taken.
    """
    if not (settings.redis_url or settings.jobs_db):
        raise ValueError("a worker needs a shared job store: give --redis redis://HOST:PORT/DB (or --jobs-db FILE)")
    settings.worker = True
    svc = await Service.open(settings)
    try:
        if svc.jobs is None or not svc.jobs.tasks:
            raise ValueError("nothing to run: give --captioner, --answerer and/or --model (or --db for embeddings)")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        if ready is not None:
            ready(svc)
        await stop.wait()
        log.info("stopping: finishing the current item (up to %.0f s), taking no new ones", grace)
        await svc.jobs.stop(grace)
    finally:
        await svc.close()
    return 0
