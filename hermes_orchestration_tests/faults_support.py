"""What the reliability tests share: a site that misbehaves on cue, real syncs, table dumps.

- ``FaultProxy``: an HTTP proxy on loopback in front of the simulator that answers the requests
  a rule picks with a fault the simulator cannot time on its own (an answer slower than the
  client's timeout, a held cursor, a site that goes silent after N requests, a rewritten body).
  Every request it saw is recorded, so a test can count faults exactly.
- ``write_integrations`` and ``definitions``: an integrations.yaml and the project's own
  definitions with test-speed retries, a private staging folder and a master database URL read
  from an environment variable of the test's choosing; ``sync`` runs them as the CLI does.
- ``run_in_processes``: syncs that must run at the same time, in worker processes.
- ``load_sequentially``: staged partitions loaded one after another, the reference of a load.
- ``master_data_dump``: the whole master data as comparable values, without the columns that
  record when or in which order rows were written.
- ``fresh_postgres``: a PostgreSQL database of a test's own, dropped afterwards.
- ``LoadBlocker``: stops a PostgreSQL load at its last write, to break it there.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import multiprocessing
import os
import textwrap
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from datetime import date, datetime
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import dagster as dg
import psycopg
import sqlalchemy as sa

from hermes_orchestration import masterdata_schema as ms
from hermes_orchestration.code_location import build_definitions
from hermes_orchestration.config import Integration, IntegrationsConfig, load_integrations
from hermes_orchestration.launch import sync_now
from hermes_orchestration.masterdata import MasterDataStore
from hermes_orchestration.resources import HermesApiResource, MasterDataResource, StagingResource
from hermes_orchestration.staging import REJECTED, VALID, PartitionStaging
from hermes_orchestration_tests.conftest import POSTGRES_ADMIN_URL, TOKEN_ENV

# --- A site that misbehaves on cue -----------------------------------------------------------


@dataclass(frozen=True)
class Forward:
    """Pass the request on, after ``delay`` seconds."""

    delay: float = 0.0


@dataclass(frozen=True)
class Hang:
    """Hold the request unanswered for ``seconds``, then close the connection."""

    seconds: float


@dataclass(frozen=True)
class Drop:
    """Close the connection without an answer."""


@dataclass(frozen=True)
class Rewrite:
    """Pass the request on and make each replacement (old -> new) in the answer's body."""

    replacements: dict[bytes, bytes]


@dataclass(frozen=True)
class Truncate:
    """Pass the request on and send only the first half of the answer's body."""


DOWN_BODY = b'{"error":{"code":"unavailable","message":"the site is down"}}'


@dataclass(frozen=True)
class Respond:
    """Answer ``status`` with ``body`` and a request id, without asking the site."""

    status: int
    body: bytes = DOWN_BODY
    content_type: str | None = "application/json"


Action = Forward | Hang | Drop | Rewrite | Truncate | Respond


@dataclass(frozen=True)
class Seen:
    """A request the proxy received: its number (from 1), path with query, and what it did."""

    number: int
    target: str
    action: Action


Rule = Callable[[int, str], Action]


def forward_all(number: int, target: str) -> Action:
    """The rule of a well-behaved proxy."""
    return Forward()


def always(action: Action) -> Rule:
    """Apply ``action`` to every request."""
    return lambda number, target: action


def from_request(first: int, action: Action, *, until: int | None = None) -> Rule:
    """Forward requests, except those numbered ``first``..``until`` (open-ended if None)."""

    def rule(number: int, target: str) -> Action:
        hit = number >= first and (until is None or number <= until)
        return action if hit else Forward()

    return rule


