"""The SQL schema of the icomm master database, identical on SQLite and PostgreSQL.

- ``master_databases``: one row per icomm "Base de Datos", created on its first load.
- ``master_contacts``: one contact per (master database, email), merged field by field from
  every source that feeds it. Never hard-deleted: a contact without live sources gets
  ``deleted_at``.
- ``contact_sources``: the latest known version of every Hermes client of every integration,
  with its own field values, so that any contact can be recomputed from its sources.
- ``rejected_clients``: the rows of each partition that validation rejected, with reason codes.
- ``partition_loads``: what the latest load of each partition loaded (a digest of its validated
  content), so that a re-sync of unchanged content can skip the merge.

The loads keep the links between the tables consistent under their lock; there are no foreign
keys because their per-row checks would double the cost of bulk loads. The ``hermes_*`` temporary
tables are the per-load working tables of ``masterdata``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from hermes_orchestration.records import CONTACT_TEXT_FIELDS


class UtcDateTime(sa.TypeDecorator[datetime]):
    """An instant: ``timestamptz`` on PostgreSQL, fixed-width UTC text on SQLite.

    On SQLite the text is ``YYYY-MM-DD HH:MM:SS.ffffff`` in UTC, so that comparing two values
    as text compares them as instants. Python values must be timezone-aware; they come back in UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"timestamp {value.isoformat()} has no timezone; pass an aware one")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:  # SQLite: stored as UTC text
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSON text columns: a whole JSON value per source, merged like any other field.
JSON_FIELDS: tuple[str, ...] = ("custom_fields", "unknown_fields", "quality_notes")

# The client fields a contact takes from its sources, field by field.
CONTACT_FIELDS: tuple[str, ...] = (
    *CONTACT_TEXT_FIELDS,
    "birth_date",
    "accepts_marketing",
    *JSON_FIELDS,
)


def _field_columns() -> list[sa.Column[Any]]:
    columns: list[sa.Column[Any]] = [sa.Column(name, sa.Text) for name in CONTACT_TEXT_FIELDS]
    columns.append(sa.Column("birth_date", sa.Date))
    columns.append(sa.Column("accepts_marketing", sa.Boolean))
    columns.extend(sa.Column(name, sa.Text) for name in JSON_FIELDS)
    return columns


METADATA = sa.MetaData()

# Free space in every page, so that PostgreSQL can update a row in place (a HOT update, with
# no index writes) when a newer version of a client arrives.
_ROOM_FOR_UPDATES = {"fillfactor": 80}

