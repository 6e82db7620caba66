"""Hostile client records are stored verbatim or rejected with a reason, never executed.

A site serves, among ordinary clients, records built to break a careless pipeline: SQL in every
text field, quotes and format placeholders, emoji, combining and bidirectional characters,
control characters, 1 MB strings, deeply nested ``custom_fields``, numbers and booleans where
strings belong. A real sync loads them into SQLite and PostgreSQL; each one must end exactly as
the table below says, the run must succeed, and no statement sent to the database may carry a
value in its text: every value travels as a bound parameter (or in a ``COPY`` stream).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from hermes_orchestration.simulator import HermesSimulator, SimulatorConfig
from hermes_orchestration_tests.conftest import TOKEN, TOKEN_ENV
from hermes_orchestration_tests.faults_support import (
    FaultProxy,
    Rewrite,
    definitions,
    fresh_postgres,
    materialized,
    memory_instance,
    rows_of,
    step_failures,
    sync,
    write_integrations,
)

DAY = "2026-11-02"  # the one daily partition, in America/Santiago
INTEGRATION = "tienda_hostil"
DATABASE = "clientes_hostil"
MEGABYTE = 1_000_000

# Values the simulator refuses to hold: it serves a marker and the proxy swaps in the value.
# orjson, the client's JSON decoder, reads up to 1024 levels of nesting, and the pipeline stores
# up to about 250: a value nested 600 levels deep is read, then cleared with a note.
DEEP_MARKER = "__nested_600_levels__"
BAD_INSTANT = "2026-11-02T12:00:00Z'; DROP TABLE x; --"
BAD_INSTANT_MARKER = "2026-11-02T12:59:59.999999Z"


def nested(levels: int) -> dict[str, Any]:
    value: dict[str, Any] = {"fin": True}
    for _ in range(levels - 1):
        value = {"k": value}
    return value


def nested_lists(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels - 1):
        value = [value]
    return value


SWAPPED: dict[str, Any] = {DEEP_MARKER: nested_lists(600), BAD_INSTANT_MARKER: BAD_INSTANT}
SWAP = Rewrite(
    {json.dumps(marker).encode(): json.dumps(value).encode() for marker, value in SWAPPED.items()}
)


@dataclass(frozen=True)
class Case:
    """A hostile record and its fate: its stored fields, or its rejection reasons."""

    name: str
    changes: dict[str, Any]
    stored: dict[str, Any] = field(default_factory=dict)
    rejected: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()  # fields cleared, with the reason noted in quality_notes


SQL = {
    "first_name": "Robert'); DROP TABLE master_contacts;--",
    "last_name": "' OR '1'='1",
    "city": '"; DELETE FROM contact_sources; --',
    "region": "x'); UPDATE master_contacts SET email = NULL; --",
}
QUOTES = {"first_name": 'O\'Brien "Bob" \\ \\\\ `tick`', "region": "%s %d {0} $1 :name ?"}
UNICODE = {
    "first_name": "Jose\u0301 👩‍👩‍👧 Zoë \u202egnp.exe",
    "last_name": "Z\u0335\u0321a\u0334l\u0338g\u0336o ﷽",
    "city": "東京 Ñuñoa",
}
CONTROL = {"first_name": "línea\nnueva\ttab\x07bell\x1b[31mrojo", "city": "a\rb\x7fc"}
HUGE = {"city": "x" * MEGABYTE, "last_name": "ñ" * (MEGABYTE // 2)}
DEEP_200 = {"custom_fields": nested(200)}
QUOTED_EMAIL = "o'brien--@example.cl"  # a quote is legal in an address
HOSTILE_CUSTOM = {"custom_fields": {"'; DROP TABLE t; --": "🎉", "n": 1.5e300, "nul": "a\x00b"}}

CASES: tuple[Case, ...] = (
    Case("sql_in_text_fields", SQL, stored=SQL),
    Case("quotes_and_placeholders", QUOTES, stored=QUOTES),
    Case("emoji_combining_bidi", UNICODE, stored=UNICODE),
    Case("control_characters", CONTROL, stored=CONTROL),
    # PostgreSQL text cannot hold NUL: it is dropped from a text field, the rest kept.
    Case("nul_character", {"last_name": "Ana\x00María"}, stored={"last_name": "AnaMaría"}),
    Case("one_megabyte_strings", HUGE, stored=HUGE),
    Case(
        "custom_fields_200_levels_deep",
        DEEP_200,
        stored={"custom_fields": nested(200)},
    ),
    Case(
        "custom_fields_600_levels_deep",
        {"custom_fields": DEEP_MARKER},
        stored={"custom_fields": None},
        notes=("custom_fields",),
    ),
    Case(
        "hostile_custom_fields",
        HOSTILE_CUSTOM,
        stored=HOSTILE_CUSTOM,
    ),
    Case(
        "sql_named_unknown_property",
        {"'; DROP TABLE contact_sources; --": "v"},
        stored={"unknown_fields": {"'; DROP TABLE contact_sources; --": "v"}},
    ),
    # Numbers and booleans where strings belong are kept as their JSON text.
    Case(
        "numbers_where_strings_belong",
        {"first_name": 12345, "last_name": 6.5, "gender": True, "document_type": None},
        stored={"first_name": "12345", "last_name": "6.5", "gender": "true"},
    ),
    Case("number_as_country", {"country": 56}, stored={"country": None}, notes=("country",)),
    Case(
        "string_as_boolean",
        {"accepts_marketing": "yes; DROP TABLE x"},
        stored={"accepts_marketing": None},
        notes=("accepts_marketing",),
    ),
    Case(
        "custom_fields_not_an_object",
        {"custom_fields": "'; DROP TABLE t; --"},
        stored={"custom_fields": None},
        notes=("custom_fields",),
    ),
    Case("email_is_a_number", {"email": 42}, rejected=("invalid_email",)),
    Case(
        "email_with_sql",
        {"email": "'; DROP TABLE master_contacts; --@example.cl"},
        rejected=("invalid_email",),
    ),
    Case("email_with_quote", {"email": QUOTED_EMAIL}, stored={"email": QUOTED_EMAIL}),
    Case(
        "updated_at_with_sql", {"updated_at": BAD_INSTANT_MARKER}, rejected=("invalid_updated_at",)
    ),
)


def record(index: int, case: Case) -> dict[str, Any]:
    """An ordinary valid client, then the case's hostile changes (markers as they are)."""
    base: dict[str, Any] = {
        "id": f"hostil-{index:02d}",
        "email": f"hostil.{index}@example.cl",
        "first_name": "Ana",
        "last_name": "Pérez",
        "document_type": "RUT",
        "document_number": "11.111.111-1",
        "phone": "+56988642381",
        "birth_date": "1990-01-02",
        "gender": "female",
        "country": "CL",
        "region": "Metropolitana",
        "city": "Santiago",
        "accepts_marketing": True,
        "created_at": "2026-11-01T10:00:00Z",
        "updated_at": f"2026-11-02T12:{index:02d}:00Z",
        "deleted_at": None,
        "custom_fields": {"segmento": "oro"},
    }
    base.update(case.changes)
    return base


