"""The master database load, specified on SQLite and on the local PostgreSQL.

Every test builds small ``CLEAN_SCHEMA`` partitions with the helpers below, loads them with
``MasterDataStore.load_partition`` and reads the real tables back.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import random
import tempfile
import threading
import traceback
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pyarrow as pa
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermes_orchestration import masterdata
from hermes_orchestration import masterdata_schema as ms
from hermes_orchestration.masterdata import (
    LoadResult,
    MasterDataError,
    MasterDataStore,
    PartitionInputError,
    PartitionRows,
    default_masterdata_url,
)
from hermes_orchestration.masterdata_schema import CONTACT_FIELDS
from hermes_orchestration.records import CLEAN_SCHEMA, REJECTED_SCHEMA

POSTGRES_ADMIN_URL = os.environ.get(
    "HERMES_TEST_POSTGRES_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MASTER_DB = "clientes_chile"
T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


# --- Building partitions ---------------------------------------------------------------------


def at(hours: float) -> datetime:
    """An instant ``hours`` after T0."""
    return T0 + timedelta(hours=hours)


def client(
    hermes_id: str,
    email: str | None,
    hours: float,
    *,
    deleted: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """One valid client version, updated ``hours`` after T0 (a tombstone if ``deleted``)."""
    unknown = set(fields) - set(CONTACT_FIELDS)
    assert not unknown, f"not client fields: {unknown}"
    return {
        "hermes_id": hermes_id,
        "email": email,
        **fields,
        "created_at": T0,
        "updated_at": at(hours),
        "deleted_at": at(hours) if deleted else None,
    }


def clean_table(clients: Sequence[dict[str, Any]]) -> pa.Table:
    """A ``CLEAN_SCHEMA`` table of client versions."""
    columns = {name: [row.get(name) for row in clients] for name in CLEAN_SCHEMA.names}
    return pa.table(columns, schema=CLEAN_SCHEMA)


def rejected_table(*hermes_ids: str) -> pa.Table:
    """A ``REJECTED_SCHEMA`` table with one rejected row per id."""
    return pa.table(
        {
            "hermes_id": list(hermes_ids),
            "updated_at": [T0] * len(hermes_ids),
            "reasons": [["email_invalid"]] * len(hermes_ids),
            "record": [f'{{"id": "{hermes_id}", "email": "nope"}}' for hermes_id in hermes_ids],
        },
        schema=REJECTED_SCHEMA,
    )


def load(
    store: MasterDataStore,
    integration: str,
    partition_key: str,
    *clients: dict[str, Any],
    rejected: Sequence[str] = (),
    master_database: str = MASTER_DB,
) -> LoadResult:
    """Load one partition of ``integration``."""
    return store.load_partition(
        integration=integration,
        master_database=master_database,
        partition_key=partition_key,
        valid=clean_table(clients),
        rejected=rejected_table(*rejected),
    )


# --- Reading the tables back -----------------------------------------------------------------


def rows(store: MasterDataStore, table: sa.Table) -> list[dict[str, Any]]:
    """Every row of ``table``, as dicts, in a stable order."""
    with store.engine.connect() as conn:
        result = conn.execute(sa.select(table).order_by(*table.primary_key.columns))
        return [dict(row._mapping) for row in result]


def contacts(store: MasterDataStore, master_database: str = MASTER_DB) -> dict[str, dict]:
    """The contacts of a master database (soft-deleted ones included), by email."""
    return {
        row["email"]: row
        for row in rows(store, ms.master_contacts)
        if row["master_database"] == master_database
    }


def live_contacts(store: MasterDataStore, master_database: str = MASTER_DB) -> dict[str, dict]:
    """The contacts that are not deleted: their fields and updated_at, by email."""
    return {
        email: {name: row[name] for name in (*CONTACT_FIELDS, "updated_at")}
        for email, row in contacts(store, master_database).items()
        if row["deleted_at"] is None
    }


def sources(store: MasterDataStore) -> dict[tuple[str, str], dict]:
    """Every source, by (integration, hermes_id)."""
    return {(row["integration"], row["hermes_id"]): row for row in rows(store, ms.contact_sources)}


def snapshot(store: MasterDataStore) -> dict[str, list[dict[str, Any]]]:
    """Everything the store holds."""
    return {table.name: rows(store, table) for table in ms.METADATA.sorted_tables}


def counts(result: LoadResult) -> dict[str, int]:
    """The counters of a load result."""
    return {
        name: value
        for name, value in result.as_metadata().items()
        if isinstance(value, int) and name != "rows"
    }


# --- Stores ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_masterdata_url() -> Iterator[str]:
    """A PostgreSQL database of this test module's own, dropped at the end."""
    name = f"hermes_test_masterdata_{os.getpid()}"
    admin = sa.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as err:
        pytest.skip(f"the local PostgreSQL at 127.0.0.1:5432 is not reachable: {err}")
    yield sa.make_url(POSTGRES_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


def drop_tables(url: str) -> None:
    """Drop the master database tables at ``url``."""
    engine = sa.create_engine(url)
    with engine.begin() as conn:
        ms.METADATA.drop_all(conn)
    engine.dispose()


def empty_postgres_store(url: str) -> MasterDataStore:
    """A store on the test database, its tables created and emptied."""
    store = MasterDataStore(url)
    store.ensure_schema()
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "TRUNCATE master_databases, master_contacts, contact_sources, rejected_clients, "
                "partition_loads RESTART IDENTITY"
            )
        )
    return store


BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


