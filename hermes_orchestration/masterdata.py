"""Loads validated Hermes clients into the icomm master database, one transaction per load (of
one partition, or of consecutive partitions together).

A load copies the partition's valid rows into a temporary table (``COPY`` on PostgreSQL,
``executemany`` on SQLite) and then merges them with set-based SQL, in one transaction:

1. the master database row is created on first load;
2. the partition's rejected rows replace the ones stored for it;
3. each row is written to ``contact_sources`` only if it is newer than the stored version of its
   client, so that replaying an old partition never overwrites newer data;
4. the contacts of the changed sources (before and after the change) are recomputed field by
   field: each field takes the non-empty value of the most recently updated live source (sources
   updated at the same instant: the greatest value; for ``accepts_marketing``, false). So the
   live contacts never depend on the order of loads. A contact without live sources is
   soft-deleted (``deleted_at``), and revived when a live source comes back. Only the contacts
   the load may change are compared with what is stored; a key that no stored contact and no
   changing source has gets its contact merged from the load's rows alone, and inserted.

Empty values ('' or an empty JSON object) are stored as null, so they never hide another source's
value. On PostgreSQL, loads of one master database are serialized by an advisory lock; on SQLite
by ``BEGIN IMMEDIATE``. Either way concurrent loads give the result of loading one after the other.
On PostgreSQL a load that adds more rows to a master table than it holds builds the table's
indexes after its insert rather than updating them row by row (``_indexes_rebuilt_for``).
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import orjson
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import sqlalchemy as sa
from pgpq import ArrowToPostgresBinaryEncoder
from psycopg import sql as pgsql
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.schema import CreateTable, DropTable

from hermes_orchestration import masterdata_schema as ms
from hermes_orchestration import memory
from hermes_orchestration.masterdata_schema import CONTACT_FIELDS, JSON_FIELDS, UtcDateTime
from hermes_orchestration.records import CLEAN_SCHEMA, CONTACT_TEXT_FIELDS, REJECTED_SCHEMA

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

# Advisory lock namespaces ("HRMS", "HRMT"), keeping these locks apart from other applications'.
_LOAD_LOCK_NAMESPACE = 0x48524D53
_SCHEMA_LOCK_NAMESPACE = 0x48524D54
# serialization_failure, deadlock_detected: safe to retry, the transaction was rolled back.
_RETRYABLE_SQLSTATES = frozenset({"40001", "40P01"})
_MAX_ATTEMPTS = 4
_BATCH_ROWS = 50_000
_KEYS_PER_QUERY = 500  # partition keys asked for at once (within any database's parameters)
_ANALYZE_MIN_ROWS = 10  # working tables smaller than this are not analyzed
_SQLITE_BUSY_SECONDS = 120.0
# SQLite: a load takes the write lock when it begins (no lock upgrade, so no deadlock);
# reads and temporary-table work begin deferred.
_SQLITE_BEGIN_OPTION = "hermes_sqlite_begin"
_SQLITE_BEGIN = {"write": "BEGIN IMMEDIATE", "read": "BEGIN"}

_TEXT_BLANKS = pa.array([""], pa.string())
_JSON_BLANKS = pa.array(["", "{}", "[]", "null"], pa.string())
_NULL_TEXT = pa.scalar(None, pa.string())


class MasterDataError(RuntimeError):
    """A master database operation failed; a failed load wrote nothing."""


class PartitionInputError(MasterDataError, ValueError):
    """The rows handed to a load do not have the expected shape."""


@dataclass(frozen=True)
class LoadResult:
    """What one load of one or more partitions did.

    ``sources_unchanged`` counts the rows that were not newer than the stored version of their
    client (an older or equal version, or a row listed twice in the partition). The contact
    counts sum up to the contacts the load affected.
    """

    master_database: str
    partition_keys: tuple[str, ...]
    rows: int
    sources_inserted: int
    sources_updated: int
    sources_unchanged: int
    contacts_inserted: int
    contacts_updated: int
    contacts_unchanged: int
    contacts_deleted: int
    contacts_revived: int
    rejected: int
    master_database_updated_at: datetime

    @property
    def partition_key(self) -> str:
        """The partition loaded, for the load of one."""
        (key,) = self.partition_keys
        return key

    @classmethod
    def combined(cls, results: Sequence[LoadResult]) -> LoadResult:
        """The results of consecutive loads as one: counts summed, the latest update time."""
        counts = {
            name: sum(getattr(result, name) for result in results)
            for name, value in asdict(results[0]).items()
            if isinstance(value, int)
        }
        return cls(
            master_database=results[-1].master_database,
            partition_keys=tuple(key for result in results for key in result.partition_keys),
            master_database_updated_at=results[-1].master_database_updated_at,
            **counts,
        )

    def as_metadata(self) -> dict[str, int | str]:
        """Plain values for Dagster metadata (the timestamp as ISO 8601 text)."""
        values: dict[str, Any] = asdict(self)
        values["partition_keys"] = ", ".join(self.partition_keys)
        values["master_database_updated_at"] = self.master_database_updated_at.isoformat()
        return values


@dataclass(frozen=True)
class PartitionRows:
    """One partition to load: its valid rows (``CLEAN_SCHEMA``: a table or a stream of batches),
    its rejected rows (``REJECTED_SCHEMA``) and ``content``, a digest of what is loaded, recorded
    with the load (see ``MasterDataStore.unchanged``)."""

    key: str
    valid: pa.Table | Iterable[pa.RecordBatch]
    rejected: pa.Table
    content: str | None = None
    # Whether ``valid`` is known to hold each client once (validation counted no repeated id): the
    # load then does not gather the partition's ids to look for older versions to drop.
    ids_unique: bool = False


def default_masterdata_url(state_dir: Path) -> str:
    """The URL of the local SQLite master database kept under ``state_dir``."""
    path = Path(state_dir) / "masterdata.sqlite"
    return sa.URL.create("sqlite", database=str(path)).render_as_string(hide_password=False)


class MasterDataStore:
    """The icomm master databases behind one SQLAlchemy URL (SQLite or PostgreSQL)."""

    def __init__(self, url: str) -> None:
        try:
            parsed = sa.make_url(url)
        except (ArgumentError, ValueError):
            # The parser's message repeats the URL, password included.
            raise MasterDataError(
                "the master database URL is not a valid SQLAlchemy URL; expected e.g. "
                "sqlite:////path/masterdata.sqlite or postgresql+psycopg://user@host:5432/db"
            ) from None
        if parsed.drivername in ("postgres", "postgresql"):
            parsed = parsed.set(drivername="postgresql+psycopg")
        self._url = parsed
        if parsed.get_backend_name() == "sqlite" and parsed.get_driver_name() == "pysqlite":
            self._engine = _sqlite_engine(parsed)
        elif parsed.drivername == "postgresql+psycopg":
            self._engine = sa.create_engine(parsed, pool_pre_ping=True)
        else:
            raise MasterDataError(
                f"unsupported master database URL {self.display_url}: use sqlite:///<file> "
                "or postgresql+psycopg://<user>@<host>:<port>/<database>"
            )

    def __repr__(self) -> str:
        return f"MasterDataStore({self.display_url!r})"

    @property
    def display_url(self) -> str:
        """The URL with its password masked, for messages and logs."""
        return self._url.render_as_string(hide_password=True)

    @property
    def engine(self) -> Engine:
        """The SQLAlchemy engine, for read-only views of the master data."""
        return self._engine

    def ensure_schema(self) -> None:
        """Create the tables that do not exist yet; safe when several processes call it at once."""
        database = self._url.database
        if self._url.get_backend_name() == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._engine.connect() as conn, _transaction(conn, write=True):
                if conn.dialect.name == "postgresql":
                    conn.execute(
                        sa.select(
                            sa.func.pg_advisory_xact_lock(_int(_SCHEMA_LOCK_NAMESPACE), _int(0))
                        )
                    )
                ms.METADATA.create_all(conn)
                # Tables created by an earlier release: the indexes of this one.
                for index in ms.contact_sources.indexes:
                    index.create(conn, checkfirst=True)
                for name in ms.FORMER_INDEXES:
                    conn.execute(sa.text(f"DROP INDEX IF EXISTS {name}"))  # constant identifiers
        except SQLAlchemyError as err:
            raise MasterDataError(
                f"could not create the master database tables at {self.display_url}: {_reason(err)}"
            ) from err

    def load_partition(
        self,
        *,
        integration: str,
        master_database: str,
        partition_key: str,
        valid: pa.Table | Iterable[pa.RecordBatch],
        rejected: pa.Table,
        content: str | None = None,
    ) -> LoadResult:
        """Merge one partition into ``master_database`` in one transaction (all or nothing).

        ``valid`` holds ``CLEAN_SCHEMA`` rows (a table or a stream of batches) and ``rejected``
        ``REJECTED_SCHEMA`` rows. Loading the same partition again changes nothing.
        ``content``, a digest of what is loaded, is recorded with the load (see ``unchanged``).

        Raises:
            PartitionInputError: the rows do not fit their schema; nothing was written.
            MasterDataError: the database failed; the transaction was rolled back.
        """
        partition = PartitionRows(partition_key, valid, rejected, content)
        return self.load_partitions(
            integration=integration, master_database=master_database, partitions=[partition]
        )

    def load_partitions(
        self, *, integration: str, master_database: str, partitions: Sequence[PartitionRows]
    ) -> LoadResult:
        """Merge consecutive partitions into ``master_database`` in one transaction (all or
        nothing): the master data of loading them one after the other, in their order.

        That includes what their clients did in between: a contact that a client joined in one
        partition and left in a later one is there, deleted, with the content it had just before
        its last source left; a tombstone keeps the email and contact of its client's last live
        version.

        Raises:
            PartitionInputError: the rows do not fit their schema; nothing was written.
            MasterDataError: the database failed; the transaction was rolled back.
        """
        for label, value in (("integration", integration), ("master_database", master_database)):
            _require_text(label, value)
        if not partitions:
            raise PartitionInputError("no partition to load")
        keys = [partition.key for partition in partitions]
        for key in keys:
            _require_text("partition_key", key)
        if len(set(keys)) < len(keys):
            raise PartitionInputError(f"partitions listed twice in one load: {keys}")
        rejected = [
            _rejected_rows(partition.rejected, integration, partition.key)
            for partition in partitions
        ]
        what = f"partition {keys[0]!r}" if len(keys) == 1 else f"partitions {keys[0]}..{keys[-1]}"
        started = time.perf_counter()
        try:
            # preserve_rowcount: the merge counts what it wrote from INSERT ... SELECT row counts.
            with self._engine.connect().execution_options(preserve_rowcount=True) as conn:
                try:
                    staged = _stage(conn, partitions)
                    parts = [
                        _Part(partition.key, rows, rows_rejected, partition.content)
                        for partition, rows, rows_rejected in zip(
                            partitions, staged, rejected, strict=True
                        )
                    ]
                    merge = _Merge(conn, integration, master_database, parts)
                    result = _with_retries(conn, merge.run)
                finally:
                    _drop_stage(conn)
        except (SQLAlchemyError, psycopg.Error) as err:
            raise MasterDataError(
                f"loading {what} of integration {integration!r} into master database "
                f"{master_database!r} at {self.display_url} failed and was rolled back, "
                f"nothing of it was written: {_reason(err)}"
            ) from err
        elapsed = time.perf_counter() - started
        logger.info(
            "Loaded %s of %s into %s: %d rows in %.2f s (%d new, %d updated sources; "
            "%d new, %d updated, %d deleted, %d revived contacts; %d rejected)",
            what, integration, master_database, result.rows, elapsed,
            result.sources_inserted, result.sources_updated, result.contacts_inserted,
            result.contacts_updated, result.contacts_deleted, result.contacts_revived,
            result.rejected,
        )  # fmt: skip
        return result

    def unchanged(
        self, *, integration: str, master_database: str, contents: Mapping[str, str]
    ) -> dict[str, LoadResult]:
        """Of the partitions ``contents`` maps to a content, those whose latest load was of that
        content into ``master_database``: loading them again would change nothing, so nothing
        needs to be done. Their results, by partition key."""
        loads, databases = ms.partition_loads, ms.master_databases
        query = (
            sa.select(
                loads.c.partition_key,
                loads.c.content,
                loads.c.rows,
                loads.c.rejected,
                databases.c.updated_at,
            )
            .join(databases, databases.c.name == loads.c.master_database)
            .where(
                loads.c.integration == integration,
                loads.c.master_database == master_database,
                # Expanded as one parameter per key: a range run asks for a year of days at once.
                loads.c.partition_key.in_(sa.bindparam("keys", expanding=True)),
            )
        )
        what = f"the loads of integration {integration!r}"
        results = {}
        keys, size = list(contents), _KEYS_PER_QUERY
        for start in range(0, len(keys), size):
            for row in self._all(query.params(keys=keys[start : start + size]), what):
                if contents[row.partition_key] != row.content:
                    continue
                results[row.partition_key] = LoadResult(
                    master_database=master_database,
                    partition_keys=(row.partition_key,),
                    rows=row.rows,
                    sources_inserted=0,
                    sources_updated=0,
                    sources_unchanged=row.rows,
                    contacts_inserted=0,
                    contacts_updated=0,
                    contacts_unchanged=0,
                    contacts_deleted=0,
                    contacts_revived=0,
                    rejected=row.rejected,
                    master_database_updated_at=row.updated_at,
                )
        return results

    def refresh_statistics(self) -> None:
        """Have PostgreSQL measure the stored tables again (``ANALYZE``; SQLite needs nothing).

        A range run loads hundreds of partitions in a row. The tables can grow from nothing to
        millions of rows before autovacuum looks at them, and a planner that still believes them
        empty joins them by nested loops.
        """
        if self._engine.dialect.name != "postgresql":
            return
        try:
            with self._engine.connect() as conn, conn.begin():
                # The columns the merge joins and filters on: statistics of the others (the wide
                # text ones) change none of its plans and made this three times slower.
                tables = ", ".join(
                    _analyze_target(conn, table)
                    for table in (ms.contact_sources, ms.master_contacts)
                )
                conn.execute(sa.text(f"ANALYZE {tables}"))  # constant identifiers
        except SQLAlchemyError as err:
            raise MasterDataError(
                f"could not analyze the master tables at {self.display_url}: {_reason(err)}"
            ) from err

    def master_database_info(self, name: str) -> tuple[datetime, datetime] | None:
        """``(created_at, updated_at)`` of a master database, or None if it was never loaded."""
        table = ms.master_databases
        query = sa.select(table.c.created_at, table.c.updated_at).where(table.c.name == name)
        row = self._one(query, f"master database {name!r}")
        return None if row is None else (row.created_at, row.updated_at)

    def _one(self, query: sa.Select[Any], what: str) -> sa.Row[Any] | None:
        """The row of a read-only ``query``, or None; ``what`` names what it reads in errors."""
        return self._read(lambda conn: conn.execute(query).one_or_none(), what)

    def _all(self, query: sa.Select[Any], what: str) -> Sequence[sa.Row[Any]]:
        """The rows of a read-only ``query``; ``what`` names what it reads in errors."""
        return self._read(lambda conn: conn.execute(query).all(), what)

    def _read(self, fetch: Callable[[Connection], _T], what: str) -> _T:
        try:
            with self._engine.connect() as conn, _transaction(conn, write=False):
                return fetch(conn)
        except SQLAlchemyError as err:
            raise MasterDataError(
                f"could not read {what} at {self.display_url}: {_reason(err)}"
            ) from err

    def dispose(self) -> None:
        """Close every pooled connection."""
        self._engine.dispose()


def _sqlite_engine(url: sa.URL) -> Engine:
    if sqlite3.sqlite_version_info < (3, 33):
        raise MasterDataError(
            f"SQLite {sqlite3.sqlite_version} is too old for the master database (UPDATE ... FROM "
            "needs 3.33 or later); use a newer Python build or PostgreSQL"
        )
    engine = sa.create_engine(url, connect_args={"timeout": _SQLITE_BUSY_SECONDS})

    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # pysqlite's own transaction handling would not BEGIN before DDL; SQLAlchemy does it below.
        dbapi_connection.isolation_level = None
        _use_wal(dbapi_connection)

    @sa.event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_SQLITE_BEGIN_OPTION, "write")
        conn.exec_driver_sql(_SQLITE_BEGIN[mode])

    return engine


def _use_wal(dbapi_connection: sqlite3.Connection) -> None:
    """Put the database in WAL mode, so that readers never wait for a load.

    The mode is stored in the file: only the first connection to a new database switches it. That
    switch needs the database to itself, and SQLite may refuse it at once ("database is locked")
    rather than wait when other processes open the new file at the same moment; it is tried
    again until the busy timeout.
    """
    deadline = time.monotonic() + _SQLITE_BUSY_SECONDS
    while True:
        try:
            (mode,) = dbapi_connection.execute("PRAGMA journal_mode").fetchone()
            if mode.lower() != "wal":
                dbapi_connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@contextmanager
def _transaction(conn: Connection, *, write: bool) -> Iterator[None]:
    """A transaction; on SQLite, ``write`` takes the database write lock up front."""
    conn.execution_options(**{_SQLITE_BEGIN_OPTION: "write" if write else "read"})
    with conn.begin():
        yield


def _with_retries(conn: Connection, merge: Callable[[], LoadResult]) -> LoadResult:
    """Run ``merge`` in a write transaction, again if PostgreSQL rolled it back as retryable."""
    for attempt in range(1, _MAX_ATTEMPTS + 1):
        try:
            with _transaction(conn, write=True):
                return merge()
        except DBAPIError as err:
            sqlstate = getattr(err.orig, "sqlstate", None)
            if attempt == _MAX_ATTEMPTS or sqlstate not in _RETRYABLE_SQLSTATES:
                raise
            logger.warning(
                "Retrying the master data merge after %s (attempt %d)", sqlstate, attempt
            )
            time.sleep(0.05 * 2**attempt)
    raise AssertionError("unreachable")


def _require_text(label: str, value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise PartitionInputError(f"{label} must be a non-empty string, got {value!r}")


def _reason(err: BaseException) -> str:
    # The driver's message, without SQLAlchemy's echo of the statement and its parameters.
    orig = getattr(err, "orig", None)
    return str(orig if orig is not None else err).strip()


def _int(value: int) -> sa.BindParameter[int]:
    return sa.literal(value, sa.Integer)


def _text(value: str) -> sa.BindParameter[str]:
    return sa.literal(value, sa.Text)


def _lock_master_database(conn: Connection, name: str) -> None:
    """Serialize the loads of one master database (PostgreSQL; SQLite has one writer anyway)."""
    if conn.dialect.name == "postgresql":
        key = sa.func.hashtext(_text(name))
        conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_int(_LOAD_LOCK_NAMESPACE), key)))


# --- Input -------------------------------------------------------------------------------------


def _conform(table: pa.Table, schema: pa.Schema, what: str) -> pa.Table:
    present = set(table.column_names)  # a new list at each call: read once
    missing = [name for name in schema.names if name not in present]
    if missing:
        raise PartitionInputError(
            f"the {what} rows lack the columns {missing}; they must have {schema.names}"
        )
    table = table.select(schema.names)
    for field in schema:
        nulls = table.column(field.name).null_count
        if not field.nullable and nulls:
            raise PartitionInputError(f"{nulls} {what} rows have no {field.name}; it is required")
    if table.schema.equals(schema):  # as staged: a cast would only copy the columns' handles
        return table
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as err:
        raise PartitionInputError(f"the {what} rows do not fit their schema: {err}") from err


def _blank_to_null(column: pa.ChunkedArray, blanks: pa.Array) -> pa.ChunkedArray:
    is_blank = pc.is_in(pc.utf8_trim_whitespace(column), value_set=blanks)
    return pc.if_else(is_blank, _NULL_TEXT, column)


def _stage_columns(table: pa.Table) -> pa.Table:
    """Valid rows (``CLEAN_SCHEMA``) as ``hermes_stage`` columns (without ``part`` and
    ``ordinal``)."""
    email = pc.utf8_lower(pc.utf8_trim_whitespace(table.column("email")))
    email = _blank_to_null(email, _TEXT_BLANKS)
    live_without_email = pc.and_(pc.is_null(table.column("deleted_at")), pc.is_null(email))
    if pc.any(live_without_email).as_py():
        ids = pc.filter(table.column("hermes_id"), live_without_email)[:5].to_pylist()
        raise PartitionInputError(
            f"valid rows without an email that are not deleted (hermes_id {ids}); "
            "validation must reject them"
        )
    columns: dict[str, Any] = {"hermes_id": table.column("hermes_id"), "email": email}
    for name in CONTACT_FIELDS:
        column = table.column(name)
        if name in CONTACT_TEXT_FIELDS:
            column = _blank_to_null(column, _TEXT_BLANKS)
        elif name in JSON_FIELDS:
            column = _blank_to_null(column, _JSON_BLANKS)
        columns[name] = column
    for name in ("created_at", "updated_at", "deleted_at"):
        columns[name] = table.column(name)
    return pa.table(columns)


def _valid_tables(valid: pa.Table | Iterable[pa.RecordBatch]) -> Iterator[pa.Table]:
    """The valid rows of a partition in ``CLEAN_SCHEMA`` tables of at most ``_BATCH_ROWS``."""
    items = valid.to_batches(max_chunksize=_BATCH_ROWS) if isinstance(valid, pa.Table) else valid
    for item in items:
        if item.num_rows:
            table = item if isinstance(item, pa.Table) else pa.Table.from_batches([item])
            yield _conform(table, CLEAN_SCHEMA, "valid")


def _rejected_rows(rejected: pa.Table, integration: str, partition_key: str) -> pa.Table:
    """``rejected`` as ``rejected_clients`` columns (without ``rejected_at``)."""
    table = _conform(rejected, REJECTED_SCHEMA, "rejected")
    count = table.num_rows
    reasons = [orjson.dumps(codes).decode() for codes in table.column("reasons").to_pylist()]
    return pa.table(
        {
            "integration": pa.array([integration] * count, pa.string()),
            "partition_key": pa.array([partition_key] * count, pa.string()),
            "hermes_id": table.column("hermes_id"),
            "updated_at": table.column("updated_at"),
            "reasons": pa.array(reasons, pa.string()),
            "record": table.column("record"),
        }
    )


# --- Bulk writes -------------------------------------------------------------------------------


def _bulk_insert(conn: Connection, table: sa.Table, data: pa.Table | Iterable[pa.Table]) -> None:
    """Append ``data`` (one table or several, columns named as in ``table``) to ``table`` in the
    open transaction."""
    tables = (data,) if isinstance(data, pa.Table) else data
    if conn.dialect.name == "postgresql":
        _copy(conn, table, tables)
    else:
        for rows in tables:
            if rows.num_rows:
                _executemany(conn, table, rows)


def _copy(conn: Connection, table: sa.Table, tables: Iterable[pa.Table]) -> None:
    """One ``COPY`` of every row of ``tables`` in PostgreSQL's binary format: each table is sent
    by a thread while the next one is made and encoded (one at a time, so at most two are held).

    PostgreSQL reads binary rows in about half the time it parses the same rows as CSV (nothing
    to unquote, no timestamp or date to parse), and pgpq encodes them from Arrow in Rust. Binary
    rows carry no types: each value is read as its column's type, so every column is cast first
    to the Arrow type whose encoding is that of its column (``_wire_schema``).
    """
    tables = (rows for rows in tables if rows.num_rows)
    first = next(tables, None)
    if first is None:
        return
    schema = _wire_schema(table, first.column_names)
    statement = pgsql.SQL("COPY {} ({}) FROM STDIN (FORMAT binary)").format(
        pgsql.Identifier(table.name),
        pgsql.SQL(", ").join(pgsql.Identifier(name) for name in schema.names),
    )
    tables = itertools.chain([first], tables)
    del first  # each table is let go once encoded, the first one too
    encoder = ArrowToPostgresBinaryEncoder(schema)
    driver_connection = conn.connection.driver_connection
    with (
        driver_connection.cursor() as cursor,
        cursor.copy(statement) as copy,
        ThreadPoolExecutor(1, thread_name_prefix="copy") as sender,
    ):
        copy.write(encoder.write_header())
        sending: Future[None] | None = None
        for rows in tables:
            data = b"".join(encoder.write_batch(batch) for batch in rows.cast(schema).to_batches())
            del rows
            if sending is not None:
                sending.result()
                memory.give_back_free_pages()  # what encoding and sending the last one freed
            sending = sender.submit(copy.write, data)
        if sending is not None:
            sending.result()
        copy.write(encoder.finish())


# The Arrow type of each column type whose binary encoding (pgpq's) is the one PostgreSQL reads.
_WIRE_TYPES: dict[type[sa.types.TypeEngine[Any]], pa.DataType] = {
    sa.Text: pa.string(),
    sa.Integer: pa.int32(),
    sa.BigInteger: pa.int64(),
    sa.Boolean: pa.bool_(),
    sa.Date: pa.date32(),
    UtcDateTime: pa.timestamp("us", tz="UTC"),
}


def _wire_schema(table: sa.Table, names: Sequence[str]) -> pa.Schema:
    """The Arrow schema of ``table``'s columns ``names`` in the order given, as ``_copy`` sends
    them."""
    return pa.schema([pa.field(name, _WIRE_TYPES[type(table.c[name].type)]) for name in names])


# An insert of more rows than its table holds: PostgreSQL builds the table's indexes again (a
# sort each) faster than it updates them row by row. For 195,000 new sources: 1.8 s with the
# indexes in place, 0.6 s with them dropped and built again. Below this size it is not worth
# locking the table for.
_REBUILD_MIN_ROWS = 20_000


@dataclass(frozen=True)
class _Index:
    """An index of a table, as PostgreSQL itself would drop and create it."""

    drop: str
    create: str


@contextmanager
def _indexes_rebuilt_for(conn: Connection, table: sa.Table, rows: int) -> Iterator[None]:
    """Around an insert of at least ``rows`` rows into ``table``: on PostgreSQL, if they are
    many and the table holds fewer, drop its indexes (and the constraints they back) before and
    build them again after.

    All of it happens in the load's transaction, so a failure leaves the indexes as they were.
    The table is locked against readers until the load commits, which a first load can afford.
    It is not waited for: if another transaction uses the table (a reader, another load), or an
    index cannot be dropped (another object depends on it), the indexes stay in place.
    """
    if conn.dialect.name != "postgresql" or rows < _REBUILD_MIN_ROWS or _holds(conn, table, rows):
        yield
        return
    indexes = _indexes_of(conn, table)
    name = conn.dialect.identifier_preparer.format_table(table)
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(f"LOCK TABLE {name} IN ACCESS EXCLUSIVE MODE NOWAIT")
            for index in indexes:
                conn.exec_driver_sql(index.drop)
    except DBAPIError as err:
        logger.info("Inserting into %s with its indexes in place: %s", table.name, _reason(err))
        yield
        return
    yield
    for index in indexes:
        conn.exec_driver_sql(index.create)


def _holds(conn: Connection, table: sa.Table, rows: int) -> bool:
    """Whether ``table`` holds at least ``rows`` rows (it reads no more than that many)."""
    some = sa.select(sa.literal(1)).select_from(table).limit(rows).subquery()
    return conn.scalar(sa.select(sa.func.count()).select_from(some)) >= rows


_INDEXES_OF = sa.text(
    """
    SELECT i.indrelid::regclass::text AS table_name,
           i.indexrelid::regclass::text AS index_name,
           pg_get_indexdef(i.indexrelid) AS index_definition,
           quote_ident(c.conname) AS constraint_name,
           pg_get_constraintdef(c.oid) AS constraint_definition
    FROM pg_index AS i
    LEFT JOIN pg_constraint AS c ON c.conindid = i.indexrelid AND c.conrelid = i.indrelid
    WHERE i.indrelid = to_regclass(:table)
    ORDER BY i.indexrelid
    """
)


def _indexes_of(conn: Connection, table: sa.Table) -> list[_Index]:
    """Every index of ``table`` (a constraint's as the constraint), from PostgreSQL's catalog."""
    indexes = []
    for row in conn.execute(_INDEXES_OF, {"table": table.name}):
        if row.constraint_name is None:
            indexes.append(_Index(f"DROP INDEX {row.index_name}", row.index_definition))
        else:
            alter = f"ALTER TABLE {row.table_name}"
            indexes.append(
                _Index(
                    f"{alter} DROP CONSTRAINT {row.constraint_name}",
                    f"{alter} ADD CONSTRAINT {row.constraint_name} {row.constraint_definition}",
                )
            )
    return indexes


def _executemany(conn: Connection, table: sa.Table, data: pa.Table) -> None:
    insert = table.insert().values({name: sa.bindparam(name) for name in data.column_names})
    compiled = insert.compile(dialect=conn.dialect)
    names = compiled.positiontup or []
    columns = [_sqlite_values(data.column(name)) for name in names]
    conn.exec_driver_sql(str(compiled), list(zip(*columns, strict=True)))


def _sqlite_values(column: pa.ChunkedArray) -> list[Any]:
    # The text forms SQLAlchemy itself stores on SQLite, so that values compare as they should.
    if pa.types.is_timestamp(column.type):
        return _utc_text(column).to_pylist()
    if pa.types.is_date(column.type):
        return column.cast(pa.string()).to_pylist()
    return column.to_pylist()


def _utc_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """UTC timestamps as ``YYYY-MM-DD HH:MM:SS.ffffff`` text (fixed width, so sortable)."""
    return column.cast(pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us")).cast(pa.string())


def _stage(conn: Connection, partitions: Sequence[PartitionRows]) -> list[int]:
    """Copy the valid rows of ``partitions`` into ``hermes_stage``, one row per client and
    partition (the newest); the rows staged of each partition.

    Staging has its own transaction: the temporary table outlives it on this connection, so a
    merge that must be retried does not copy the rows again.
    """
    stage = ms.stage
    with _transaction(conn, write=False):
        _tune_planner(conn)
        conn.execute(DropTable(stage, if_exists=True))
        conn.execute(CreateTable(stage))
        staged = _StageBatches(partitions)
        _bulk_insert(conn, stage, staged)
        _prepare_for_joins(conn, stage, staged.total)
        if len(partitions) > 1:
            conn.execute(DropTable(ms.repeated, if_exists=True))
            conn.execute(CreateTable(ms.repeated))
            repeated = pa.table({"hermes_id": staged.repeated()})
            _bulk_insert(conn, ms.repeated, repeated)
            _prepare_for_joins(conn, ms.repeated, repeated.num_rows)
        if staged.distinct < staged.total:
            # A client listed twice in a partition keeps its newest version there (the last one
            # listed on a tie).
            newer = stage.alias("newer")
            is_newer = sa.or_(
                newer.c.updated_at > stage.c.updated_at,
                sa.and_(
                    newer.c.updated_at == stage.c.updated_at, newer.c.ordinal > stage.c.ordinal
                ),
            )
            superseded = sa.exists().where(
                newer.c.part == stage.c.part, newer.c.hermes_id == stage.c.hermes_id, is_newer
            )
            conn.execute(sa.delete(stage).where(superseded))
    return staged.rows


class _StageBatches:
    """The valid rows of a load's partitions as batches of ``hermes_stage`` rows (iterated once;
    the small partitions of a range run are converted together), and what was counted of them."""

    def __init__(self, partitions: Sequence[PartitionRows]) -> None:
        self._partitions = partitions
        self.rows: list[int] = []  # staged of each partition
        self.total = 0
        self.distinct = 0  # clients, counted partition by partition
        self._ids: list[pa.Array] = []  # of every row, if there are several partitions

    def __iter__(self) -> Iterator[pa.Table]:
        pending: list[tuple[int, pa.Table]] = []  # (part, its valid rows) not converted yet
        for part, partition in enumerate(self._partitions):
            count = 0
            ids: list[pa.Array] = []  # of a partition not known to hold each client once
            for table in _valid_tables(partition.valid):
                if pending and sum(t.num_rows for _, t in pending) + table.num_rows > _BATCH_ROWS:
                    yield self._converted(pending)
                pending.append((part, table))
                if not partition.ids_unique:
                    ids.extend(table.column("hermes_id").chunks)
                if len(self._partitions) > 1:
                    self._ids.extend(table.column("hermes_id").chunks)
                count += table.num_rows
            self.rows.append(count)
            if partition.ids_unique:
                self.distinct += count
            elif ids:
                self.distinct += pc.count_distinct(pa.chunked_array(ids)).as_py()
        if pending:
            yield self._converted(pending)

    def repeated(self) -> pa.Array:
        """The ids of more than one row (after iterating): Arrow counts them in a fraction of
        the time a ``GROUP BY`` of the staged rows takes."""
        if not self._ids:
            return pa.array([], pa.string())
        counts = pc.value_counts(pa.chunked_array(self._ids, pa.string()))
        return counts.field("values").filter(pc.greater(counts.field("counts"), 1))

    def _converted(self, pending: list[tuple[int, pa.Table]]) -> pa.Table:
        batch = _stage_columns(pa.concat_tables([table for _, table in pending]))
        count = batch.num_rows
        numbers = pa.array(range(self.total, self.total + count), pa.int64())
        parts = pa.concat_arrays(
            [pa.repeat(pa.scalar(part, pa.int32()), table.num_rows) for part, table in pending]
        )
        self.total += count
        pending.clear()
        return batch.add_column(0, "ordinal", numbers).add_column(0, "part", parts)


def _drop_stage(conn: Connection) -> None:
    if conn.invalidated:
        return
    try:
        with _transaction(conn, write=False):
            conn.execute(DropTable(ms.stage, if_exists=True))
            conn.execute(DropTable(ms.repeated, if_exists=True))
    except SQLAlchemyError:
        # The temporary table ends with its session; a connection in doubt is not pooled again.
        conn.invalidate()


# --- Merge -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    """A staged partition of a load (its ``part`` in the stage table is its position)."""

    key: str
    rows: int
    rejected: pa.Table  # ``rejected_clients`` columns
    content: str | None


class _Merge:
    """The set-based merge of the staged partitions, run inside the load transaction.

    Several partitions are merged ``together``: each client's latest version is what is
    written, and each contact left without live sources by the end gets the content and the
    deletion time of its last death among the partitions (``_collect_dying``).
    """

    def __init__(
        self, conn: Connection, integration: str, master_database: str, parts: Sequence[_Part]
    ) -> None:
        self.conn = conn
        self.integration = integration
        self.master_database = master_database
        self.parts = parts
        self.together = len(parts) > 1
        self.now = datetime.now(UTC)  # the load time, set again by each attempt

    def run(self) -> LoadResult:
        """Merge and count; the caller commits."""
        conn = self.conn
        self.now = datetime.now(UTC)
        _lock_master_database(conn, self.master_database)
        _tune_planner(conn)
        self._ensure_master_database()
        self._replace_rejected()
        tables = ms.MERGE_TABLES + (ms.GROUP_TABLES if self.together else ())
        for table in tables:
            conn.execute(DropTable(table, if_exists=True))
            conn.execute(CreateTable(table))
        changes = self._collect_changed()
        sources_inserted, sources_updated = changes.new, changes.updated
        contacts = _ContactCounts()
        if sources_inserted or sources_updated:
            touched = self._lock_other_master_databases() if changes.were_live else []
            # The contacts of keys no stored contact and no changing client has yet are merged
            # from the load's rows alone and inserted; only the affected ones are compared.
            affected, stored = self._collect_affected(all_live=not changes.moving)
            new = self._insert_new_contacts(changes.moving) if changes.moving else 0
            if affected:
                if self.together:
                    self._collect_dying()
                merged = self._merge_contacts()
                # At least this many contacts are new: those merged beyond the ones stored.
                contacts = self._write_contacts(affected, new_at_least=merged - stored)
            contacts = replace(contacts, inserted=contacts.inserted + new)
            self._write_sources(new=sources_inserted, updated=sources_updated)
            table = ms.master_databases
            conn.execute(
                sa.update(table)
                .where(table.c.name.in_([self.master_database, *touched]))
                .values(updated_at=self.now)
            )
        for table in reversed(tables):
            conn.execute(DropTable(table))
        self._record_loads()
        updated_at = conn.scalar(
            sa.select(ms.master_databases.c.updated_at).where(
                ms.master_databases.c.name == self.master_database
            )
        )
        rows = sum(part.rows for part in self.parts)
        return LoadResult(
            master_database=self.master_database,
            partition_keys=tuple(part.key for part in self.parts),
            rows=rows,
            sources_inserted=sources_inserted,
            sources_updated=sources_updated,
            sources_unchanged=rows - sources_inserted - sources_updated,
            contacts_inserted=contacts.inserted,
            contacts_updated=contacts.updated,
            contacts_unchanged=contacts.unchanged,
            contacts_deleted=contacts.deleted,
            contacts_revived=contacts.revived,
            rejected=sum(part.rejected.num_rows for part in self.parts),
            master_database_updated_at=updated_at,
        )

    def _ensure_master_database(self) -> None:
        table = ms.master_databases
        upsert = postgresql.insert if self.conn.dialect.name == "postgresql" else sqlite.insert
        statement = upsert(table).values(
            name=self.master_database, created_at=self.now, updated_at=self.now
        )
        self.conn.execute(statement.on_conflict_do_nothing(index_elements=[table.c.name]))

    def _record_loads(self) -> None:
        """Note what this load loaded of each partition (forgotten when its content is not
        known)."""
        table = ms.partition_loads
        keys = [part.key for part in self.parts]
        self.conn.execute(
            sa.delete(table).where(
                table.c.integration == self.integration, table.c.partition_key.in_(keys)
            )
        )
        loads = [
            {
                "integration": self.integration,
                "partition_key": part.key,
                "master_database": self.master_database,
                "content": part.content,
                "rows": part.rows,
                "rejected": part.rejected.num_rows,
                "loaded_at": self.now,
            }
            for part in self.parts
            if part.content is not None
        ]
        if loads:
            self.conn.execute(sa.insert(table), loads)

    def _replace_rejected(self) -> None:
        table = ms.rejected_clients
        keys = [part.key for part in self.parts]
        self.conn.execute(
            sa.delete(table).where(
                table.c.integration == self.integration, table.c.partition_key.in_(keys)
            )
        )
        rows = pa.concat_tables([part.rejected for part in self.parts])
        rejected_at = pa.repeat(pa.scalar(self.now, pa.timestamp("us", tz="UTC")), rows.num_rows)
        _bulk_insert(self.conn, table, rows.append_column("rejected_at", rejected_at))

    def _collect_changed(self) -> _Changes:
        """Keep the staged rows newer than their stored version, and count them."""
        stage, sources, changed = ms.stage, ms.contact_sources, ms.changed
        query = sa.select(
            stage.c.part,
            stage.c.hermes_id,
            stage.c.email,
            *(stage.c[name] for name in CONTACT_FIELDS),
            stage.c.created_at,
            stage.c.updated_at,
            stage.c.deleted_at,
            sources.c.hermes_id.is_(None),
            sources.c.master_database,
            sources.c.email,
            sa.and_(sources.c.hermes_id.is_not(None), sources.c.deleted_at.is_(None)),
        ).select_from(
            stage.outerjoin(
                sources,
                sa.and_(
                    sources.c.integration == self.integration,
                    sources.c.hermes_id == stage.c.hermes_id,
                ),
            )
        )
        # Strictly newer instants only: an equal or older version changes nothing.
        query = query.where(
            sa.or_(sources.c.hermes_id.is_(None), stage.c.updated_at > sources.c.updated_at)
        )
        columns = [
            "part", "hermes_id", "email", *CONTACT_FIELDS, "created_at", "updated_at", "deleted_at",
            "is_new", "old_master_database", "old_email", "old_live",
        ]  # fmt: skip
        if self.conn.dialect.name == "postgresql" and not self._has_stored_sources():
            _stage_as_changed(self.conn, rows=sum(part.rows for part in self.parts))
        else:
            _fill(self.conn, changed, columns, query)
        if self.together:
            self._collapse_versions()
        is_live = changed.c.deleted_at.is_(None)
        stays = sa.and_(
            changed.c.old_live,
            changed.c.old_master_database == self.master_database,
            changed.c.old_email == changed.c.email,
        )
        new, total, live, were_live, moving = self.conn.execute(
            sa.select(
                sa.func.count().filter(changed.c.is_new),
                sa.func.count(),
                sa.func.count().filter(is_live),
                sa.func.count().filter(changed.c.old_live),
                sa.func.count().filter(is_live, sa.not_(stays)),
            )
        ).one()
        return _Changes(new=new, updated=total - new, live=live, were_live=were_live, moving=moving)

    def _has_stored_sources(self) -> bool:
        """Whether the master data holds any source of the integration (one index lookup)."""
        sources = ms.contact_sources
        stored = sa.exists().where(sources.c.integration == self.integration)
        return bool(self.conn.scalar(sa.select(stored)))

    def _collapse_versions(self) -> None:
        """Note the versions of the clients that can leave a contact on the way (``versions``),
        then keep the latest one of each client, with the email its tombstone keeps if it is
        deleted."""
        conn, changed, versions, chained = self.conn, ms.changed, ms.versions, ms.chained
        several = (
            sa.select(changed.c.hermes_id)
            .where(changed.c.hermes_id.in_(sa.select(ms.repeated.c.hermes_id)))
            .group_by(changed.c.hermes_id)
            .having(sa.func.count() > 1)
        )
        is_chained = changed.c.hermes_id.in_(sa.select(chained.c.hermes_id))
        several_versions = _fill(conn, chained, ["hermes_id"], several)
        columns = [column.name for column in versions.columns]
        _fill(
            conn,
            versions,
            columns,
            sa.select(*(changed.c[name] for name in columns)).where(
                sa.or_(is_chained, changed.c.old_live)
            ),
        )
        if several_versions:
            # Merged one by one, a version not newer than one of an earlier partition changes
            # nothing (looked for among the versions: all of those clients' rows are there).
            earlier = versions.alias("earlier")
            stale = sa.exists().where(
                earlier.c.hermes_id == versions.c.hermes_id,
                earlier.c.part < versions.c.part,
                earlier.c.updated_at >= versions.c.updated_at,
            )
            if conn.execute(sa.delete(versions).where(stale)).rowcount:
                kept = sa.exists().where(
                    versions.c.hermes_id == changed.c.hermes_id, versions.c.part == changed.c.part
                )
                conn.execute(sa.delete(changed).where(is_chained, ~kept))
        # The chains left, with the email of each one's first version and of its last live one
        # (window functions: a join of aggregates is estimated at a row and planned as a loop).
        chain = {"partition_by": versions.c.hermes_id}
        is_live = sa.case((versions.c.deleted_at.is_(None), 1), else_=0)
        ends = sa.select(
            versions.c.hermes_id,
            sa.func.row_number().over(**chain, order_by=versions.c.part).label("position"),
            sa.func.count().over(**chain).label("length"),
            sa.func.max(is_live).over(**chain).label("ever_live"),
            sa.func.first_value(versions.c.email)
            .over(**chain, order_by=(is_live.desc(), versions.c.part.desc()))
            .label("live_email"),
            sa.func.first_value(versions.c.email)
            .over(**chain, order_by=versions.c.part)
            .label("first_email"),
            sa.func.max(versions.c.part).over(**chain).label("last_part"),
        ).subquery("ends")
        ends_kept = sa.select(
            ends.c.hermes_id,
            sa.case((ends.c.ever_live == 1, ends.c.live_email)),
            ends.c.first_email,
            ends.c.last_part,
        ).where(ends.c.position == 1, ends.c.length > 1)
        conn.execute(sa.delete(chained))
        columns = ["hermes_id", "live_email", "first_email", "last_part"]
        if _fill(conn, chained, columns, ends_kept) == 0:
            return
        conn.execute(
            sa.update(changed)
            .where(changed.c.hermes_id == chained.c.hermes_id, changed.c.deleted_at.is_not(None))
            .values(last_live_email=chained.c.live_email, email=chained.c.first_email)
        )
        superseded = sa.exists().where(
            chained.c.hermes_id == changed.c.hermes_id, chained.c.last_part > changed.c.part
        )
        conn.execute(sa.delete(changed).where(superseded))

    def _lock_other_master_databases(self) -> list[str]:
        """Lock the other master databases whose contacts lose a source (a moved integration)."""
        changed = ms.changed
        others = self.conn.scalars(
            sa.select(changed.c.old_master_database)
            .where(changed.c.old_live, changed.c.old_master_database != self.master_database)
            .distinct()
        ).all()
        for name in sorted(others):
            _lock_master_database(self.conn, name)
        return sorted(others)

    def _collect_affected(self, *, all_live: bool) -> tuple[int, int]:
        """Note the affected contacts, snapshot them and gather their live sources; how many are
        affected and how many of them are stored. (``all_live``: every live row of the load
        stays with the contact of its stored version, which is affected.)

        A contact is affected when the load may change one that is stored (it has the key of a
        live version, or of the stored version of a changed source), or when a client of
        partitions merged together has a version with its key (a contact created on the way may
        end deleted). The keys of the other live versions are new: see ``_insert_new_contacts``.
        """
        conn, changed, affected = self.conn, ms.changed, ms.affected
        contacts, sources = ms.master_contacts, ms.contact_sources
        md = _text(self.master_database)
        # One query each (an OR of them would be tested row by row, not joined).
        keys = [
            sa.select(changed.c.old_master_database, changed.c.old_email).where(changed.c.old_live)
        ]
        if not all_live:  # else their keys are those of the stored versions
            has_contact = sa.exists().where(
                contacts.c.master_database == md, contacts.c.email == changed.c.email
            )
            keys.append(
                sa.select(md, changed.c.email).where(changed.c.deleted_at.is_(None), has_contact)
            )
        if self.together:  # every live version of a client with several
            versions, chained = ms.versions, sa.select(ms.chained.c.hermes_id)
            keys.append(
                sa.select(md, versions.c.email).where(
                    versions.c.deleted_at.is_(None), versions.c.hermes_id.in_(chained)
                )
            )
        count = _fill(conn, affected, ["master_database", "email"], sa.union(*keys))
        if count == 0:
            return 0, 0

        snapshot = sa.select(
            contacts.c.id,
            contacts.c.master_database,
            contacts.c.email,
            *(contacts.c[name] for name in CONTACT_FIELDS),
            contacts.c.updated_at,
            contacts.c.deleted_at,
        ).join_from(affected, contacts, _same_key(contacts, affected))
        stored_count = _fill(conn, ms.before, list(snapshot.selected_columns.keys()), snapshot)

        # Every live source of an affected contact once the load is done: the stored ones that
        # the load does not replace (a stored live source is linked to the contact of its key),
        # and the load's own live rows.
        replaced = sa.exists().where(
            sources.c.integration == self.integration, changed.c.hermes_id == sources.c.hermes_id
        )
        stored = (
            sa.select(
                sources.c.master_database,
                sources.c.email,
                sources.c.integration,
                sources.c.hermes_id,
                *(sources.c[name] for name in CONTACT_FIELDS),
                sources.c.updated_at,
            )
            .join_from(ms.before, sources, sources.c.contact_id == ms.before.c.id)
            .where(sources.c.deleted_at.is_(None), ~replaced)
        )
        columns = [c.name for c in ms.candidates.columns]
        incoming = self._incoming(affected=None if all_live else True)
        _fill(conn, ms.candidates, columns, sa.union_all(stored, incoming))
        return count, stored_count

    def _incoming(self, *, affected: bool | None) -> sa.Select[Any]:
        """The load's live rows (of the ``affected`` contacts only, or of the others) as
        candidates (``candidates``' columns)."""
        changed, md = ms.changed, _text(self.master_database)
        query = sa.select(
            md.label("master_database"),
            changed.c.email,
            _text(self.integration).label("integration"),
            changed.c.hermes_id,
            *(changed.c[name] for name in CONTACT_FIELDS),
            changed.c.updated_at,
        ).where(changed.c.deleted_at.is_(None))
        if affected is None:
            return query
        of_affected = sa.exists().where(
            ms.affected.c.master_database == md, ms.affected.c.email == changed.c.email
        )
        return query.where(of_affected if affected else ~of_affected)

    def _collect_dying(self) -> None:
        """Partitions merged together: note the affected contacts that end without live sources
        (``dying``), with the partition in which the last of them left and when, and add to
        ``candidates`` their live sources as they were just before: merged one by one, that is
        the content such a contact keeps, whether it was stored or created on the way.

        A contact's live sources are counted partition by partition: the stored ones, plus the
        versions that join it, minus those that leave it (deleted, or moved to another email).
        """
        conn, versions, moves, dying = self.conn, ms.versions, ms.moves, ms.dying
        md = _text(self.master_database)
        columns = [column.name for column in moves.columns]
        # Only a contact that a source leaves can end without live sources: the others' joins
        # are not counted. And only a client stored live, or with several versions, can leave.
        several = (
            sa.select(versions.c.hermes_id)
            .group_by(versions.c.hermes_id)
            .having(sa.func.count() > 1)
        )
        hops = self._hops(sa.or_(versions.c.old_live, versions.c.hermes_id.in_(several)))
        moved = sa.or_(hops.c.was_in != md, hops.c.was_email != hops.c.email)
        leaves = sa.select(
            hops.c.was_in, hops.c.was_email, hops.c.part, sa.literal(-1), hops.c.left_at,
            hops.c.updated_at,
        ).where(hops.c.was_live, sa.or_(sa.not_(hops.c.live), moved))  # fmt: skip
        if _fill(conn, moves, columns, leaves) == 0:
            return
        left = sa.exists().where(moves.c.master_database == md, moves.c.email == versions.c.email)
        joining = sa.select(versions.c.hermes_id).where(versions.c.deleted_at.is_(None), left)
        hops = self._hops(versions.c.hermes_id.in_(joining))
        moved = sa.or_(hops.c.was_in != md, hops.c.was_email != hops.c.email)
        joins = sa.select(md, hops.c.email, hops.c.part, sa.literal(1), sa.null(), sa.null()).where(
            hops.c.live, sa.or_(sa.not_(hops.c.was_live), moved)
        )
        # The other clients' one version joins its contact, if live (none was live before).
        changed = ms.changed
        newcomers = sa.select(
            md, changed.c.email, changed.c.part, sa.literal(1), sa.null(), sa.null()
        ).where(
            changed.c.deleted_at.is_(None),
            sa.exists().where(moves.c.master_database == md, moves.c.email == changed.c.email),
            ~sa.exists().where(versions.c.hermes_id == changed.c.hermes_id),
        )
        rows = sum(
            conn.execute(sa.insert(moves).from_select(columns, query)).rowcount
            for query in (joins, newcomers)
        )
        _prepare_for_joins(conn, moves, rows)

        before, sources = ms.before, ms.contact_sources
        stored = (
            sa.select(before.c.master_database, before.c.email, sa.func.count().label("sources"))
            .join_from(before, sources, sources.c.contact_id == before.c.id)
            .where(sources.c.deleted_at.is_(None))
            .group_by(before.c.master_database, before.c.email)
            .subquery("stored")
        )
        # Per contact and partition: the change in live sources, and when those leaving left.
        net = (
            sa.select(
                moves.c.master_database,
                moves.c.email,
                moves.c.part,
                sa.func.sum(moves.c.delta).label("delta"),
                sa.func.max(moves.c.left_at).label("left_at"),
                sa.func.max(moves.c.left_updated_at).label("left_updated_at"),
            )
            .group_by(moves.c.master_database, moves.c.email, moves.c.part)
            .subquery("net")
        )
        key = (net.c.master_database, net.c.email)
        start = sa.func.coalesce(stored.c.sources, 0)
        counted = (
            sa.select(
                net,
                (
                    start + sa.func.sum(net.c.delta).over(partition_by=key, order_by=net.c.part)
                ).label("after"),
                (start + sa.func.sum(net.c.delta).over(partition_by=key)).label("at_end"),
            )
            .select_from(net.outerjoin(stored, _same_key(stored, net)))
            .subquery("counted")
        )
        # The partitions in which a contact that ends without live sources lost its last one,
        # the latest first. (Window functions, not joins of aggregates: the planner cannot
        # estimate those, and a wrong guess joins them by nested loops.)
        deaths = (
            sa.select(
                counted,
                sa.func.row_number()
                .over(
                    partition_by=(counted.c.master_database, counted.c.email),
                    order_by=counted.c.part.desc(),
                )
                .label("latest"),
            )
            .where(
                counted.c.after == 0, counted.c.after - counted.c.delta > 0, counted.c.at_end == 0
            )
            .subquery("deaths")
        )
        when = sa.select(
            deaths.c.master_database,
            deaths.c.email,
            deaths.c.part,
            deaths.c.left_at,
            deaths.c.left_updated_at,
        ).where(deaths.c.latest == 1)
        columns = ["master_database", "email", "part", "deleted_at", "updated_at"]
        if _fill(conn, dying, columns, when) == 0:
            return

        # Their sources just before: the stored ones of clients not changed by then (those not
        # changed at all are among the candidates already), and the latest versions by then.
        fields = [*CONTACT_FIELDS, "updated_at"]
        unchanged_by_then = (
            sa.select(
                sources.c.master_database,
                sources.c.email,
                sources.c.integration,
                sources.c.hermes_id,
                *(sources.c[name] for name in fields),
            )
            .join_from(dying, before, _same_key(before, dying))
            .join(sources, sources.c.contact_id == before.c.id)
            .where(
                sources.c.deleted_at.is_(None),
                sources.c.integration == self.integration,
                sa.exists().where(versions.c.hermes_id == sources.c.hermes_id),
                ~sa.exists().where(
                    versions.c.hermes_id == sources.c.hermes_id, versions.c.part < dying.c.part
                ),
            )
        )
        later = versions.alias("later")
        latest_by_then = (
            sa.select(
                md,
                versions.c.email,
                _text(self.integration),
                versions.c.hermes_id,
                *(versions.c[name] for name in fields),
            )
            .join_from(
                dying,
                versions,
                sa.and_(dying.c.master_database == md, dying.c.email == versions.c.email),
            )
            .where(
                versions.c.deleted_at.is_(None),
                versions.c.part < dying.c.part,
                ~sa.exists().where(
                    later.c.hermes_id == versions.c.hermes_id,
                    later.c.part > versions.c.part,
                    later.c.part < dying.c.part,
                ),
            )
        )
        candidates = ms.candidates
        columns = [column.name for column in candidates.columns]
        conn.execute(
            sa.insert(candidates).from_select(
                columns, sa.union_all(unchanged_by_then, latest_by_then)
            )
        )

    def _hops(self, clients: sa.ColumnElement[bool] | None = None) -> sa.Subquery:
        """Each version of partitions merged together (of ``clients`` only, if given), with
        the key of its client's previous version (the stored one for the first) and whether
        that one was live."""
        versions, md = ms.versions, _text(self.master_database)
        chain = {"partition_by": versions.c.hermes_id, "order_by": versions.c.part}
        live = versions.c.deleted_at.is_(None)
        first = sa.func.row_number().over(**chain) == 1
        query = sa.select(
            versions.c.part,
            versions.c.email,
            live.label("live"),
            sa.func.coalesce(versions.c.deleted_at, versions.c.updated_at).label("left_at"),
            versions.c.updated_at,
            sa.case((first, versions.c.old_master_database), else_=md).label("was_in"),
            sa.case(
                (first, versions.c.old_email), else_=sa.func.lag(versions.c.email).over(**chain)
            ).label("was_email"),
            sa.case((first, versions.c.old_live), else_=sa.func.lag(live).over(**chain)).label(
                "was_live"
            ),
        )
        return (query if clients is None else query.where(clients)).subquery("hops")

    def _merge_contacts(self) -> int:
        """Note the content of every affected contact that has a live source; their count."""
        columns = ["master_database", "email", *CONTACT_FIELDS, "updated_at"]
        merged = self._merged(ms.candidates)
        rows = self.conn.execute(sa.insert(ms.after).from_select(columns, merged)).rowcount
        _prepare_for_joins(self.conn, ms.after, rows)
        return rows

    def _merged(self, candidates: sa.Table | sa.Subquery) -> sa.CompoundSelect:
        """The content of each contact of the live sources in ``candidates`` (``after``'s
        columns)."""
        conn, shared = self.conn, ms.shared
        key = [candidates.c.master_database, candidates.c.email]
        several = sa.select(*key).group_by(*key).having(sa.func.count() > 1)
        conn.execute(sa.delete(shared))
        _fill(conn, shared, ["master_database", "email"], several)
        columns = ["master_database", "email", *CONTACT_FIELDS, "updated_at"]
        # Most contacts have one source: their content is that source's, no merge needed.
        single = sa.select(*(candidates.c[name] for name in columns)).where(
            ~sa.exists().where(_same_key(shared, candidates))
        )

        # The others: find for each field the latest instant at which a source has a value,
        # then take the value of that source. Sources updated at the same instant are told apart
        # by their value (the greatest; for accepts_marketing, false): deterministic, and an
        # unsubscribe wins a tie.
        latest = (
            sa.select(
                *key,
                *(
                    sa.func.max(candidates.c.updated_at)
                    .filter(candidates.c[name].is_not(None))
                    .label(name)
                    for name in CONTACT_FIELDS
                ),
                sa.func.max(candidates.c.updated_at).label("updated_at"),
            )
            .join_from(candidates, shared, _same_key(shared, candidates))
            .group_by(*key)
            .subquery("latest")
        )

        def latest_value(name: str) -> sa.ColumnElement[Any]:
            value = sa.case((candidates.c.updated_at == latest.c[name], candidates.c[name]))
            if name == "accepts_marketing":  # PostgreSQL has no min(boolean)
                return sa.cast(sa.func.min(sa.cast(value, sa.Integer)), sa.Boolean)
            return sa.func.max(value)

        merged = (
            sa.select(
                latest.c.master_database,
                latest.c.email,
                *(latest_value(name).label(name) for name in CONTACT_FIELDS),
                sa.func.max(latest.c.updated_at),  # one value per group
            )
            .join_from(candidates, latest, _same_key(latest, candidates))
            .group_by(latest.c.master_database, latest.c.email)
        )
        return sa.union_all(single, merged)

    def _insert_new_contacts(self, moving: int) -> int:
        """Insert the contacts of the live rows whose keys are not affected (at most ``moving``
        rows: those that do not stay with the contact of a stored version), merged from those
        rows alone: no contact has their key, and no source that is stored or changes on the
        way in partitions merged together has it either, so there is nothing to compare with.
        (A new master database's first load is all of them.) How many.
        """
        candidates = self._incoming(affected=False).subquery("candidates")
        after = self._merged(candidates).subquery("after")
        return self._insert_contacts(after, [after.c.updated_at, sa.null()], moving)

    def _insert_contacts(
        self,
        after: sa.FromClause,
        ending: list[sa.ColumnElement[Any]],
        expected: int,
        *,
        rows: sa.FromClause | None = None,
        where: sa.ColumnElement[bool] | None = None,
    ) -> int:
        """Insert as new contacts the contents in ``after`` (of ``rows``, if given, a join of
        it) with ``ending`` (updated_at, deleted_at), about ``expected`` of them (which decides
        whether the indexes are built again); how many."""
        new = sa.select(
            after.c.master_database,
            after.c.email,
            *(after.c[name] for name in CONTACT_FIELDS),
            *ending,
            sa.literal(self.now, UtcDateTime()),
        ).select_from(after if rows is None else rows)
        if where is not None:
            new = new.where(where)
        columns = [
            "master_database", "email", *CONTACT_FIELDS, "updated_at", "deleted_at", "loaded_at",
        ]  # fmt: skip
        contacts = ms.master_contacts
        with _indexes_rebuilt_for(self.conn, contacts, expected):
            return self.conn.execute(sa.insert(contacts).from_select(columns, new)).rowcount

    def _write_contacts(self, affected: int, new_at_least: int) -> _ContactCounts:
        """Insert new contacts, update changed or revived ones, soft-delete those left without
        live sources."""
        conn, contacts, before, after = self.conn, ms.master_contacts, ms.before, ms.after
        dying = ms.dying
        now = sa.literal(self.now, UtcDateTime())
        content = [*CONTACT_FIELDS, "updated_at"]
        live_at_end: list[sa.ColumnElement[bool]] = []
        if self.together:  # a contact created on the way may end deleted
            rows = after.outerjoin(dying, _same_key(dying, after))
            ending = [sa.func.coalesce(dying.c.updated_at, after.c.updated_at), dying.c.deleted_at]
            live_at_end.append(~sa.exists().where(_same_key(dying, after)))
        else:
            rows, ending = after, [after.c.updated_at, sa.null()]
        inserted = self._insert_contacts(
            after,
            ending,
            new_at_least,
            rows=rows,
            where=~sa.exists().where(_same_key(before, after)),
        )

        revived = conn.scalar(
            sa.select(sa.func.count())
            .select_from(before)
            .join(after, _same_key(after, before))
            .where(before.c.deleted_at.is_not(None), *live_at_end)
        )
        differs = sa.or_(
            contacts.c.deleted_at.is_not(None),
            *(contacts.c[name].is_distinct_from(after.c[name]) for name in content),
        )
        rewritten = conn.execute(
            sa.update(contacts)
            .where(contacts.c.id == before.c.id, _same_key(after, before), differs, *live_at_end)
            .values({name: after.c[name] for name in content})
            .values(deleted_at=None, loaded_at=now)
        ).rowcount

        if self.together:
            # Deleted as the last of its sources left, with the content it had just before.
            created = conn.scalar(
                sa.select(sa.func.count())
                .select_from(dying)
                .where(~sa.exists().where(_same_key(before, dying)))
            )
            deleted = conn.execute(
                sa.update(contacts)
                .where(
                    contacts.c.id == before.c.id,
                    _same_key(after, before),
                    _same_key(dying, before),
                )
                .values({name: after.c[name] for name in CONTACT_FIELDS})
                .values(updated_at=dying.c.updated_at, deleted_at=dying.c.deleted_at, loaded_at=now)
            ).rowcount
        else:
            # A live contact left without live sources: every one of them changed in this load
            # (deleted or moved to another email), so its deletion time is theirs.
            created = 0
            orphans, leavers = _orphaned_keys(), _leavers()
            orphaned = (
                sa.select(before.c.id, leavers.c.deleted_at, leavers.c.updated_at)
                .join_from(before, orphans, _same_key(orphans, before))
                .join(leavers, _same_key(leavers, before))
                .subquery()
            )
            deleted = conn.execute(
                sa.update(contacts)
                .where(contacts.c.id == orphaned.c.id)
                .values(
                    deleted_at=orphaned.c.deleted_at,
                    updated_at=orphaned.c.updated_at,
                    loaded_at=now,
                )
            ).rowcount
        return _ContactCounts(
            inserted=inserted - created,
            updated=rewritten - revived,
            unchanged=affected - inserted - rewritten - deleted,
            deleted=deleted + created,
            revived=revived,
        )

    def _write_sources(self, new: int, updated: int) -> None:
        """Write the changed sources (``new`` of them new, ``updated`` replacing a stored
        version), linking live ones to their contact."""
        changed, sources, contacts = ms.changed, ms.contact_sources, ms.master_contacts
        versions = ["created_at", "updated_at", "deleted_at"]
        now = sa.literal(self.now, UtcDateTime())
        is_live = changed.c.deleted_at.is_(None)

        def contact_of(email: sa.ColumnElement[Any]) -> sa.ColumnElement[bool]:
            return sa.and_(
                contacts.c.master_database == self.master_database, contacts.c.email == email
            )

        contact_of_row = contact_of(changed.c.email)
        # A source is linked to the contact of its live version; a tombstone to that of its last
        # live version among partitions merged together, if it had one, else to none.
        linked_email = sa.case((is_live, changed.c.email), else_=changed.c.last_live_email)
        inserted = (
            sa.select(
                _text(self.integration),
                changed.c.hermes_id,
                contacts.c.id,
                _text(self.master_database),
                sa.func.coalesce(linked_email, changed.c.email),
                *(changed.c[name] for name in (*CONTACT_FIELDS, *versions)),
                now,
            )
            .select_from(changed.outerjoin(contacts, contact_of(linked_email)))
            .where(changed.c.is_new)
        )
        columns = [
            "integration", "hermes_id", "contact_id", "master_database", "email",
            *CONTACT_FIELDS, *versions, "loaded_at",
        ]  # fmt: skip
        with _indexes_rebuilt_for(self.conn, sources, new):
            self.conn.execute(sa.insert(sources).from_select(columns, inserted))
        if not updated:
            return

        # The stored version is older (checked again here, under the lock, as a safety net).
        replaces = sa.and_(
            sa.not_(changed.c.is_new),
            sources.c.integration == self.integration,
            sources.c.hermes_id == changed.c.hermes_id,
            changed.c.updated_at > sources.c.updated_at,
        )
        version = {name: changed.c[name] for name in (*CONTACT_FIELDS, *versions)}
        self.conn.execute(
            sa.update(sources)
            .where(replaces, is_live, contact_of_row)
            .values(version)
            .values(
                contact_id=contacts.c.id,
                master_database=self.master_database,
                email=changed.c.email,
                loaded_at=now,
            )
        )
        # A tombstone keeps the source's last known email and contact, so that the contact is
        # deleted only once all of its sources are: the stored ones, or those of its last live
        # version among partitions merged together.
        if self.together:
            self.conn.execute(
                sa.update(sources)
                .where(replaces, ~is_live, contact_of(changed.c.last_live_email))
                .values(
                    contact_id=contacts.c.id,
                    master_database=self.master_database,
                    email=changed.c.last_live_email,
                )
            )
        self.conn.execute(
            sa.update(sources).where(replaces, ~is_live).values(version).values(loaded_at=now)
        )


@dataclass(frozen=True)
class _Changes:
    """The sources a load changes: ``new`` ones, ``updated`` stored ones, how many of them are
    ``live`` now, how many ``were_live`` before, and how many are live and do not stay with the
    contact of a live stored version (``moving``: new, moved or revived)."""

    new: int
    updated: int
    live: int
    were_live: int
    moving: int


@dataclass(frozen=True)
class _ContactCounts:
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    deleted: int = 0
    revived: int = 0


# What ``hermes_changed`` holds of a staged row when its client has no stored source.
_NEW_SOURCE = {"is_new": sa.true(), "old_live": sa.false()}


def _stage_as_changed(conn: Connection, *, rows: int) -> None:
    """Make ``hermes_stage`` the ``hermes_changed`` of a load whose integration has no stored
    source (PostgreSQL), ``rows`` rows at most: every staged row is new, and the stage becomes
    that table by a rename and columns of constant values, which rewrite no row, rather than by
    copying every row (a third of a second per 200,000). Inside the merge's transaction: a merge
    rolled back and tried again finds the stage as it was."""
    stage, changed = ms.stage, ms.changed
    quote = conn.dialect.identifier_preparer.quote
    gone = [column for column in stage.columns if column.name not in changed.columns]
    added = [column for column in changed.columns if column.name not in stage.columns]
    alterations = [f"DROP COLUMN {quote(column.name)}" for column in gone]
    for column in added:
        definition = f"ADD COLUMN {quote(column.name)} {column.type.compile(conn.dialect)}"
        if column.name in _NEW_SOURCE:
            value = _NEW_SOURCE[column.name].compile(dialect=conn.dialect)
            definition += f" NOT NULL DEFAULT {value}"
        elif not column.nullable:
            raise AssertionError(f"no value of {changed.name}.{column.name} for new sources")
        alterations.append(definition)
    conn.execute(DropTable(changed))
    # Constant identifiers and types of the working tables' own definitions.
    conn.execute(sa.text(f"ALTER TABLE {quote(stage.name)} RENAME TO {quote(changed.name)}"))
    conn.execute(sa.text(f"ALTER TABLE {quote(changed.name)} {', '.join(alterations)}"))
    _prepare_for_joins(conn, changed, rows)


def _fill(conn: Connection, table: sa.Table, columns: list[str], query: sa.Select[Any]) -> int:
    """Insert the rows of ``query`` into the working table ``table``; the row count."""
    count = conn.execute(sa.insert(table).from_select(columns, query)).rowcount
    _prepare_for_joins(conn, table, count)
    return count


def _prepare_for_joins(conn: Connection, table: sa.Table, rows: int) -> None:
    """Make a working table of ``rows`` rows ready to be joined: statistics or indexes."""
    if conn.dialect.name == "postgresql":
        # Temporary tables are never analyzed automatically, and without statistics the planner
        # misjudges the joins of large ones by orders of magnitude. A small one is estimated from
        # its size well enough, and an ANALYZE would cost more than any plan it changes.
        if rows < _ANALYZE_MIN_ROWS:
            return
        # Statistics of the joined and filtered columns only: the others cost time, not plans.
        conn.execute(sa.text(f"ANALYZE {_analyze_target(conn, table)}"))  # constant identifiers
    else:
        # SQLite joins by looking rows up in an index (built once, kept up to date after).
        for index in table.indexes:
            index.create(conn, checkfirst=True)


def _analyze_target(conn: Connection, table: sa.Table) -> str:
    """``table (columns)`` for ANALYZE: the columns in its ``info["analyze"]``."""
    quote = conn.dialect.identifier_preparer.quote
    columns = ", ".join(quote(name) for name in table.info["analyze"])
    return f"{quote(table.name)} ({columns})"


def _tune_planner(conn: Connection) -> None:
    """Plan this transaction's statements for a merge (PostgreSQL; ``LOCAL``: this transaction
    only)."""
    if conn.dialect.name == "postgresql":
        # Set-based merges of large partitions sort and hash far more than the 4 MB default.
        conn.execute(sa.text("SET LOCAL work_mem = '128MB'"))
        # The master tables are read by key, and their pages are in memory: an index lookup
        # costs about as much as a page read in order, not four times as much (the default,
        # which is for spinning disks). With it, a small partition is matched to a large
        # master database by index, not by scanning every contact.
        conn.execute(sa.text("SET LOCAL random_page_cost = 1.1"))
        # Working tables are analyzed for their sizes and how many distinct keys they hold: a
        # sample of 3,000 rows tells that as well as the default 30,000, in a fifth of the time.
        conn.execute(sa.text("SET LOCAL default_statistics_target = 10"))


def _orphaned_keys() -> sa.Subquery:
    """The keys of the affected contacts that were live and have no live source left.

    A set difference: PostgreSQL computes it by hashing, however few rows it guesses the
    working tables hold (an anti-join it may plan as a nested loop over both).
    """
    before, after = ms.before, ms.after
    live = sa.select(before.c.master_database, before.c.email).where(before.c.deleted_at.is_(None))
    kept = sa.select(after.c.master_database, after.c.email)
    return sa.except_(live, kept).subquery("orphaned_keys")


def _leavers() -> sa.Subquery:
    """For each contact that changed sources fed before the load: when the last of them left
    (``deleted_at``: deleted or moved to another email) and their latest ``updated_at``.

    Aggregated before it is joined, so that the joins that follow are of a row per contact.
    """
    changed = ms.changed
    return (
        sa.select(
            changed.c.old_master_database.label("master_database"),
            changed.c.old_email.label("email"),
            sa.func.max(sa.func.coalesce(changed.c.deleted_at, changed.c.updated_at)).label(
                "deleted_at"
            ),
            sa.func.max(changed.c.updated_at).label("updated_at"),
        )
        .where(changed.c.old_live)
        .group_by(changed.c.old_master_database, changed.c.old_email)
        .subquery("leavers")
    )


def _same_key(
    left: sa.Table | sa.Subquery, right: sa.Table | sa.Subquery
) -> sa.ColumnElement[bool]:
    return sa.and_(left.c.master_database == right.c.master_database, left.c.email == right.c.email)
