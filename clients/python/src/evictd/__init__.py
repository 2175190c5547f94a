"""evictd's Python client.

- :mod:`evictd.keys`: key rendering, byte for byte as evictd renders;
- :mod:`evictd.layout`: key names, versions, namespace stamps;
- :mod:`evictd.reader` (redis-py) and :mod:`evictd.asyncio.reader`
  (redis.asyncio): the fill guard, tag registration, version keys;
- :class:`LocalCache` and :class:`Subscriber` (:mod:`evictd.asyncio` for
  the asyncio one): an in-process cache kept by evictd's broadcast;
- :func:`current_wal_lsn`: the commit position to wait for (read your writes).

See ``docs/client-python.md`` in evictd's repository.
"""

from typing import Any

from .broadcast import format_lsn, parse_lsn
from .cache import MISSING, LocalCache, LocalTtlError, Metrics
from .keys import KeyTemplate, MissingParameter, NullParameter, RenderError, TemplateError, render
from .layout import (
    DEFAULT_CHANNEL,
    guard_key,
    guard_in_slot,
    namespace_key,
    parse_version,
    stamp,
    tag_key,
    unstamp,
    versioned_key,
)
from .reader import Hit, Miss, begin_fill, fill, fill_through, namespace_version, read, read_version, register, register_at
from .subscriber import Subscriber

__version__ = "0.1.0"

#: Run right after ``COMMIT`` on the same connection: an LSN at or after
#: the end of the commit record, to pass to ``wait_applied``.
CURRENT_WAL_LSN_SQL = "SELECT pg_current_wal_lsn()::text"


def current_wal_lsn(cursor: Any) -> str:
    """The commit position for read-your-writes, from a DB-API cursor
    (psycopg, psycopg2, asyncpg users run :data:`CURRENT_WAL_LSN_SQL`
    themselves) on the connection that just committed."""
    cursor.execute(CURRENT_WAL_LSN_SQL)
    row = cursor.fetchone()
    return str(row[0])


__all__ = [
    "KeyTemplate",
    "TemplateError",
    "RenderError",
    "MissingParameter",
    "NullParameter",
    "render",
    "DEFAULT_CHANNEL",
    "guard_key",
    "guard_in_slot",
    "namespace_key",
    "parse_version",
    "stamp",
    "tag_key",
    "unstamp",
    "versioned_key",
    "Hit",
    "Miss",
    "read",
    "begin_fill",
    "fill",
    "fill_through",
    "register",
    "register_at",
    "read_version",
    "namespace_version",
    "LocalCache",
    "LocalTtlError",
    "Metrics",
    "MISSING",
    "Subscriber",
    "parse_lsn",
    "format_lsn",
    "CURRENT_WAL_LSN_SQL",
    "current_wal_lsn",
]