@pytest.fixture
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A master database URL of the backend under test, tables not created yet."""
    if request.param == "sqlite":
        return default_masterdata_url(tmp_path / "state")
    url = request.getfixturevalue("postgres_masterdata_url")
    drop_tables(url)
    return url


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MasterDataStore]:
    """An empty master database store on SQLite (a file) or PostgreSQL."""
    if request.param == "sqlite":
        store = MasterDataStore(default_masterdata_url(tmp_path / "state"))
        store.ensure_schema()
    else:
        store = empty_postgres_store(request.getfixturevalue("postgres_masterdata_url"))
    yield store
    store.dispose()


# --- Loading ---------------------------------------------------------------------------------


def test_first_load_creates_the_master_database_its_contacts_and_sources(
    store: MasterDataStore,
) -> None:
    assert store.master_database_info(MASTER_DB) is None
    result = load(
        store,
        "tienda_norte",
        "2026-03-01",
        client(
            "1",
            "  Ana.Perez@Example.CL ",
            1,
            first_name="Ana",
            last_name="",
            birth_date=date(1990, 5, 17),
            accepts_marketing=True,
            custom_fields='{"tier": "gold"}',
        ),
        client("2", "bea@example.cl", 2, city="Talca", custom_fields="{}"),
        rejected=["3"],
    )

    assert counts(result) == {
        "sources_inserted": 2, "sources_updated": 0, "sources_unchanged": 0,
        "contacts_inserted": 2, "contacts_updated": 0, "contacts_unchanged": 0,
        "contacts_deleted": 0, "contacts_revived": 0, "rejected": 1,
    }  # fmt: skip
    assert result.rows == 2
    assert (result.master_database, result.partition_key) == (MASTER_DB, "2026-03-01")
    created_at, updated_at = store.master_database_info(MASTER_DB) or (None, None)
    assert created_at == updated_at == result.master_database_updated_at
    assert created_at is not None and created_at.tzinfo is not None

    ana = contacts(store)["ana.perez@example.cl"]  # trimmed and lower-cased
    assert ana["first_name"] == "Ana"
    assert ana["last_name"] is None  # an empty value is no value
    assert ana["birth_date"] == date(1990, 5, 17)
    assert ana["accepts_marketing"] is True
    assert ana["custom_fields"] == '{"tier": "gold"}'
    assert ana["updated_at"] == at(1)
    assert ana["deleted_at"] is None
    assert contacts(store)["bea@example.cl"]["custom_fields"] is None  # '{}' is no value

    source = sources(store)[("tienda_norte", "1")]
    assert source["contact_id"] == ana["id"]
    assert (source["master_database"], source["email"]) == (MASTER_DB, "ana.perez@example.cl")
    assert source["updated_at"] == at(1)


def test_a_load_of_new_and_stored_contacts_merges_and_counts_each_contact_once(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p1", client("1", "ana@example.cl", 1, first_name="Ana"))
    result = load(
        store,
        "tienda_norte",
        "p2",
        client("1", "ana@example.cl", 2, first_name="Ana", city="Talca"),  # a stored one changes
        client("2", "bea@example.cl", 3, first_name="Bea", city="Arica"),  # a new contact ...
        client("3", "bea@example.cl", 4, city="Ancud"),  # ... of two new sources
        client("4", "ana@example.cl", 5, last_name="Rojas"),  # a new source of a stored one
        client("5", "eva@example.cl", 6, deleted=True),  # a tombstone makes no contact
    )
    assert counts(result) == {
        "sources_inserted": 4, "sources_updated": 1, "sources_unchanged": 0,
        "contacts_inserted": 1, "contacts_updated": 1, "contacts_unchanged": 0,
        "contacts_deleted": 0, "contacts_revived": 0, "rejected": 0,
    }  # fmt: skip
    stored = live_contacts(store)
    assert set(stored) == {"ana@example.cl", "bea@example.cl"}
    assert (stored["ana@example.cl"]["first_name"], stored["ana@example.cl"]["city"]) == (
        "Ana",
        "Talca",
    )
    assert stored["ana@example.cl"]["last_name"] == "Rojas"
    assert (stored["bea@example.cl"]["first_name"], stored["bea@example.cl"]["city"]) == (
        "Bea",
        "Ancud",
    )
    assert stored["bea@example.cl"]["updated_at"] == at(4)
    linked = {key[1]: row["contact_id"] for key, row in sources(store).items()}
    ids = {email: row["id"] for email, row in contacts(store).items()}
    assert linked == {
        "1": ids["ana@example.cl"],
        "2": ids["bea@example.cl"],
        "3": ids["bea@example.cl"],
        "4": ids["ana@example.cl"],
        "5": None,
    }


def test_loading_the_same_partition_again_changes_nothing(store: MasterDataStore) -> None:
    partition = [client("1", "ana@example.cl", 1, first_name="Ana"), client("2", "b@x.cl", 2)]
    first = load(store, "tienda_norte", "2026-03-01", *partition, rejected=["9"])
    before = snapshot(store)

    again = load(store, "tienda_norte", "2026-03-01", *partition, rejected=["9"])

    assert counts(again) == {
        "sources_inserted": 0, "sources_updated": 0, "sources_unchanged": 2,
        "contacts_inserted": 0, "contacts_updated": 0, "contacts_unchanged": 0,
        "contacts_deleted": 0, "contacts_revived": 0, "rejected": 1,
    }  # fmt: skip
    assert again.master_database_updated_at == first.master_database_updated_at
    after = snapshot(store)
    # Replaced, so their load time is new; everything else is untouched, load times included.
    for table in (before, after):
        for row in table["rejected_clients"]:
            del row["id"], row["rejected_at"]
    assert after == before


def test_an_older_partition_loaded_after_a_newer_one_overwrites_nothing(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "2026-03-02", client("1", "ana@example.cl", 30, first_name="Ana"))
    before = snapshot(store)

    older = load(
        store,
        "tienda_norte",
        "2026-03-01",
        client("1", "ana@example.cl", 5, first_name="Old Ana"),
        client("1", "ana@example.cl", 30, first_name="Same instant"),  # equal is not newer
    )

    assert (older.sources_updated, older.sources_unchanged) == (0, 2)
    assert older.contacts_updated == 0
    assert snapshot(store) == before


def test_a_client_listed_twice_in_a_partition_keeps_its_newest_version(
    store: MasterDataStore,
) -> None:
    load(
        store,
        "tienda_norte",
        "2026-03-01",
        client("1", "ana@example.cl", 3, first_name="Newest"),
        client("1", "ana@example.cl", 1, first_name="Oldest"),
        client("1", "ana@example.cl", 3, first_name="Newest, listed last"),
    )
    assert live_contacts(store)["ana@example.cl"]["first_name"] == "Newest, listed last"
    assert len(sources(store)) == 1


def test_timestamps_compare_as_instants_whatever_their_offset(store: MasterDataStore) -> None:
    load(store, "tienda_norte", "p1", client("1", "ana@example.cl", 1, first_name="13:00 UTC"))
    santiago = ZoneInfo("America/Santiago")  # -03:00 in March
    earlier = client("1", "ana@example.cl", 0, first_name="12:59 UTC")
    earlier["updated_at"] = datetime(2026, 3, 1, 9, 59, tzinfo=santiago)
    later = client("1", "ana@example.cl", 0, first_name="13:30 UTC")
    later["updated_at"] = datetime(2026, 3, 1, 10, 30, tzinfo=santiago)

    assert load(store, "tienda_norte", "p0", earlier).sources_updated == 0
    assert load(store, "tienda_norte", "p2", later).sources_updated == 1
    ana = live_contacts(store)["ana@example.cl"]
    assert (ana["first_name"], ana["updated_at"]) == ("13:30 UTC", at(1.5))


# --- Merging sources into contacts -------------------------------------------------------------


def test_a_contact_takes_each_field_from_the_latest_source_that_has_it(
    store: MasterDataStore,
) -> None:
    load(
        store,
        "tienda_norte",
        "p1",
        client("n1", "ana@example.cl", 1, first_name="Ana", phone="+56911111111", city="Talca"),
    )
    load(
        store,
        "tienda_sur",
        "p1",
        client("s7", "ANA@example.cl", 2, first_name="Ana María", phone="", city=None),
    )
    load(store, "tienda_web", "p1", client("w3", "ana@example.cl", 3, gender="F"))

    ana = live_contacts(store)["ana@example.cl"]
    assert ana["first_name"] == "Ana María"  # the latest source that has one
    assert ana["phone"] == "+56911111111"  # the later sources have none ('' is none)
    assert ana["city"] == "Talca"
    assert ana["gender"] == "F"
    assert ana["updated_at"] == at(3)
    assert len(contacts(store)) == 1
    assert {row["contact_id"] for row in sources(store).values()} == {
        contacts(store)["ana@example.cl"]["id"]
    }


def test_an_unsubscribe_is_never_overridden_by_an_older_subscription(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_sur", "p2", client("s1", "ana@example.cl", 5, accepts_marketing=False))
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, accepts_marketing=True))
    load(store, "tienda_web", "p1", client("w1", "ana@example.cl", 6, first_name="Ana"))

    assert live_contacts(store)["ana@example.cl"]["accepts_marketing"] is False
    # Only a newer explicit consent subscribes again.
    load(store, "tienda_norte", "p3", client("n1", "ana@example.cl", 7, accepts_marketing=True))
    assert live_contacts(store)["ana@example.cl"]["accepts_marketing"] is True


def test_sources_updated_at_the_same_instant_resolve_the_same_in_any_order(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, accepts_marketing=True))
    load(store, "tienda_sur", "p1", client("s1", "ana@example.cl", 1, accepts_marketing=False))
    load(store, "tienda_norte", "p1", client("n2", "bea@example.cl", 1, accepts_marketing=False))
    load(store, "tienda_sur", "p1", client("s2", "bea@example.cl", 1, accepts_marketing=True))

    # A tie is settled by value: for consent, the unsubscribe wins.
    assert live_contacts(store)["ana@example.cl"]["accepts_marketing"] is False
    assert live_contacts(store)["bea@example.cl"]["accepts_marketing"] is False


def test_a_changed_email_moves_the_source_to_its_new_contact(store: MasterDataStore) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, first_name="Ana"))
    load(store, "tienda_sur", "p1", client("s1", "ana@example.cl", 2, last_name="Pérez"))

    moved = load(store, "tienda_sur", "p2", client("s1", "ana.perez@example.cl", 3, city="Talca"))

    assert (moved.contacts_inserted, moved.contacts_updated) == (1, 1)
    live = live_contacts(store)
    assert live["ana@example.cl"]["first_name"] == "Ana"
    assert live["ana@example.cl"]["last_name"] is None  # its only last name went with s1
    assert live["ana@example.cl"]["updated_at"] == at(1)
    assert live["ana.perez@example.cl"]["city"] == "Talca"
    source = sources(store)[("tienda_sur", "s1")]
    assert source["contact_id"] == contacts(store)["ana.perez@example.cl"]["id"]


def test_a_contact_left_without_sources_is_soft_deleted(store: MasterDataStore) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, first_name="Ana"))

    moved = load(store, "tienda_norte", "p2", client("n1", "ana.perez@example.cl", 4))

    assert (moved.contacts_inserted, moved.contacts_deleted) == (1, 1)
    old = contacts(store)["ana@example.cl"]  # the row stays, marked deleted
    assert old["deleted_at"] == at(4)
    assert old["first_name"] == "Ana"
    assert "ana@example.cl" not in live_contacts(store)


def test_a_tombstone_deletes_a_contact_only_once_all_its_sources_are_deleted(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, first_name="Ana"))
    load(store, "tienda_sur", "p1", client("s1", "ana@example.cl", 2, first_name="Anita"))

    first = load(store, "tienda_sur", "p2", client("s1", None, 5, deleted=True))
    assert (first.contacts_updated, first.contacts_deleted) == (1, 0)
    assert live_contacts(store)["ana@example.cl"]["first_name"] == "Ana"
    tombstone = sources(store)[("tienda_sur", "s1")]
    assert tombstone["deleted_at"] == at(5)
    # It keeps its last email and contact, so the contact knows it is one of its sources.
    assert tombstone["email"] == "ana@example.cl"
    assert tombstone["contact_id"] == contacts(store)["ana@example.cl"]["id"]

    last = load(store, "tienda_norte", "p2", client("n1", None, 6, deleted=True))
    assert (last.contacts_updated, last.contacts_deleted) == (0, 1)
    ana = contacts(store)["ana@example.cl"]
    assert ana["deleted_at"] == at(6)
    assert ana["first_name"] == "Ana"  # kept as it was


def test_a_tombstone_of_a_never_seen_client_blocks_its_older_versions(
    store: MasterDataStore,
) -> None:
    tombstone = load(store, "tienda_norte", "p2", client("n1", None, 5, deleted=True))
    assert (tombstone.sources_inserted, tombstone.contacts_inserted) == (1, 0)
    assert sources(store)[("tienda_norte", "n1")]["contact_id"] is None

    older = load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, first_name="A"))

    assert (older.sources_unchanged, older.contacts_inserted) == (1, 0)
    assert contacts(store) == {}


def test_a_newer_live_version_revives_a_deleted_contact(store: MasterDataStore) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, first_name="Ana"))
    load(store, "tienda_norte", "p2", client("n1", None, 2, deleted=True))
    deleted_id = contacts(store)["ana@example.cl"]["id"]

    revived = load(store, "tienda_norte", "p3", client("n1", "ana@example.cl", 3, city="Talca"))

    assert (revived.contacts_revived, revived.contacts_inserted) == (1, 0)
    ana = contacts(store)["ana@example.cl"]
    assert (ana["id"], ana["deleted_at"], ana["city"]) == (deleted_id, None, "Talca")
    assert ana["first_name"] is None  # the new version has none
    assert sources(store)[("tienda_norte", "n1")]["contact_id"] == deleted_id


def test_loaded_at_changes_only_when_a_contact_changes(store: MasterDataStore) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1, first_name="Ana"))
    load(store, "tienda_norte", "p1", client("n2", "bea@example.cl", 1, first_name="Bea"))
    ana_loaded = contacts(store)["ana@example.cl"]["loaded_at"]

    result = load(store, "tienda_sur", "p1", client("s1", "ana@example.cl", 0, first_name="Old"))

    assert (result.contacts_updated, result.contacts_unchanged) == (0, 1)
    assert contacts(store)["ana@example.cl"]["loaded_at"] == ana_loaded
    assert live_contacts(store)["ana@example.cl"]["first_name"] == "Ana"


def test_moving_an_integration_to_another_master_database_moves_its_clients(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p1", client("n1", "ana@example.cl", 1), master_database="old")

    moved = load(store, "tienda_norte", "p2", client("n1", "ana@example.cl", 2))

    assert (moved.contacts_inserted, moved.contacts_deleted) == (1, 1)
    assert contacts(store, "old")["ana@example.cl"]["deleted_at"] == at(2)
    assert "ana@example.cl" in live_contacts(store, MASTER_DB)
    old_info = store.master_database_info("old")
    assert old_info is not None and old_info[1] == moved.master_database_updated_at


def test_a_stream_of_batches_loads_like_a_table(store: MasterDataStore) -> None:
    table = clean_table(
        [client(str(n), f"c{n % 7}@example.cl", n, city=f"C{n}") for n in range(30)]
    )

    result = store.load_partition(
        integration="tienda_norte",
        master_database=MASTER_DB,
        partition_key="p1",
        valid=iter(table.to_batches(max_chunksize=8)),
        rejected=REJECTED_SCHEMA.empty_table(),
    )

    assert (result.rows, result.sources_inserted, result.contacts_inserted) == (30, 30, 7)
    assert live_contacts(store)["c3@example.cl"]["city"] == "C24"  # its latest source


def test_a_partition_known_to_hold_each_client_once_loads_as_one_counted(
    store: MasterDataStore,
) -> None:
    # Validation counts repeated ids; a partition it found none in is loaded without gathering
    # its ids again, with the same result.
    clients = [client(str(n), f"c{n % 7}@example.cl", n, city=f"C{n}") for n in range(30)]
    results = {
        database: store.load_partitions(
            integration=f"tienda_{database}",
            master_database=database,
            partitions=[
                PartitionRows(
                    "p1", clean_table(clients), REJECTED_SCHEMA.empty_table(), ids_unique=unique
                )
            ],
        )
        for database, unique in (("base_known", True), ("base_counted", False))
    }
    assert counts(results["base_known"]) == counts(results["base_counted"])
    assert results["base_known"].rows == 30
    assert live_contacts(store, "base_known") == live_contacts(store, "base_counted")
    assert len(live_contacts(store, "base_known")) == 7


def test_partitions_whose_content_was_loaded_last_are_found_unchanged(
    store: MasterDataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(masterdata, "_KEYS_PER_QUERY", 2)  # several queries for a range
    for n, key in enumerate(["p1", "p2", "p3"]):
        store.load_partition(
            integration="tienda_norte",
            master_database=MASTER_DB,
            partition_key=key,
            valid=clean_table([client(str(n), f"c{n}@example.cl", n)]),
            rejected=rejected_table(*[f"bad{m}" for m in range(n)]),
            content=f"content-{key}",
        )
    asked = {"p1": "content-p1", "p2": "another content", "p3": "content-p3", "p4": "content-p4"}

    found = store.unchanged(integration="tienda_norte", master_database=MASTER_DB, contents=asked)

    assert sorted(found) == ["p1", "p3"]
    assert (found["p3"].rows, found["p3"].rejected, found["p3"].sources_unchanged) == (1, 2, 1)
    assert found["p1"].partition_keys == ("p1",)
    elsewhere = store.unchanged(integration="tienda_norte", master_database="otra", contents=asked)
    assert elsewhere == {}


# --- Rejected rows ---------------------------------------------------------------------------


def test_rows_in_tables_with_empty_chunks_are_stored_exactly(store: MasterDataStore) -> None:
    # Tables put together from several partitions or row groups may hold empty chunks.
    def with_empty_chunk(table: pa.Table) -> pa.Table:
        return pa.concat_tables([table.schema.empty_table(), table, table.schema.empty_table()])

    partitions = [
        PartitionRows(
            key,
            with_empty_chunk(clean_table([client(hermes_id, f"{hermes_id}@example.cl", 1)])),
            with_empty_chunk(rejected_table(f"bad-{hermes_id}")),
        )
        for key, hermes_id in (("p1", "1"), ("p2", "2"))
    ]
    nothing = PartitionRows("p0", clean_table([]), rejected_table())
    store.load_partitions(
        integration="tienda_norte", master_database=MASTER_DB, partitions=[nothing, *partitions]
    )

    assert sorted(contacts(store)) == ["1@example.cl", "2@example.cl"]
    stored = sorted(
        (row["partition_key"], row["hermes_id"], row["record"])
        for row in rows(store, ms.rejected_clients)
    )
    assert stored == [
        ("p1", "bad-1", '{"id": "bad-1", "email": "nope"}'),
        ("p2", "bad-2", '{"id": "bad-2", "email": "nope"}'),
    ]


def test_text_dates_and_instants_are_stored_exactly_whatever_characters_they_hold(
    store: MasterDataStore,
) -> None:
    # What a text format for bulk loads would have to quote or escape: delimiters, quotes,
    # backslashes, line breaks, tabs, the words and markers that mean NULL, and non-ASCII text.
    awkward = [
        'O\'Brien, "Bob"',
        "back\\slash \\N \\.",
        "line\nbreak\r\nand\ttab",
        "NULL",
        "ñandú 😀 עברית",
        ",",
    ]
    given = [
        client(
            str(number),
            f"{number}@example.cl",
            number + 0.000001,  # instants with microseconds
            first_name=text,
            city=text,
            custom_fields=f'{{"note": "{number}"}}',
            birth_date=date(1950 + number, 12, 31),
            accepts_marketing=number % 2 == 0,
        )
        for number, text in enumerate(awkward)
    ]
    record = '{"id": "bad", "email": "a,b\\n\\"c\\"", "name": "\\\\N"}'
    rejected = rejected_table("bad").set_column(3, "record", pa.array([record], pa.string()))
    store.load_partition(
        integration="tienda_norte",
        master_database=MASTER_DB,
        partition_key="p1",
        valid=clean_table(given),
        rejected=rejected,
    )

    stored = sources(store)
    for row in given:
        source = stored[("tienda_norte", row["hermes_id"])]
        for name in ("first_name", "city", "custom_fields", "birth_date", "accepts_marketing"):
            assert source[name] == row[name], name
        assert source["updated_at"] == row["updated_at"]
        assert live_contacts(store)[row["email"]]["first_name"] == row["first_name"]
    assert [row["record"] for row in rows(store, ms.rejected_clients)] == [record]


def test_rejected_rows_of_a_partition_are_replaced_not_accumulated(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p1", rejected=["1", "2", "3"])
    load(store, "tienda_norte", "p2", rejected=["7"])
    load(store, "tienda_sur", "p1", rejected=["1"])

    load(store, "tienda_norte", "p1", client("1", "a@example.cl", 1), rejected=["2"])

    stored = sorted(
        (row["integration"], row["partition_key"], row["hermes_id"])
        for row in rows(store, ms.rejected_clients)
    )
    assert stored == [
        ("tienda_norte", "p1", "2"),
        ("tienda_norte", "p2", "7"),
        ("tienda_sur", "p1", "1"),
    ]
    row = rows(store, ms.rejected_clients)[-1]
    assert row["reasons"] == '["email_invalid"]'
    assert row["record"] == '{"id": "2", "email": "nope"}'


# --- Failures ----------------------------------------------------------------------------------


def fail_when(statement_start: str) -> Any:
    """A cursor hook that fails the statement starting with ``statement_start``."""

    def hook(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith(statement_start):
            raise RuntimeError("injected failure")

    return hook


def test_a_load_that_fails_midway_writes_nothing(store: MasterDataStore) -> None:
    load(
        store,
        "tienda_norte",
        "p1",
        client("1", "ana@example.cl", 1, first_name="Ana"),
        rejected=["x"],
    )
    before = snapshot(store)
    partition = [
        client("1", "ana@example.cl", 5, first_name="Anita"),
        client("2", "bea@example.cl", 5),
        client("3", None, 5, deleted=True),
    ]
    # By the time the sources are written, the contacts and rejected rows already are.
    hook = fail_when("INSERT INTO contact_sources")
    sa.event.listen(store.engine, "before_cursor_execute", hook)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            load(store, "tienda_norte", "p2", *partition, rejected=["y"])
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", hook)

    assert snapshot(store) == before
    retried = load(store, "tienda_norte", "p2", *partition, rejected=["y"])
    assert (retried.contacts_inserted, retried.contacts_updated) == (1, 1)


@pytest.mark.postgres
def test_a_load_whose_connection_dies_midway_writes_nothing(
    postgres_masterdata_url: str,
) -> None:
    store = empty_postgres_store(postgres_masterdata_url)
    load(store, "tienda_norte", "p1", client("1", "ana@example.cl", 1, first_name="Ana"))
    before = snapshot(store)
    killer = sa.create_engine(postgres_masterdata_url)

    def kill_the_session(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("UPDATE contact_sources"):
            with killer.connect() as other:
                other.execute(
                    sa.select(sa.func.pg_terminate_backend(cursor.connection.info.backend_pid))
                )

    sa.event.listen(store.engine, "before_cursor_execute", kill_the_session)
    try:
        with pytest.raises(MasterDataError, match="rolled back, nothing of it was written"):
            load(store, "tienda_norte", "p2", client("1", "ana@example.cl", 5, first_name="X"))
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", kill_the_session)
        killer.dispose()

    assert snapshot(store) == before
    assert load(store, "tienda_norte", "p2", client("1", "a@example.cl", 5)).sources_updated == 1
    store.dispose()


def test_a_database_created_by_an_earlier_release_gets_this_releases_indexes(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p1", client("1", "ana@example.cl", 1, first_name="Ana"))
    # As an earlier release created it: contact_sources indexed by master database and email.
    with store.engine.begin() as conn:
        conn.execute(sa.text("DROP INDEX ix_contact_sources_contact"))
        conn.execute(
            sa.text(
                "CREATE INDEX ix_contact_sources_email ON contact_sources (master_database, email)"
            )
        )
    before = snapshot(store)
    store.ensure_schema()
    store.ensure_schema()  # and again: nothing left to do
    indexes = {index["name"] for index in sa.inspect(store.engine).get_indexes("contact_sources")}
    assert indexes == {"ix_contact_sources_contact"}
    assert snapshot(store) == before
    # Its contacts are found through the new index: a second source merges into the contact.
    load(store, "tienda_sur", "p1", client("9", "ana@example.cl", 2, city="Talca"))
    ana = live_contacts(store)["ana@example.cl"]
    assert (ana["first_name"], ana["city"]) == ("Ana", "Talca")


@pytest.mark.postgres
def test_refreshed_statistics_measure_the_master_tables_by_the_columns_the_merge_joins_on(
    postgres_masterdata_url: str,
) -> None:
    drop_tables(postgres_masterdata_url)  # new tables: no statistics from an earlier ANALYZE
    store = empty_postgres_store(postgres_masterdata_url)
    # Fewer rows than autovacuum waits for before it analyzes a table (50).
    clients = [client(str(n), f"c{n}@example.cl", 1, city="Talca") for n in range(30)]
    load(store, "tienda_norte", "p1", *clients)
    store.refresh_statistics()
    with store.engine.connect() as conn:
        measured = conn.execute(
            sa.text(
                "SELECT tablename, attname FROM pg_stats "
                "WHERE tablename IN ('contact_sources', 'master_contacts')"
            )
        ).all()
        rows = dict(
            conn.execute(
                sa.text(
                    "SELECT relname, reltuples FROM pg_class "
                    "WHERE relname IN ('contact_sources', 'master_contacts')"
                )
            ).all()
        )
    store.dispose()
    assert rows == {"contact_sources": 30, "master_contacts": 30}
    columns = {(table, column) for table, column in measured}
    for table in (ms.contact_sources, ms.master_contacts):
        assert {column for name, column in columns if name == table.name} == set(
            table.info["analyze"]
        )
    # The joined columns are among them; the wide text ones (the costly part) are not.
    assert {("contact_sources", "hermes_id"), ("master_contacts", "email")} <= columns
    assert ("contact_sources", "city") not in columns


# --- Large inserts on PostgreSQL: indexes built again instead of updated ----------------------


@pytest.fixture
def rebuild_from(monkeypatch: pytest.MonkeyPatch) -> Any:
    """Set how many new rows (and more than the table holds) make a load build the indexes of
    a master table again instead of updating them."""
    return lambda rows: monkeypatch.setattr(masterdata, "_REBUILD_MIN_ROWS", rows)


def index_definitions(store: MasterDataStore) -> dict[str, str]:
    """Every index of the master contacts and sources, with its definition (PostgreSQL)."""
    with store.engine.connect() as conn:
        return dict(
            conn.execute(
                sa.text(
                    "SELECT indexrelid::regclass::text, pg_get_indexdef(indexrelid) FROM pg_index "
                    "WHERE indrelid IN ('master_contacts'::regclass, 'contact_sources'::regclass)"
                )
            ).all()
        )


@contextmanager
def statements_sent(store: MasterDataStore) -> Iterator[list[str]]:
    """The statements the store sends while the block runs."""
    sent: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(statement.strip())

    sa.event.listen(store.engine, "before_cursor_execute", note)
    try:
        yield sent
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", note)


def altered(sent: list[str], verb: str = "ADD") -> set[str]:
    """The master tables of which the statements ``verb`` (ADD: build again) a constraint."""
    return {
        table
        for table in ("master_contacts", "contact_sources")
        for statement in sent
        if statement.startswith(f"ALTER TABLE {table} {verb} CONSTRAINT")
    }


@pytest.mark.postgres
def test_loads_larger_than_the_master_tables_rebuild_their_indexes_and_store_the_same(
    postgres_masterdata_url: str, rebuild_from: Any
) -> None:
    versions = fixed_histories(seed=5, clients_per_integration=40)
    by_partition = partitions(versions)
    stored, rebuilt = [], []
    for first_rows in (5, 10**9):  # rebuilt where a load is larger, then never
        rebuild_from(first_rows)
        store = empty_postgres_store(postgres_masterdata_url)
        indexes = index_definitions(store)
        with statements_sent(store) as sent:
            for integration, partition_key in sorted(by_partition):
                clients = [v.as_client() for v in by_partition[(integration, partition_key)]]
                load(store, integration, partition_key, *clients)
                rebuilt.append(altered(sent))
                sent.clear()
        assert index_definitions(store) == indexes
        assert_consistent(store, versions)
        stored.append(stored_content(store))
        store.dispose()
    assert stored[0] == stored[1]
    loads = len(by_partition)
    # The first loads outgrow the tables; once they hold more, the indexes are updated.
    assert rebuilt[0] == {"master_contacts", "contact_sources"}
    assert set() in rebuilt[:loads]
    assert rebuilt[loads:] == [set()] * loads


@pytest.mark.postgres
def test_a_load_that_fails_after_dropping_the_indexes_leaves_them_and_the_data_as_they_were(
    postgres_masterdata_url: str, rebuild_from: Any
) -> None:
    rebuild_from(3)
    store = empty_postgres_store(postgres_masterdata_url)
    load(store, "tienda_norte", "p1", client("1", "ana@example.cl", 1, first_name="Ana"))
    before, indexes = snapshot(store), index_definitions(store)
    partition = [client(str(n), f"c{n}@example.cl", 2) for n in range(2, 8)]
    # The contacts' indexes are built again by then, the sources' are dropped.
    hook = fail_when("INSERT INTO contact_sources")
    sa.event.listen(store.engine, "before_cursor_execute", hook)
    try:
        with statements_sent(store) as sent, pytest.raises(RuntimeError, match="injected"):
            load(store, "tienda_norte", "p2", *partition)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", hook)
    assert altered(sent, "DROP") == {"master_contacts", "contact_sources"}
    assert (snapshot(store), index_definitions(store)) == (before, indexes)
    assert load(store, "tienda_norte", "p2", *partition).contacts_inserted == 6
    store.dispose()


@pytest.mark.postgres
def test_indexes_that_other_tables_depend_on_stay_in_place_during_a_large_load(
    postgres_masterdata_url: str, rebuild_from: Any, caplog: pytest.LogCaptureFixture
) -> None:
    rebuild_from(3)
    store = empty_postgres_store(postgres_masterdata_url)
    with store.engine.begin() as conn:  # a table of icomm's that points at the contacts
        conn.execute(
            sa.text("CREATE TABLE campaign_members (contact_id integer REFERENCES master_contacts)")
        )
    indexes = index_definitions(store)
    caplog.set_level(logging.INFO, logger="hermes_orchestration.masterdata")
    try:
        with statements_sent(store) as sent:
            result = load(store, "tienda_norte", "p1", *[
                client(str(n), f"c{n}@example.cl", 1) for n in range(6)
            ])  # fmt: skip
    finally:
        with store.engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE campaign_members"))
    assert result.contacts_inserted == 6
    assert "Inserting into master_contacts with its indexes in place" in caplog.text
    assert altered(sent) == {"contact_sources"}  # nothing depends on the sources' indexes
    assert index_definitions(store) == indexes
    store.dispose()


@pytest.mark.postgres
def test_large_first_loads_of_two_master_databases_at_once_both_succeed_without_waiting(
    postgres_masterdata_url: str, rebuild_from: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hermes_orchestration.masterdata")
    rebuild_from(3)
    empty_postgres_store(postgres_masterdata_url).dispose()
    stores = [MasterDataStore(postgres_masterdata_url) for _ in range(2)]
    ready = threading.Barrier(2)

    def first_load(index: int) -> LoadResult:
        clients = [client(f"{index}-{n}", f"c{n}@example.cl", 1, city="Talca") for n in range(300)]
        ready.wait()
        return load(stores[index], f"tienda_{index}", "p1", *clients, master_database=f"db{index}")

    # Each wants both master tables to itself, and does not wait for them: whichever finds the
    # other using a table inserts with its indexes in place.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(first_load, range(2)))
    assert [result.contacts_inserted for result in results] == [300, 300]
    for index in range(2):
        assert len(live_contacts(stores[0], f"db{index}")) == 300
    # Neither waited for the other's lock: PostgreSQL found no deadlock, no merge was retried.
    assert "deadlock" not in caplog.text
    assert "Retrying the master data merge" not in caplog.text
    for store in stores:
        store.dispose()


@pytest.mark.postgres
def test_a_first_load_rolled_back_as_retryable_is_merged_again_from_its_stage(
    postgres_masterdata_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="hermes_orchestration.masterdata")
    store = empty_postgres_store(postgres_masterdata_url)
    clients = [client(str(n), f"c{n % 40}@example.cl", 1 + n % 3, city="Talca") for n in range(90)]
    conflict = """
        CREATE SEQUENCE conflicts;
        CREATE FUNCTION conflict_once() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF nextval('conflicts') = 1 THEN  -- a sequence is not rolled back with the merge
                RAISE EXCEPTION 'conflict' USING ERRCODE = 'serialization_failure';
            END IF;
            RETURN NULL;
        END $$;
        CREATE TRIGGER conflict_once BEFORE INSERT ON contact_sources
            FOR EACH STATEMENT EXECUTE FUNCTION conflict_once();
    """
    with store.engine.begin() as conn:
        conn.exec_driver_sql(conflict)
    try:
        retried = load(store, "tienda_norte", "p1", *clients, master_database="retried")
    finally:
        with store.engine.begin() as conn:
            conn.exec_driver_sql(
                "DROP TRIGGER conflict_once ON contact_sources; DROP FUNCTION conflict_once(); "
                "DROP SEQUENCE conflicts"
            )
    once = load(store, "tienda_sur", "p1", *clients, master_database="once")

    assert "Retrying the master data merge after 40001" in caplog.text
    assert counts(retried) == counts(once)
    assert (retried.sources_inserted, retried.contacts_inserted) == (90, 40)
    assert live_contacts(store, "retried") == live_contacts(store, "once")
    store.dispose()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (pa.table({"hermes_id": ["1"]}), "the valid rows lack the columns"),
        (
            clean_table([client("1", None, 1), client("2", "   ", 1)]),
            r"valid rows without an email that are not deleted \(hermes_id \['1', '2'\]\)",
        ),
        (
            clean_table([client("1", "a@x.cl", 1)]).set_column(
                CLEAN_SCHEMA.get_field_index("birth_date"),
                "birth_date",
                pa.array(["not a date"]),
            ),
            "the valid rows do not fit their schema",
        ),
    ],
)
def test_a_malformed_partition_is_refused_with_a_clear_message(
    store: MasterDataStore, table: pa.Table, message: str
) -> None:
    load(store, "tienda_norte", "p1", client("9", "z@example.cl", 1), rejected=["8"])
    before = snapshot(store)

    with pytest.raises(PartitionInputError, match=message):
        store.load_partition(
            integration="tienda_norte",
            master_database=MASTER_DB,
            partition_key="p1",
            valid=table,
            rejected=rejected_table("7"),
        )

    assert snapshot(store) == before


def test_the_password_never_shows(tmp_path: Path) -> None:
    secret = "s3cr3t-Pa55"
    store = MasterDataStore(f"postgresql+psycopg://hermes:{secret}@127.0.0.1:1/masterdata")
    assert secret not in repr(store) and secret not in store.display_url
    assert "hermes:***@127.0.0.1:1" in store.display_url

    with pytest.raises(MasterDataError) as failure:
        store.ensure_schema()  # nothing listens on port 1
    assert "127.0.0.1" in str(failure.value)
    assert secret not in "".join(traceback.format_exception(failure.value))

    for url in (f"postgresql://u:{secret}@host:port/db", f"mysql://u:{secret}@host/db"):
        with pytest.raises(MasterDataError) as failure:
            MasterDataStore(url)
        assert secret not in "".join(traceback.format_exception(failure.value))


def test_the_default_url_is_a_sqlite_file_in_the_state_folder(tmp_path: Path) -> None:
    url = default_masterdata_url(tmp_path / "state")
    store = MasterDataStore(url)
    store.ensure_schema()  # creates the folder
    assert (tmp_path / "state" / "masterdata.sqlite").is_file()
    assert sa.make_url(url).database == str(tmp_path / "state" / "masterdata.sqlite")
    store.dispose()


# --- Order independence ----------------------------------------------------------------------

EMAILS = ["ana@example.cl", "bea@example.cl", "cata@example.cl"]


@dataclass(frozen=True)
class Version:
    integration: str
    hermes_id: str
    hours: int
    email: str | None
    deleted: bool
    fields: tuple[tuple[str, Any], ...]

    def as_client(self) -> dict[str, Any]:
        return client(
            self.hermes_id, self.email, self.hours, deleted=self.deleted, **dict(self.fields)
        )

    @property
    def partition_key(self) -> str:
        return f"window-{self.hours // 3}"  # time windows: each version in one partition


def partitions(versions: Sequence[Version]) -> dict[tuple[str, str], list[Version]]:
    """The versions by (integration, partition key)."""
    result: dict[tuple[str, str], list[Version]] = {}
    for version in versions:
        result.setdefault((version.integration, version.partition_key), []).append(version)
    return result


def load_in_order(
    store: MasterDataStore,
    by_partition: dict[tuple[str, str], list[Version]],
    order: Sequence[tuple[str, str]],
) -> None:
    for integration, partition_key in order:
        clients = [version.as_client() for version in by_partition[(integration, partition_key)]]
        load(store, integration, partition_key, *clients)


def expected_live_contacts(versions: Sequence[Version]) -> dict[str, dict[str, Any]]:
    """The live contacts, computed from the rules alone."""
    latest: dict[tuple[str, str], Version] = {}
    for version in versions:
        key = (version.integration, version.hermes_id)
        if key not in latest or version.hours > latest[key].hours:
            latest[key] = version
    by_email: dict[str, list[Version]] = {}
    for version in latest.values():
        if not version.deleted:
            by_email.setdefault(str(version.email), []).append(version)
    expected = {}
    for email, group in by_email.items():
        contact: dict[str, Any] = {}
        for name in CONTACT_FIELDS:
            valued = [(v.hours, dict(v.fields).get(name)) for v in group]
            valued = [(hours, value) for hours, value in valued if value not in (None, "")]
            if not valued:
                contact[name] = None
                continue
            newest = max(hours for hours, _ in valued)
            tied = [value for hours, value in valued if hours == newest]
            contact[name] = min(tied) if name == "accepts_marketing" else max(tied)
        contact["updated_at"] = at(max(v.hours for v in group))
        expected[email] = contact
    return expected


def assert_consistent(store: MasterDataStore, versions: Sequence[Version]) -> None:
    """The live contacts follow the rules, and every link between the tables holds."""
    assert live_contacts(store) == expected_live_contacts(versions)
    by_id = {row["id"]: row for row in rows(store, ms.master_contacts)}
    live_sources = [row for row in sources(store).values() if row["deleted_at"] is None]
    for source in live_sources:
        contact = by_id[source["contact_id"]]
        assert (contact["email"], contact["deleted_at"]) == (source["email"], None)
    fed = {source["contact_id"] for source in live_sources}
    assert {id for id, row in by_id.items() if row["deleted_at"] is None} == fed


version_fields = st.fixed_dictionaries(
    {
        "first_name": st.sampled_from([None, "", "Ana", "Bea"]),
        "city": st.sampled_from([None, "Santiago", "Talca"]),
        "accepts_marketing": st.sampled_from([None, True, False]),
    }
)


@st.composite
def histories(draw: st.DrawFn) -> list[Version]:
    """Client histories of up to three integrations sharing a few emails."""
    versions = []
    for integration in draw(st.sets(st.sampled_from(["norte", "sur", "web"]), min_size=1)):
        for hermes_id in draw(st.sets(st.sampled_from(["1", "2", "3"]), min_size=1)):
            for hours in draw(st.sets(st.integers(0, 8), min_size=1, max_size=3)):
                deleted = draw(st.booleans()) and draw(st.booleans())
                email = draw(st.sampled_from(EMAILS))
                versions.append(
                    Version(
                        integration=integration,
                        hermes_id=hermes_id,
                        hours=hours,
                        email=None if deleted and draw(st.booleans()) else email,
                        deleted=deleted,
                        fields=tuple(sorted(draw(version_fields).items())),
                    )
                )
    return versions


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(versions=histories(), data=st.data())
def test_the_live_contacts_do_not_depend_on_the_order_of_loads(
    versions: list[Version], data: st.DataObject
) -> None:
    by_partition = partitions(versions)
    order = data.draw(st.permutations(sorted(by_partition)), label="order")
    for attempt in (order, order[::-1]):
        with tempfile.TemporaryDirectory() as folder:
            store = MasterDataStore(default_masterdata_url(Path(folder)))
            store.ensure_schema()
            load_in_order(store, by_partition, attempt)
            assert_consistent(store, versions)
            store.dispose()


def fixed_histories(seed: int, clients_per_integration: int) -> list[Version]:
    """A deterministic set of histories with updates, email changes and tombstones."""
    rng = random.Random(seed)
    emails = [f"persona{n}@example.cl" for n in range(int(clients_per_integration * 0.7))]
    versions = []
    for integration in ("norte", "sur", "web"):
        for n in range(clients_per_integration):
            email = rng.choice(emails)
            for hours in sorted(rng.sample(range(12), rng.choice([1, 1, 2, 3]))):
                deleted = rng.random() < 0.1
                if rng.random() < 0.1:
                    email = rng.choice(emails)
                fields = {
                    "first_name": rng.choice([None, "Ana", "Bea", "Cata"]),
                    "city": rng.choice([None, "Santiago", "Talca"]),
                    "accepts_marketing": rng.choice([None, True, False]),
                }
                hermes_id = f"{integration}-{n}"
                fields_ = tuple(sorted(fields.items()))
                versions.append(Version(integration, hermes_id, hours, email, deleted, fields_))
    return versions


@pytest.mark.postgres
def test_on_postgresql_too_the_live_contacts_do_not_depend_on_the_order_of_loads(
    postgres_masterdata_url: str,
) -> None:
    versions = fixed_histories(seed=7, clients_per_integration=40)
    by_partition = partitions(versions)
    results = []
    for order in (sorted(by_partition), sorted(by_partition, reverse=True)):
        store = empty_postgres_store(postgres_masterdata_url)
        load_in_order(store, by_partition, order)
        assert_consistent(store, versions)
        results.append(live_contacts(store))
        store.dispose()
    assert results[0] == results[1]


NO_REJECTS = rejected_table()

# --- Partitions loaded together --------------------------------------------------------------

# Columns that record when and in which order rows were written, not what they hold.
LOAD_TIME_COLUMNS = {"id", "loaded_at", "rejected_at"}


def stored_content(store: MasterDataStore) -> dict[str, list[tuple]]:
    """Everything the master tables hold but load times and row ids; a source names its
    contact by email (ids depend on the order rows were inserted in)."""
    contact_emails = {row["id"]: row["email"] for row in rows(store, ms.master_contacts)}
    content = {}
    for table in ms.METADATA.sorted_tables:
        if table.name == "master_databases":  # when each was created and last loaded
            continue
        values = []
        for row in rows(store, table):
            if "contact_id" in row:
                row["contact_id"] = contact_emails.get(row["contact_id"])
            values.append(tuple(v for k, v in sorted(row.items()) if k not in LOAD_TIME_COLUMNS))
        content[table.name] = sorted(values, key=repr)
    return content


def partition_rows(key: str, versions: Sequence[Version]) -> PartitionRows:
    clients = [version.as_client() for version in versions]
    ids = [version.hermes_id for version in versions if version.deleted]
    return PartitionRows(key, clean_table(clients), rejected_table(*ids), content=f"digest-{key}")


def load_together(
    store: MasterDataStore, integration: str, group: Sequence[PartitionRows]
) -> LoadResult:
    return store.load_partitions(
        integration=integration, master_database=MASTER_DB, partitions=group
    )


def windows_of(versions: Sequence[Version], integration: str) -> list[tuple[str, list[Version]]]:
    """An integration's partitions in time order (a window of three hours each)."""
    by_partition = partitions(versions)
    keys = sorted(
        (key for name, key in by_partition if name == integration),
        key=lambda key: int(key.removeprefix("window-")),
    )
    return [(key, by_partition[(integration, key)]) for key in keys]


