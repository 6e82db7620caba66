"""How a process that runs syncs uses Dagster's storage: it keeps its connections.

On PostgreSQL storage Dagster opens a new connection for every event it stores (two for an
asset event) unless told to keep them, as its webserver does. A sync run stores dozens of events,
and a range run one per partition and asset before it starts: over a thousand for a year of daily
partitions. On SQLite storage there is nothing to keep.
"""

from __future__ import annotations

import threading
import weakref

import dagster as dg

_kept: weakref.WeakSet[dg.DagsterInstance] = weakref.WeakSet()
_lock = threading.Lock()


def keep_connections(instance: dg.DagsterInstance) -> None:
    """Have ``instance``'s storage keep its connections for the rest of this process (once).

    The webserver's settings without its 15 s statement timeout: a sync is not serving the UI.
    """
    with _lock:
        if instance in _kept:
            return
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=4)
        _kept.add(instance)