class FaultProxy:
    """A loopback HTTP proxy in front of ``upstream`` that applies ``rule`` to each request.

    ``rule(number, target)`` gets the request's number (from 1) and its path with query, and
    returns what to do with it. The rule can be changed while the proxy runs.
    """

    def __init__(self, upstream: str, rule: Rule = forward_all) -> None:
        self.upstream = urlsplit(upstream)
        self.rule = rule
        self.seen: list[Seen] = []
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy._handle(self)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._closed = False

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop listening: from now on a connection to ``url`` is refused. Idempotent."""
        if not self._closed:
            self._closed = True
            self._server.shutdown()
            self._server.server_close()

    def count(self, kind: type) -> int:
        """How many requests got an action of type ``kind``."""
        with self._lock:
            return sum(1 for seen in self.seen if isinstance(seen.action, kind))

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        with self._lock:
            number = len(self.seen) + 1
            action = self.rule(number, handler.path)
            self.seen.append(Seen(number, handler.path, action))
        if isinstance(action, Hang):
            time.sleep(action.seconds)
        if isinstance(action, Hang | Drop):
            handler.close_connection = True
            return
        if isinstance(action, Forward) and action.delay:
            time.sleep(action.delay)
        if isinstance(action, Respond):
            headers = [("X-Request-Id", uuid.uuid4().hex)]
            if action.content_type:
                headers.append(("Content-Type", action.content_type))
            self._answer(handler, action.status, headers, action.body)
            return
        try:
            status, headers, body = self._forward(handler)
        except (OSError, http.client.HTTPException):
            # The site dropped the connection unanswered: so does the proxy.
            handler.close_connection = True
            return
        if isinstance(action, Rewrite | Truncate) and status != 200:
            # Only a page is broken; the site's own error answer passes as it is.
            with self._lock:
                self.seen[number - 1] = Seen(number, handler.path, Forward())
        elif isinstance(action, Rewrite):
            for old, new in action.replacements.items():
                body = body.replace(old, new)
        elif isinstance(action, Truncate):
            body = body[: len(body) // 2]
        self._answer(handler, status, headers, body)

    @staticmethod
    def _answer(
        handler: BaseHTTPRequestHandler, status: int, headers: list[tuple[str, str]], body: bytes
    ) -> None:
        with contextlib.suppress(OSError):  # the client may have given up already
            handler.send_response(status)
            for name, value in headers:
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body)

    def _forward(self, handler: BaseHTTPRequestHandler) -> tuple[int, list[tuple[str, str]], bytes]:
        connection = http.client.HTTPConnection(
            self.upstream.hostname, self.upstream.port, timeout=30
        )
        try:
            headers = {
                name: value
                for name in ("Authorization", "Accept", "User-Agent")
                if (value := handler.headers.get(name)) is not None
            }
            connection.request("GET", handler.path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            kept = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() in ("content-type", "x-request-id", "retry-after")
            ]
            return response.status, kept, body
        finally:
            connection.close()


# --- Integrations, definitions and runs ------------------------------------------------------


def write_integrations(
    path: Path,
    *,
    site_url: str | Callable[[str], str],
    names: Sequence[str],
    master_database: str | Callable[[str], str] = "clientes_fallas",
    page_size: int = 50,
    max_requests_per_second: float = 1000,
    token_env: str = TOKEN_ENV,
    start: str = "2026-11-01",
) -> IntegrationsConfig:
    """Write an integrations.yaml of daily integrations on America/Santiago, and load it."""
    entries = []
    for name in names:
        database = master_database(name) if callable(master_database) else master_database
        url = site_url(name) if callable(site_url) else site_url
        entries.append(
            textwrap.dedent(
                f"""\
                  - name: {name}
                    site_url: {url}
                    app_token_env: {token_env}
                    master_database: {database}
                    partitions: {{granularity: daily, start: {start}}}
                    page_size: {page_size}
                    max_requests_per_second: {max_requests_per_second}
                    max_reject_ratio: 0.5
                """
            )
        )
    path.write_text(
        "defaults:\n  timezone: America/Santiago\nintegrations:\n" + "".join(entries),
        encoding="utf-8",
    )
    return load_integrations(path)


def fast_api(**overrides: Any) -> HermesApiResource:
    """Retries fit for tests: short waits, generous attempts, a short timeout."""
    settings: dict[str, Any] = {
        "timeout_seconds": 2.0,
        "max_attempts": 10,
        "max_total_seconds": 60.0,
        "base_delay_seconds": 0.01,
    }
    settings.update(overrides)
    return HermesApiResource(**settings)


def definitions(
    config: IntegrationsConfig,
    *,
    staging: Path,
    masterdata_url_env: str,
    hermes_api: HermesApiResource | None = None,
) -> dg.Definitions:
    """The project's definitions, with the resources of a test."""
    built = build_definitions(config)
    return dg.Definitions(
        assets=built.assets,
        asset_checks=built.asset_checks,
        jobs=built.jobs,
        schedules=built.schedules,
        sensors=built.sensors,
        executor=built.executor,
        resources={
            "hermes_api": hermes_api or fast_api(),
            "masterdata": MasterDataResource(url_env=masterdata_url_env),
            "staging": StagingResource(root=str(staging)),
        },
    )