def load_both_ways(
    url_one_by_one: str, url_together: str, versions: Sequence[Version], group_sizes: list[int]
) -> tuple[MasterDataStore, MasterDataStore]:
    """Load the ``web`` integration's partitions one by one into one store, and in consecutive
    groups of ``group_sizes`` into the other, after the other integrations' partitions (also
    loaded one by one), so that the groups meet contacts and sources already stored."""
    stores = []
    for url, grouped in ((url_one_by_one, False), (url_together, True)):
        store = MasterDataStore(url)
        store.ensure_schema()
        for integration in ("norte", "sur"):
            for key, group in windows_of(versions, integration):
                load_together(store, integration, [partition_rows(key, group)])
        pending = [partition_rows(key, group) for key, group in windows_of(versions, "web")]
        sizes = iter(group_sizes) if grouped else iter(())
        while pending:
            size = max(1, next(sizes, 1))
            load_together(store, "web", pending[:size])
            pending = pending[size:]
        stores.append(store)
    return stores[0], stores[1]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    versions=histories(),
    group_sizes=st.lists(st.integers(1, 4), min_size=1, max_size=6),
)
def test_partitions_loaded_together_leave_what_loading_them_one_by_one_leaves(
    versions: list[Version], group_sizes: list[int]
) -> None:
    versions = [*versions, *(replace(v, integration="web") for v in versions)]
    with tempfile.TemporaryDirectory() as folder:
        one_by_one, together = load_both_ways(
            default_masterdata_url(Path(folder) / "one"),
            default_masterdata_url(Path(folder) / "together"),
            versions,
            group_sizes,
        )
        assert stored_content(together) == stored_content(one_by_one)
        one_by_one.dispose()
        together.dispose()