def served(index: int, case: Case) -> dict[str, Any]:
    """The record as the client receives it: markers swapped for their values."""
    return {
        key: SWAPPED.get(value, value) if isinstance(value, str) else value
        for key, value in record(index, case).items()
    }


@pytest.fixture(scope="module")
def site() -> Iterator[HermesSimulator]:
    config = SimulatorConfig(
        clients=40,
        seed=99,
        start=datetime(2026, 11, 2, 3, 0, tzinfo=UTC),
        end=datetime(2026, 11, 3, 3, 0, tzinfo=UTC),
        dirty_share=0.0,
        tokens={TOKEN: ("clients:read",)},
    )
    with HermesSimulator(config) as simulator:
        simulator.dataset.add_records(record(index, case) for index, case in enumerate(CASES))
        yield simulator


@pytest.fixture(params=["sqlite", "postgresql"])
def masterdata_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'masterdata.sqlite'}"
    else:
        with fresh_postgres() as url:
            yield url


@dataclass
class Statements:
    """Every statement text SQLAlchemy sends to a database while it listens."""

    texts: list[str] = field(default_factory=list)

    def __call__(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.texts.append(statement)


def test_hostile_records_are_stored_verbatim_or_rejected_with_a_reason_and_never_executed(
    site: HermesSimulator, masterdata_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    monkeypatch.setenv("HERMES_TEST_MASTERDATA_URL", masterdata_url)
    statements = Statements()
    with FaultProxy(site.url, lambda number, target: SWAP) as proxy:
        config = write_integrations(
            tmp_path / "integrations.yaml",
            site_url=proxy.url,
            names=[INTEGRATION],
            master_database=DATABASE,
            page_size=10,
        )
        defs = definitions(
            config, staging=tmp_path / "staging", masterdata_url_env="HERMES_TEST_MASTERDATA_URL"
        )
        sa.event.listen(sa.engine.Engine, "before_cursor_execute", statements)
        try:
            with memory_instance() as instance:
                result = sync(defs, config.integrations[0], instance, DAY)
        finally:
            sa.event.remove(sa.engine.Engine, "before_cursor_execute", statements)

    assert result.success, step_failures(result)
    listed = site.dataset.count(site.dataset.start, site.dataset.end)
    assert materialized(result)["raw_clients"]["rows_fetched"] == listed

    sources = {
        row["hermes_id"]: row
        for row in rows_as_dicts(masterdata_url, "SELECT * FROM contact_sources")
    }
    rejected = {
        row["hermes_id"]: row
        for row in rows_as_dicts(masterdata_url, "SELECT * FROM rejected_clients")
    }
    # Nothing was executed: every table is there, and every client is accounted for.
    assert len(sources) + len(rejected) == listed
    ordinary = listed - len(CASES)
    assert sum(not hermes_id.startswith("hostil-") for hermes_id in sources) == ordinary
    (contacts,) = rows_of(masterdata_url, "SELECT count(*) FROM master_contacts")
    assert contacts[0] == len(sources)

    for index, case in enumerate(CASES):
        hermes_id = f"hostil-{index:02d}"
        if case.rejected:
            assert hermes_id not in sources, case.name
            row = rejected[hermes_id]
            assert json.loads(row["reasons"]) == list(case.rejected), case.name
            # The raw record is kept exactly as it arrived.
            assert json.loads(row["record"]) == served(index, case), case.name
            continue
        assert hermes_id not in rejected, case.name
        row = sources[hermes_id]
        for name, value in case.stored.items():
            assert plain(name, row[name]) == value, f"{case.name}: {name}"
        noted = {note["field"] for note in json.loads(row["quality_notes"] or "[]")}
        assert noted == set(case.notes), case.name
        contact = rows_as_dicts(
            masterdata_url, "SELECT * FROM master_contacts WHERE id = :id", id=row["contact_id"]
        )[0]
        for name in case.stored:
            assert contact[name] == row[name], f"{case.name}: contact {name}"

    # Values travel as bound parameters, never in a statement's text.
    assert statements.texts
    for text in statements.texts:
        for value in (INTEGRATION, DATABASE, DAY, "hostil", "Robert'", "'1'='1", "NULL; --"):
            assert value not in text, text[:300]


def plain(name: str, stored: Any) -> Any:
    """A stored value as Python: JSON columns decoded, SQLite's 0/1 as a boolean."""
    if stored is None:
        return None
    if name in ("custom_fields", "unknown_fields"):
        return json.loads(stored)
    return bool(stored) if name == "accepts_marketing" else stored


def rows_as_dicts(url: str, query: str, **params: Any) -> list[dict[str, Any]]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row) for row in conn.execute(sa.text(query), params).mappings()]
    finally:
        engine.dispose()