def memory_instance() -> dg.DagsterInstance:
    """A Dagster instance whose runs and event log live in memory.

    Runs record about three events per partition and asset; an on-disk SQLite event log commits
    each one, which would make the runs of these tests several times slower than their work.
    """
    return dg.DagsterInstance.ephemeral()


def sync(
    defs: dg.Definitions,
    integration: Integration,
    instance: dg.DagsterInstance,
    first: str,
    last: str | None = None,
) -> dg.ExecuteInProcessResult:
    """Sync ``first``..``last`` of ``integration`` as one run, exactly as the CLI does."""
    return sync_now(defs, integration, instance, first=first, last=last)


def log_messages(
    instance: dg.DagsterInstance, run_id: str, level: int = logging.WARNING
) -> list[str]:
    """The run's log messages (not its structured events) at ``level`` or above."""
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if entry.dagster_event is None and entry.level >= level
    ]


def _error_text(error: Any) -> str:
    messages = []
    while error is not None:
        messages.append(error.message.strip())
        error = error.cause
    return "\n".join(messages)


def step_failures(result: dg.ExecuteInProcessResult) -> dict[str, str]:
    """What each failed step's error says, its causes included (no stack traces), by step key."""
    return {
        event.step_key: _error_text(event.event_specific_data.error)
        for event in result.all_events
        if event.is_step_failure
    }


def run_errors(result: dg.ExecuteInProcessResult) -> str:
    """What every error of a run says (steps, resources, the run itself), causes included."""
    return "\n".join(
        _error_text(error)
        for event in result.all_events
        if (error := getattr(event.event_specific_data, "error", None)) is not None
    )


def materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    """The metadata of every materialization of a run, by the asset's last key component."""
    found = {}
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        found[materialization.asset_key.path[-1]] = {
            name: value.value for name, value in materialization.metadata.items()
        }
    return found


# --- Runs in other processes ---------------------------------------------------------------
# Dagster's in-process execution is not thread-safe (it reconfigures logging per run), so runs
# that must happen at the same time run in worker processes, as production runs do.

_WORKER_URL_ENV = "HERMES_WORKER_MASTERDATA_URL"


@dataclass(frozen=True)
class RunRequest:
    """A sync for a worker process to run, as plain values."""

    integrations_file: str
    integration: str
    first: str
    last: str | None
    staging: str
    masterdata_url: str
    token: str
    api: tuple[tuple[str, float], ...] = ()  # HermesApiResource settings


@dataclass(frozen=True)
class RunOutcome:
    """What became of a ``RunRequest``."""

    request: RunRequest
    success: bool
    warnings: tuple[str, ...]
    failures: tuple[tuple[str, str], ...]


def run_requests(requests: Sequence[RunRequest]) -> list[RunOutcome]:
    """Run syncs one after another in this process, recorded in an in-memory Dagster instance."""
    outcomes = []
    built: dict[tuple[str, str, tuple[tuple[str, float], ...]], dg.Definitions] = {}
    with memory_instance() as instance:
        for request in requests:
            os.environ[TOKEN_ENV] = request.token
            os.environ[_WORKER_URL_ENV] = request.masterdata_url
            config = load_integrations(request.integrations_file)
            key = (request.integrations_file, request.staging, request.api)
            if key not in built:
                built[key] = definitions(
                    config,
                    staging=Path(request.staging),
                    masterdata_url_env=_WORKER_URL_ENV,
                    hermes_api=fast_api(**dict(request.api)),
                )
            result = sync(
                built[key], config.get(request.integration), instance, request.first, request.last
            )
            outcomes.append(
                RunOutcome(
                    request=request,
                    success=result.success,
                    warnings=tuple(log_messages(instance, result.run_id)),
                    failures=tuple(step_failures(result).items()),
                )
            )
    return outcomes