@st.composite
def later_changes(draw: st.DrawFn) -> list[Version]:
    """Clients stored by a first partition, then each changed at most once in later ones:
    groups that merge in one transaction, some of whose contacts lose their sources over
    several partitions."""
    versions = []
    for hermes_id in ("1", "2", "3", "4", "5"):
        email = draw(st.sampled_from(EMAILS[:2]))
        first = Version("web", hermes_id, 0, email, False, tuple(draw(version_fields).items()))
        versions.append(first)
        if draw(st.booleans()):
            deleted = draw(st.booleans())
            email = None if deleted else draw(st.sampled_from(EMAILS))
            hours = draw(st.integers(3, 14))
            fields = tuple(draw(version_fields).items())
            versions.append(Version("web", hermes_id, hours, email, deleted, fields))
    return versions


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(versions=later_changes(), group_sizes=st.lists(st.integers(2, 4), min_size=1, max_size=3))
def test_later_partitions_loaded_together_leave_what_loading_them_one_by_one_leaves(
    versions: list[Version], group_sizes: list[int]
) -> None:
    with tempfile.TemporaryDirectory() as folder:
        one_by_one, together = load_both_ways(
            default_masterdata_url(Path(folder) / "one"),
            default_masterdata_url(Path(folder) / "together"),
            versions,
            [1, *group_sizes],  # the first partition alone: what the groups find stored
        )
        assert stored_content(together) == stored_content(one_by_one)
        one_by_one.dispose()
        together.dispose()