master_databases = sa.Table(
    "master_databases",
    METADATA,
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

# The columns the merge joins and filters the master tables on: the planner needs statistics of
# these alone (``MasterDataStore.refresh_statistics``).
_MERGE_COLUMNS = ("master_database", "email", "updated_at", "deleted_at")

master_contacts = sa.Table(
    "master_contacts",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("master_database", sa.Text, nullable=False),
    sa.Column("email", sa.Text, nullable=False),
    *_field_columns(),
    sa.Column("updated_at", UtcDateTime, nullable=False),  # latest updated_at of its live sources
    sa.Column("deleted_at", UtcDateTime),
    sa.Column("loaded_at", UtcDateTime, nullable=False),  # when this row last changed
    sa.UniqueConstraint("master_database", "email", name="uq_master_contacts_email"),
    postgresql_with=_ROOM_FOR_UPDATES,
    info={"analyze": (*_MERGE_COLUMNS, "id")},
)

contact_sources = sa.Table(
    "contact_sources",
    METADATA,
    sa.Column("integration", sa.Text, primary_key=True),
    sa.Column("hermes_id", sa.Text, primary_key=True),
    # Null for the tombstone of a client never seen alive: it has no contact.
    sa.Column("contact_id", sa.Integer),
    sa.Column("master_database", sa.Text, nullable=False),
    sa.Column("email", sa.Text),
    *_field_columns(),
    sa.Column("created_at", UtcDateTime),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("deleted_at", UtcDateTime),
    sa.Column("loaded_at", UtcDateTime, nullable=False),
    # The sources of a contact (a deleted one keeps its contact): an integer key, which costs
    # far less to maintain on a bulk insert than the email it stands for.
    sa.Index("ix_contact_sources_contact", "contact_id"),
    postgresql_with=_ROOM_FOR_UPDATES,
    info={"analyze": (*_MERGE_COLUMNS, "integration", "hermes_id", "contact_id")},
)

# The index that ix_contact_sources_contact replaced, dropped from databases created with it.
FORMER_INDEXES = ("ix_contact_sources_email",)

rejected_clients = sa.Table(
    "rejected_clients",
    METADATA,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("integration", sa.Text, nullable=False),
    sa.Column("partition_key", sa.Text, nullable=False),
    sa.Column("hermes_id", sa.Text),
    sa.Column("updated_at", UtcDateTime),
    sa.Column("reasons", sa.Text, nullable=False),  # JSON list of reason codes
    sa.Column("record", sa.Text, nullable=False),  # the raw record, as JSON
    sa.Column("rejected_at", UtcDateTime, nullable=False),
    sa.Index("ix_rejected_clients_partition", "integration", "partition_key"),
)

partition_loads = sa.Table(
    "partition_loads",
    METADATA,
    sa.Column("integration", sa.Text, primary_key=True),
    sa.Column("partition_key", sa.Text, primary_key=True),
    sa.Column("master_database", sa.Text, nullable=False),
    sa.Column("content", sa.Text, nullable=False),  # fingerprints.loaded_from(...)
    sa.Column("rows", sa.Integer, nullable=False),
    sa.Column("rejected", sa.Integer, nullable=False),
    sa.Column("loaded_at", UtcDateTime, nullable=False),
)


# Per-load working tables. Temporary tables are private to a session, so concurrent loads
# never see each other's. Their indexes are built once a table is filled, and on SQLite only:
# PostgreSQL joins them by hashing (after an ANALYZE), for which an index would be dead weight.
TEMP_METADATA = sa.MetaData()


def _temp_table(
    name: str, *columns: sa.Column[Any], index: tuple[str, ...], filters: tuple[str, ...] = ()
) -> sa.Table:
    """A working table, indexed on ``index`` (SQLite); the planner needs statistics of its
    ``index`` and ``filters`` columns (PostgreSQL)."""
    table = sa.Table(
        name, TEMP_METADATA, *columns, prefixes=["TEMPORARY"], info={"analyze": index + filters}
    )
    sa.Index(f"ix_{name}", *(table.c[column] for column in index))
    return table


_KEY = ("master_database", "email")


def _version_columns() -> list[sa.Column[Any]]:
    return [
        sa.Column("created_at", UtcDateTime),
        sa.Column("updated_at", UtcDateTime, nullable=False),
        sa.Column("deleted_at", UtcDateTime),
    ]


def _key_columns() -> list[sa.Column[Any]]:
    """A contact's key: its master database and email."""
    return [
        sa.Column("master_database", sa.Text, nullable=False),
        sa.Column("email", sa.Text, nullable=False),
    ]


# The valid rows of the partitions loaded together, as loaded; `part` is the position of their
# partition among them, `ordinal` the position in the input.
stage = _temp_table(
    "hermes_stage",
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("ordinal", sa.BigInteger, nullable=False),
    sa.Column("hermes_id", sa.Text, nullable=False),
    sa.Column("email", sa.Text),
    *_field_columns(),
    *_version_columns(),
    index=("hermes_id",),
    filters=("part",),
)

# Partitions staged together: the ids staged more than once, counted as the rows were staged.
# The clients with several changed versions are among them.
repeated = _temp_table(
    "hermes_repeated", sa.Column("hermes_id", sa.Text, nullable=False), index=("hermes_id",)
)

# The staged rows newer than the stored version of their source, with that stored version's key.
changed = _temp_table(
    "hermes_changed",
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("hermes_id", sa.Text, nullable=False),
    sa.Column("email", sa.Text),
    *_field_columns(),
    *_version_columns(),
    sa.Column("is_new", sa.Boolean, nullable=False),
    sa.Column("old_master_database", sa.Text),
    sa.Column("old_email", sa.Text),
    sa.Column("old_live", sa.Boolean, nullable=False),  # the stored version fed a contact
    # A client deleted in the last of several partitions merged together: the email of its last
    # live version among them (its tombstone keeps that email and contact). Its ``email`` is
    # then that of its first version, which a new tombstone keeps if none of them was live.
    sa.Column("last_live_email", sa.Text),
    index=("hermes_id",),
    filters=("email", "deleted_at", "is_new", "old_master_database", "old_email", "old_live"),
)

# Partitions merged together: the clients with more than one changed version among them; once
# their stale versions are dropped, with the emails of their first and last live versions and
# the position of the partition of their latest version.
chained = _temp_table(
    "hermes_chained",
    sa.Column("hermes_id", sa.Text, nullable=False),
    sa.Column("live_email", sa.Text),
    sa.Column("first_email", sa.Text),
    sa.Column("last_part", sa.Integer),
    index=("hermes_id",),
)

# Partitions merged together: every changed version of the clients that can leave a contact on
# the way, the ``chained`` ones and those whose stored version fed one (with the stored
# version's key, as in ``changed``). Each other client's one version is its row in ``changed``.
versions = _temp_table(
    "hermes_versions",
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("hermes_id", sa.Text, nullable=False),
    sa.Column("email", sa.Text),
    *_field_columns(),
    *_version_columns(),
    sa.Column("old_master_database", sa.Text),
    sa.Column("old_email", sa.Text),
    sa.Column("old_live", sa.Boolean, nullable=False),
    index=("hermes_id",),
    filters=("part", "email", "deleted_at"),
)

# Partitions merged together: each source joining (+1) or leaving (-1) a contact, in which
# partition, and when a leaving one left (its deletion or update time, and its update time).
moves = _temp_table(
    "hermes_moves",
    *_key_columns(),
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("delta", sa.Integer, nullable=False),
    sa.Column("left_at", UtcDateTime),
    sa.Column("left_updated_at", UtcDateTime),
    index=_KEY,
    filters=("part", "delta"),
)

# Partitions merged together: the affected contacts without live sources at the end, with the
# partition in which the last of them left, and when.
dying = _temp_table(
    "hermes_dying",
    *_key_columns(),
    sa.Column("part", sa.Integer, nullable=False),
    sa.Column("deleted_at", UtcDateTime, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    index=_KEY,
)

# The keys of every contact the load may change: of changed sources, before and after.
affected = _temp_table(
    "hermes_affected",
    *_key_columns(),
    index=_KEY,
)

# The affected contacts as they were before the load.
before = _temp_table(
    "hermes_before",
    sa.Column("id", sa.Integer, nullable=False),
    *_key_columns(),
    *_field_columns(),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.Column("deleted_at", UtcDateTime),
    index=_KEY,
    filters=("id", "deleted_at"),
)

# The live sources of the affected contacts, as they will be after the load.
candidates = _temp_table(
    "hermes_candidates",
    *_key_columns(),
    sa.Column("integration", sa.Text, nullable=False),
    sa.Column("hermes_id", sa.Text, nullable=False),
    *_field_columns(),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    index=_KEY,
)

# Contacts with more than one live source: only these need the field-by-field merge.
shared = _temp_table(
    "hermes_shared",
    *_key_columns(),
    index=_KEY,
)

# The merged content of every affected contact that has a live source.
after = _temp_table(
    "hermes_after",
    *_key_columns(),
    *_field_columns(),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    index=_KEY,
)

MERGE_TABLES: tuple[sa.Table, ...] = (changed, affected, before, candidates, shared, after)
# The working tables of a merge of several partitions together, in addition.
GROUP_TABLES: tuple[sa.Table, ...] = (chained, versions, moves, dying)