def run_in_processes(batches: Sequence[Sequence[RunRequest]]) -> list[RunOutcome]:
    """Run each batch of syncs in a worker process of its own, all batches at once."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=len(batches), mp_context=context) as pool:
        return [outcome for done in pool.map(run_requests, batches) for outcome in done]


def _all_staged(files: PartitionStaging, keys: Sequence[str]) -> bool:
    return all(files.exists(VALID, key) and files.exists(REJECTED, key) for key in keys)


def load_sequentially(
    url: str,
    staging: str,
    plan: Sequence[tuple[str, str, Sequence[str]]],
    timeout: float = 600.0,
) -> int:
    """Load staged partitions into ``url`` one after another, in the order of ``plan``.

    ``plan`` lists (integration, master database, partition keys). Each integration is loaded as
    soon as its validated files are all staged (by runs still going on elsewhere), so this can
    run beside them. Returns the number of partitions loaded.
    """
    store = MasterDataStore(url)
    loaded = 0
    try:
        store.ensure_schema()
        for integration, master_database, keys in plan:
            files = PartitionStaging(Path(staging), integration)
            Until(f"the validated files of {integration}", timeout=timeout, interval=0.2)(
                partial(_all_staged, files, keys)
            )
            for key in keys:
                store.load_partition(
                    integration=integration,
                    master_database=master_database,
                    partition_key=key,
                    valid=files.read(VALID, key),
                    rejected=files.read(REJECTED, key),
                )
                loaded += 1
    finally:
        store.dispose()
    return loaded


# --- Master data --------------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return value.isoformat()
    return value


def master_data_dump(url: str) -> dict[str, list[dict[str, Any]]]:
    """Every row of the master data, as sorted dicts, without ids and load times.

    A source's link to its contact is shown as the contact's (master database, email), which
    does not depend on the order in which contacts were inserted. Tables not created yet are
    empty.
    """
    contacts, sources, rejected = ms.master_contacts, ms.contact_sources, ms.rejected_clients
    linked = contacts.alias("linked")
    queries = {
        "master_databases": sa.select(ms.master_databases.c.name),
        "master_contacts": sa.select(*(c for c in contacts.c if c.name not in ("id", "loaded_at"))),
        "contact_sources": sa.select(
            *(c for c in sources.c if c.name not in ("contact_id", "loaded_at")),
            linked.c.master_database.label("contact_master_database"),
            linked.c.email.label("contact_email"),
        ).select_from(sources.outerjoin(linked, linked.c.id == sources.c.contact_id)),
        "rejected_clients": sa.select(
            *(c for c in rejected.c if c.name not in ("id", "rejected_at"))
        ),
    }
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            existing = set(sa.inspect(conn).get_table_names())
            dump: dict[str, list[dict[str, Any]]] = {}
            for name, query in queries.items():
                rows = conn.execute(query).mappings() if name in existing else []
                plain = [{key: _plain(value) for key, value in row.items()} for row in rows]
                dump[name] = sorted(plain, key=lambda row: repr(tuple(row.values())))
            return dump
    finally:
        engine.dispose()


def renamed(
    dump: dict[str, list[dict[str, Any]]], *, integration: str, master_database: str
) -> dict[str, list[dict[str, Any]]]:
    """A dump of one integration's master data as if another integration and database held it."""
    names = {
        "integration": integration,
        "master_database": master_database,
        "contact_master_database": master_database,
        "name": master_database,
    }
    return {
        table: [
            {key: value if value is None else names.get(key, value) for key, value in row.items()}
            for row in rows
        ]
        for table, rows in dump.items()
    }