@pytest.mark.postgres
def test_on_postgresql_too_partitions_loaded_together_leave_what_one_by_one_leaves(
    postgres_masterdata_url: str,
) -> None:
    versions = fixed_histories(seed=11, clients_per_integration=40)
    engine = sa.create_engine(postgres_masterdata_url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("DROP SCHEMA IF EXISTS together CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA together"))
    engine.dispose()
    drop_tables(postgres_masterdata_url)
    # The same database, the second store in a schema of its own (search_path).
    together_url = sa.make_url(postgres_masterdata_url).update_query_dict(
        {"options": "-csearch_path=together"}
    )
    one_by_one, together = load_both_ways(
        postgres_masterdata_url,
        together_url.render_as_string(hide_password=False),
        versions,
        group_sizes=[3, 4, 2],
    )
    try:
        assert stored_content(together) == stored_content(one_by_one)
    finally:
        one_by_one.dispose()
        together.dispose()
        engine = sa.create_engine(postgres_masterdata_url)
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
            conn.execute(sa.text("DROP SCHEMA together CASCADE"))
        engine.dispose()


def test_a_client_that_leaves_its_contact_and_comes_back_within_a_group_is_merged_exactly(
    tmp_path: Path,
) -> None:
    # Every client ends with the contact it had: only the one created on the way changes.
    versions = [
        Version("web", "1", 0, "ana@example.cl", False, (("city", "Talca"),)),
        Version("web", "2", 1, "ana@example.cl", False, (("first_name", "Ana"),)),
        Version("web", "1", 3, "bea@example.cl", False, (("city", "Arica"),)),
        Version("web", "1", 6, "ana@example.cl", False, (("city", "Ancud"),)),
    ]
    one_by_one, together = load_both_ways(
        default_masterdata_url(tmp_path / "one"),
        default_masterdata_url(tmp_path / "together"),
        versions,
        [1, 2],  # the first partition alone, then the two others together
    )
    assert stored_content(together) == stored_content(one_by_one)
    bea = contacts(together)["bea@example.cl"]
    assert (bea["city"], bea["deleted_at"]) == ("Arica", at(6))
    assert live_contacts(together)["ana@example.cl"]["city"] == "Ancud"
    one_by_one.dispose()
    together.dispose()


