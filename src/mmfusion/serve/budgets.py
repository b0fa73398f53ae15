"""What one request may ask of the models: inputs, query terms, prompts and characters of text.

Each check runs where a route has parsed its body and before any model work, and refuses with 413 naming the
limit and the setting that raises it. The limits are :class:`~.settings.ServeSettings` fields
(``max_inputs``, ``max_search_terms``, ``max_prompts``, ``max_chars``), so one place holds each number.
"""

from __future__ import annotations

from collections.abc import Iterable

from fastapi import HTTPException

from .settings import ServeSettings


def _over(what: str, n: int, limit: int, setting: str) -> HTTPException:
    flag = "--" + setting.replace("_", "-")
    return HTTPException(413, f"{n:,} {what} in one request; the limit is {limit:,} (the service's {flag})")


def check_count(what: str, n: int, settings: ServeSettings, setting: str) -> None:
    """413 when ``n`` items of a kind are over the setting named ``setting``."""
    limit = getattr(settings, setting)
    if n > limit:
        raise _over(what, n, limit, setting)


def check_chars(texts: Iterable[str | None], settings: ServeSettings) -> None:
    """413 when the texts hold more characters in all than ``max_chars``; 422 for a text that is not valid
    Unicode (a lone surrogate, which JSON's ``\\ud800`` escapes can carry and no tokenizer takes)."""
    texts = [t for t in texts if t]
    n = sum(map(len, texts))
    if n > settings.max_chars:
        raise _over("characters of text", n, settings.max_chars, "max_chars")
    for t in texts:
        if not t.isascii():
            try:
                t.encode("utf-8")
            except UnicodeEncodeError as e:
                raise HTTPException(422, f"a text holds a lone surrogate at character {e.start}: send valid "
                                         "Unicode") from None  # fmt: skip