def merged(*dumps: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """The union of dumps of master databases that share nothing, sorted as a dump is."""
    return {
        table: sorted(
            (row for dump in dumps for row in dump[table]),
            key=lambda row: repr(tuple(row.values())),
        )
        for table in dumps[0]
    }


def rows_of(url: str, query: str, **params: Any) -> list[tuple[Any, ...]]:
    """The rows of one SQL query with bound parameters."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


@contextlib.contextmanager
def fresh_postgres(password: str | None = None, *, durable: bool = True) -> Iterator[str]:
    """A PostgreSQL database of the caller's own; its URL, with ``password`` if given.

    ``durable=False`` lets commits return before their WAL reaches the disk, for throwaway
    databases of load tests: atomicity and isolation are unchanged, only a server crash could
    lose the last commits.
    """
    name = f"hermes_rel_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
        if not durable:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" SET synchronous_commit = off'))
    url = sa.make_url(POSTGRES_ADMIN_URL).set(database=name)
    if password is not None:
        url = url.set(password=password)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@dataclass
class Until:
    """Polls ``check`` until it returns something truthy, or fails after ``timeout`` seconds."""

    what: str
    timeout: float = 60.0
    interval: float = 0.05
    _started: float = field(default_factory=time.monotonic)

    def __call__(self, check: Callable[[], Any]) -> Any:
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() - self._started > self.timeout:
                raise AssertionError(f"timed out after {self.timeout:g} s waiting for {self.what}")
            time.sleep(self.interval)


# --- A master database load stopped at its last write ---------------------------------------


def _conninfo(url: str) -> str:
    return sa.make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class LoadBlocker:
    """Holds the row of a master database in ``master_databases`` (PostgreSQL).

    A load's last write updates that row, so while it is held a load of that master database
    stops there, with everything else already written in its open transaction: the moment to
    break a connection or kill a process. The row must exist (create it with ``ensure_row``).
    """

    def __init__(self, url: str, master_database: str) -> None:
        self.url = url
        self.master_database = master_database
        self._holder: psycopg.Connection | None = None

    def ensure_row(self) -> None:
        """Create the master data tables and the master database's row, as a first load would."""
        store = MasterDataStore(self.url)
        try:
            store.ensure_schema()
        finally:
            store.dispose()
        with psycopg.connect(_conninfo(self.url), autocommit=True) as conn:
            conn.execute(
                "INSERT INTO master_databases (name, created_at, updated_at) "
                "VALUES (%s, now(), now()) ON CONFLICT DO NOTHING",
                (self.master_database,),
            )

    def hold(self) -> None:
        """Take the row lock (until ``release``)."""
        self._holder = psycopg.connect(_conninfo(self.url))
        found = self._holder.execute(
            "SELECT name FROM master_databases WHERE name = %s FOR UPDATE",
            (self.master_database,),
        ).fetchall()
        assert found, f"master database {self.master_database} has no row to hold"

    def release(self) -> None:
        """Let the held load go on."""
        if self._holder is not None:
            self._holder.rollback()
            self._holder.close()
            self._holder = None

    def blocked_load(self, timeout: float = 120.0) -> int:
        """The backend pid of the load waiting for the row, once there is one."""

        def find() -> int | None:
            with psycopg.connect(_conninfo(self.url), autocommit=True) as conn:
                row = conn.execute(
                    "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query ILIKE 'UPDATE master_databases%%'"
                ).fetchone()
            return row[0] if row else None

        return Until("a load waiting on its master database row", timeout=timeout)(find)

    def terminate(self, pid: int) -> None:
        """End a backend as a failing server or network would: its transaction is rolled back."""
        with psycopg.connect(_conninfo(self.url), autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))

    def wait_gone(self, pid: int, timeout: float = 60.0) -> None:
        """Wait until a backend has ended (and rolled back what it had not committed)."""

        def gone() -> bool:
            with psycopg.connect(_conninfo(self.url), autocommit=True) as conn:
                return conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
                ).fetchone() == (0,)

        Until(f"backend {pid} to end", timeout=timeout)(gone)

    def break_next_load_in_background(self) -> threading.Thread:
        """Hold the row, then end the first load that waits for it and let the rest pass."""
        self.hold()

        def sabotage() -> None:
            try:
                pid = self.blocked_load()
                self.terminate(pid)
                self.wait_gone(pid)
            finally:
                self.release()

        thread = threading.Thread(target=sabotage, daemon=True)
        thread.start()
        return thread