def test_a_contact_that_loses_its_sources_over_two_partitions_keeps_its_last_live_content(
    store: MasterDataStore,
) -> None:
    load(
        store,
        "tienda_norte",
        "p1",
        client("1", "ana@example.cl", 1, first_name="Bea"),
        client("2", "ana@example.cl", 2, first_name="Ana", city="Talca"),
    )
    # Merged one by one, p2 leaves the contact with source 1 alone (first name Bea, no city),
    # and p3 deletes it as it is then.
    result = load_together(
        store,
        "tienda_norte",
        [
            PartitionRows(
                "p2", clean_table([client("2", None, 3, deleted=True)]), rejected_table()
            ),
            PartitionRows(
                "p3", clean_table([client("1", None, 4, deleted=True)]), rejected_table()
            ),
        ],
    )
    ana = contacts(store)["ana@example.cl"]
    assert (ana["first_name"], ana["city"], ana["deleted_at"]) == ("Bea", None, at(4))
    assert result.partition_keys == ("p2", "p3")
    assert (result.sources_updated, result.contacts_deleted) == (2, 1)


def test_a_client_in_two_partitions_loaded_together_goes_through_both_versions(
    store: MasterDataStore,
) -> None:
    # Merged one by one, version 1 creates the contact bea@ and version 2 moves the client
    # away and deletes it: the contact stays, soft-deleted.
    load_together(
        store,
        "tienda_norte",
        [
            PartitionRows("p1", clean_table([client("1", "bea@example.cl", 1)]), rejected_table()),
            PartitionRows("p2", clean_table([client("1", "ana@example.cl", 2)]), rejected_table()),
        ],
    )
    assert contacts(store)["bea@example.cl"]["deleted_at"] == at(2)
    assert contacts(store)["ana@example.cl"]["deleted_at"] is None


