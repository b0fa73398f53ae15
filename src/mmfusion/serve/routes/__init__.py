"""The service's routes, one :class:`fastapi.APIRouter` per area; :func:`~mmfusion.serve.app.create_app` includes
them all. Every route takes the running service as ``svc: ServiceDep`` and the caller's key as ``key: ApiKey``
(see :mod:`mmfusion.serve.deps`)."""

from . import cards, health, jobs, labels, openai, page, search

ROUTERS = (page.router, health.router, openai.router, search.router, labels.router, jobs.router, cards.router)