def test_a_new_master_databases_first_partitions_together_count_a_contact_left_on_the_way(
    store: MasterDataStore,
) -> None:
    result = load_together(
        store,
        "tienda_norte",
        [
            PartitionRows(
                "p1",
                clean_table([client("1", "bea@example.cl", 1), client("2", "carla@example.cl", 1)]),
                NO_REJECTS,
            ),
            PartitionRows(
                "p2",
                clean_table(
                    [
                        client("1", "ana@example.cl", 2),  # leaves bea@, created in p1
                        client("3", "carla@example.cl", 3, city="Talca"),
                    ]
                ),
                NO_REJECTS,
            ),
        ],
    )
    assert counts(result) == {
        "sources_inserted": 3, "sources_updated": 0, "sources_unchanged": 1,
        "contacts_inserted": 2, "contacts_updated": 0, "contacts_unchanged": 0,
        "contacts_deleted": 1, "contacts_revived": 0, "rejected": 0,
    }  # fmt: skip
    assert contacts(store)["bea@example.cl"]["deleted_at"] == at(2)
    assert set(live_contacts(store)) == {"ana@example.cl", "carla@example.cl"}
    assert live_contacts(store)["carla@example.cl"]["city"] == "Talca"


def test_a_client_updated_in_two_partitions_under_one_email_is_merged_in_one_transaction(
    store: MasterDataStore, caplog: pytest.LogCaptureFixture
) -> None:
    load(store, "tienda_norte", "p1", client("1", "vieja@example.cl", 1, first_name="Ana"))
    caplog.set_level(logging.INFO, logger="hermes_orchestration.masterdata")
    result = load_together(
        store,
        "tienda_norte",
        [
            PartitionRows("p2", clean_table([client("1", "ana@example.cl", 2)]), NO_REJECTS),
            PartitionRows("p3", clean_table([client("2", "bea@example.cl", 3)]), NO_REJECTS),
            PartitionRows(
                "p4", clean_table([client("1", "ana@example.cl", 4, city="Talca")]), NO_REJECTS
            ),
        ],
    )
    assert "one by one" not in caplog.text
    # Its first version left the old contact: deleted then, as merging one by one would.
    assert contacts(store)["vieja@example.cl"]["deleted_at"] == at(2)
    assert contacts(store)["vieja@example.cl"]["updated_at"] == at(2)
    assert live_contacts(store)["ana@example.cl"]["city"] == "Talca"
    assert (result.sources_updated, result.sources_inserted, result.contacts_deleted) == (1, 1, 1)


def test_a_range_whose_later_rows_are_refused_writes_nothing_and_leaves_the_store_usable(
    store: MasterDataStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Rows are copied a batch at a time, each sent while the next one is made: the refusal comes
    # after earlier batches have reached the database.
    monkeypatch.setattr(masterdata, "_BATCH_ROWS", 2)
    load(store, "tienda_norte", "p0", client("9", "z@example.cl", 0))
    before = snapshot(store)
    clients = [client(str(n), f"c{n}@example.cl", 1) for n in range(6)]
    group = [
        PartitionRows("p1", clean_table(clients), rejected_table("x")),
        PartitionRows("p2", clean_table([client("7", None, 2)]), rejected_table()),
    ]
    with pytest.raises(PartitionInputError, match=r"not deleted \(hermes_id \['7'\]\)"):
        load_together(store, "tienda_norte", group)
    assert snapshot(store) == before

    load_together(store, "tienda_norte", group[:1])
    assert len(contacts(store)) == 7


@pytest.mark.postgres
def test_rows_postgresql_refuses_in_a_later_batch_write_nothing(
    postgres_masterdata_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(masterdata, "_BATCH_ROWS", 2)
    store = empty_postgres_store(postgres_masterdata_url)
    load(store, "tienda_norte", "p0", client("9", "z@example.cl", 0))
    before = snapshot(store)
    rows = clean_table([client(str(n), f"c{n}@example.cl", 1) for n in range(6)])
    # The last row (in the third batch copied) has a birth date PostgreSQL refuses: millions of
    # years away, beyond the dates Arrow writes as text.
    days = pa.array([None] * 5 + [2_147_000_000], pa.int32()).cast(pa.date32())
    rows = rows.set_column(CLEAN_SCHEMA.get_field_index("birth_date"), "birth_date", days)
    with pytest.raises(MasterDataError, match="rolled back, nothing of it was written"):
        store.load_partition(
            integration="tienda_norte",
            master_database=MASTER_DB,
            partition_key="p1",
            valid=rows,
            rejected=rejected_table(),
        )
    assert snapshot(store) == before
    store.dispose()


def test_a_failed_load_of_partitions_together_writes_nothing(store: MasterDataStore) -> None:
    load(store, "tienda_norte", "p1", client("1", "ana@example.cl", 1, first_name="Ana"))
    before = snapshot(store)
    group = [
        PartitionRows("p2", clean_table([client("2", "bea@example.cl", 2)]), rejected_table("x")),
        PartitionRows("p3", clean_table([client("3", "cata@example.cl", 3)]), rejected_table()),
    ]
    hook = fail_when("INSERT INTO contact_sources")
    sa.event.listen(store.engine, "before_cursor_execute", hook)
    try:
        with pytest.raises(RuntimeError, match="injected failure"):
            load_together(store, "tienda_norte", group)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", hook)
    assert snapshot(store) == before


def test_partitions_in_which_a_client_changes_email_are_merged_in_one_transaction(
    store: MasterDataStore,
) -> None:
    load(store, "tienda_norte", "p0", client("9", "cata@example.cl", 0))
    before = snapshot(store)
    group = [
        PartitionRows("p1", clean_table([client("1", "ana@example.cl", 1)]), NO_REJECTS, "c1"),
        PartitionRows("p2", clean_table([client("1", "bea@example.cl", 2)]), NO_REJECTS, "c2"),
        PartitionRows("p3", clean_table([client("9", None, 3, deleted=True)]), NO_REJECTS, "c3"),
    ]
    merges = []

    def fail_the_last_write(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        if statement.lstrip().startswith("INSERT INTO hermes_changed"):
            merges.append(statement)
        if statement.lstrip().startswith("INSERT INTO partition_loads"):
            raise sa.exc.OperationalError(statement, {}, Exception("injected failure"))

    sa.event.listen(store.engine, "before_cursor_execute", fail_the_last_write)
    try:
        with pytest.raises(MasterDataError, match="rolled back, nothing of it was written"):
            load_together(store, "tienda_norte", group)
    finally:
        sa.event.remove(store.engine, "before_cursor_execute", fail_the_last_write)
    assert len(merges) == 1  # one merge, of the three partitions
    assert snapshot(store) == before

    result = load_together(store, "tienda_norte", group)
    # Merged one by one, p1 creates ana@ and p2 moves the client to bea@, deleting ana@ then.
    assert contacts(store)["ana@example.cl"]["deleted_at"] == at(2)
    assert live_contacts(store).keys() == {"bea@example.cl"}
    assert contacts(store)["cata@example.cl"]["deleted_at"] == at(3)
    assert (result.contacts_inserted, result.contacts_deleted) == (1, 2)
    assert [row["partition_key"] for row in rows(store, ms.partition_loads)] == ["p1", "p2", "p3"]


@pytest.mark.parametrize("backend_url", BACKENDS, indirect=True)
def test_a_later_partitions_older_version_changes_nothing_when_merged_together_too(
    backend_url: str, tmp_path: Path
) -> None:
    group = [
        PartitionRows(
            "p1", clean_table([client("1", "ana@example.cl", 5, city="Talca")]), NO_REJECTS
        ),
        PartitionRows(
            "p2",
            clean_table([client("1", "bea@example.cl", 3, city="Old"), client("2", "c@x.cl", 4)]),
            NO_REJECTS,
        ),
    ]
    one_by_one = MasterDataStore(default_masterdata_url(tmp_path / "one"))
    one_by_one.ensure_schema()
    for partition in group:
        load_together(one_by_one, "tienda_norte", [partition])
    together = MasterDataStore(backend_url)
    together.ensure_schema()
    load_together(together, "tienda_norte", group)
    assert stored_content(together) == stored_content(one_by_one)
    assert live_contacts(together)["ana@example.cl"]["city"] == "Talca"
    one_by_one.dispose()
    together.dispose()


def test_partitions_listed_twice_in_one_load_are_refused(store: MasterDataStore) -> None:
    part = PartitionRows("p1", clean_table([client("1", "ana@example.cl", 1)]), rejected_table())
    with pytest.raises(PartitionInputError, match="partitions listed twice in one load"):
        load_together(store, "tienda_norte", [part, part])
    with pytest.raises(PartitionInputError, match="no partition to load"):
        load_together(store, "tienda_norte", [])
    assert stored_content(store) == {table: [] for table in stored_content(store)}


# --- Concurrency -------------------------------------------------------------------------------


def _load_in_worker(
    url: str, loads: list[tuple[str, str, pa.Table]], barrier: Any, errors: Any
) -> None:
    """Runs in a spawned process: create the schema and load, all at once with the others."""
    try:
        store = MasterDataStore(url)
        barrier.wait(timeout=60)
        store.ensure_schema()
        for integration, partition_key, table in loads:
            store.load_partition(
                integration=integration,
                master_database=MASTER_DB,
                partition_key=partition_key,
                valid=table,
                rejected=rejected_table(f"{integration}-{partition_key}"),
            )
        store.dispose()
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def comparable_state(store: MasterDataStore) -> tuple[Any, ...]:
    """What every serial order of the same loads agrees on."""
    versions = {
        key: (
            row["updated_at"],
            row["deleted_at"],
            row["email"] if row["deleted_at"] is None else None,
        )
        for key, row in sources(store).items()
    }
    rejected = sorted(
        (row["integration"], row["hermes_id"]) for row in rows(store, ms.rejected_clients)
    )
    return live_contacts(store), versions, rejected


def run_at_once(context: Any, target: Any, argument_sets: Sequence[tuple[Any, ...]]) -> None:
    """Run ``target(*arguments, barrier, errors)`` in one process per argument set, released
    together by the barrier; fail with the workers' tracebacks if any of them failed."""
    barrier, errors = context.Barrier(len(argument_sets)), context.Queue()
    processes = [
        context.Process(target=target, args=(*arguments, barrier, errors))
        for arguments in argument_sets
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
    failures = []
    while not errors.empty():
        failures.append(errors.get())
    assert not failures, "\n".join(failures)
    assert [process.exitcode for process in processes] == [0] * len(processes)


def _create_schema_in_worker(url: str, barrier: Any, errors: Any) -> None:
    """Runs in another process: open the store and create its tables, all at once with others."""
    try:
        store = MasterDataStore(url)
        barrier.wait(timeout=60)
        store.ensure_schema()
        store.dispose()
    except BaseException:
        errors.put(traceback.format_exc())
        raise


def test_processes_opening_a_new_sqlite_master_database_at_once_all_succeed(
    tmp_path: Path,
) -> None:
    # The first connection switches a new file to WAL, which SQLite may refuse at once ("database
    # is locked") to a process racing another; each one waits its turn instead of failing.
    context = multiprocessing.get_context("fork")
    for attempt in range(6):
        url = f"sqlite:///{tmp_path / f'new_{attempt}.sqlite'}"
        run_at_once(context, _create_schema_in_worker, [(url,)] * 8)
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        engine.dispose()


@pytest.mark.parametrize("backend_url", BACKENDS, indirect=True)
def test_concurrent_loads_give_the_result_of_loading_one_after_the_other(
    backend_url: str,
) -> None:
    versions = fixed_histories(seed=11, clients_per_integration=1000)
    by_partition = partitions(versions)
    tables = {
        key: clean_table([v.as_client() for v in group]) for key, group in by_partition.items()
    }
    # One process per integration, each loading its partitions newest first.
    work: dict[str, list[tuple[str, str, pa.Table]]] = {}
    for (integration, partition_key), table in sorted(tables.items(), reverse=True):
        work.setdefault(integration, []).append((integration, partition_key, table))

    run_at_once(
        multiprocessing.get_context("spawn"),
        _load_in_worker,
        [(backend_url, loads) for loads in work.values()],
    )

    concurrent_store = MasterDataStore(backend_url)
    concurrent = comparable_state(concurrent_store)
    concurrent_store.dispose()
    drop_tables(backend_url)
    serial_store = MasterDataStore(backend_url)
    serial_store.ensure_schema()
    for integration, partition_key in sorted(tables):
        serial_store.load_partition(
            integration=integration,
            master_database=MASTER_DB,
            partition_key=partition_key,
            valid=tables[(integration, partition_key)],
            rejected=rejected_table(f"{integration}-{partition_key}"),
        )
    assert concurrent == comparable_state(serial_store)
    assert_consistent(serial_store, versions)
    serial_store.dispose()
