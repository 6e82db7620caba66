"""Specification of the validation rules: raw Hermes client records in, clean or rejected rows out.

Each rule is a table of raw records and the outcome it must produce. Records go through
``records_to_batch`` exactly as fetched pages do.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Mapping
from datetime import UTC, date, datetime, timedelta
from itertools import pairwise
from typing import Any

import numpy as np
import orjson
import phonenumbers
import pyarrow as pa
import pytest
from email_validator import EmailNotValidError, validate_email
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stdnum.cl import rut as cl_rut

from hermes_orchestration import reasons, validation
from hermes_orchestration.records import (
    CLEAN_SCHEMA,
    RAW_SCHEMA,
    REJECTED_SCHEMA,
    records_to_batch,
)
from hermes_orchestration.simulator import SimulatorConfig
from hermes_orchestration.simulator_data import ClientDataset
from hermes_orchestration.validation import (
    ISO_3166_ALPHA2,
    ValidationResult,
    latest_versions,
    updated_instants,
    validate_partition,
    validate_partitions,
    validate_row_groups,
)

TODAY = date(2025, 6, 15)
DROP = object()  # an override that removes the property from the record

BASE: dict[str, Any] = {
    "id": "c-1",
    "email": "ana.rojas@gmail.com",
    "first_name": "Ana",
    "last_name": "Rojas",
    "document_type": "RUT",
    "document_number": "12.345.678-5",
    "phone": "+56 9 8765 4321",
    "birth_date": "1990-01-02",
    "gender": "F",
    "country": "CL",
    "region": "Región Metropolitana",
    "city": "Santiago",
    "accepts_marketing": True,
    "created_at": "2024-01-10T09:30:00-03:00",
    "updated_at": "2024-05-01T12:00:00Z",
    "deleted_at": None,
    "custom_fields": {"tienda_favorita": "Providencia"},
}


def client(**overrides: Any) -> dict[str, Any]:
    """A valid client record with some properties replaced (or removed with DROP)."""
    record = {**BASE, **overrides}
    return {key: value for key, value in record.items() if value is not DROP}


def run(*records: Any, **options: Any) -> ValidationResult:
    options.setdefault("today", TODAY)
    return validate_partition(pa.Table.from_batches([records_to_batch(records)]), **options)


def the_valid_row(result: ValidationResult) -> dict[str, Any]:
    assert result.rejected.num_rows == 0, result.rejected.to_pylist()
    assert result.valid.num_rows == 1
    return result.valid.to_pylist()[0]


def the_rejected_row(result: ValidationResult) -> dict[str, Any]:
    assert result.valid.num_rows == 0, result.valid.to_pylist()
    assert result.rejected.num_rows == 1
    return result.rejected.to_pylist()[0]


def notes(row: Mapping[str, Any]) -> list[tuple[str, str]]:
    if row["quality_notes"] is None:
        return []
    return [(note["field"], note["reason"]) for note in orjson.loads(row["quality_notes"])]


def assert_conserved(result: ValidationResult) -> None:
    assert result.valid.schema == CLEAN_SCHEMA
    assert result.rejected.schema == REJECTED_SCHEMA
    assert result.rows_in == (
        result.valid.num_rows + result.rejected.num_rows + result.duplicates_dropped
    )


# --- Rejected rows ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "codes"),
    [
        ({"id": None}, ["missing_id"]),
        ({"id": DROP}, ["missing_id"]),
        ({"id": "   "}, ["missing_id"]),
        ({"updated_at": None}, ["invalid_updated_at"]),
        ({"updated_at": DROP}, ["invalid_updated_at"]),
        ({"updated_at": "2024-05-01"}, ["invalid_updated_at"]),
        ({"updated_at": "2024-05-01T12:00:00"}, ["invalid_updated_at"]),  # no offset
        ({"updated_at": "2024-05-01T12:00:00+0300"}, ["invalid_updated_at"]),
        ({"updated_at": "2024-05-01T12:00Z"}, ["invalid_updated_at"]),
        ({"updated_at": "2024-02-30T12:00:00Z"}, ["invalid_updated_at"]),
        ({"updated_at": "2024-05-01T24:00:00Z"}, ["invalid_updated_at"]),
        ({"updated_at": "2024-05-01T12:00:60Z"}, ["invalid_updated_at"]),
        ({"updated_at": "0001-01-01T00:00:00+01:00"}, ["invalid_updated_at"]),  # before year 1
        ({"updated_at": "ayer"}, ["invalid_updated_at"]),
        ({"updated_at": 1714564800}, ["invalid_updated_at"]),
        ({"deleted_at": "pronto"}, ["invalid_deleted_at"]),
        ({"deleted_at": "2024-05-01 12:00"}, ["invalid_deleted_at"]),
        ({"email": None}, ["missing_email"]),
        ({"email": DROP}, ["missing_email"]),
        ({"email": ""}, ["missing_email"]),
        ({"email": " \t "}, ["missing_email"]),
        ({"email": "ana.rojas"}, ["invalid_email"]),
        ({"email": "ana@@gmail.com"}, ["invalid_email"]),
        ({"email": "ana rojas@gmail.com"}, ["invalid_email"]),
        ({"email": "ana@gmail..com"}, ["invalid_email"]),
        ({"email": "ana@gmail"}, ["invalid_email"]),
        ({"email": "ana@tienda.local"}, ["invalid_email"]),  # special-use domain
        ({"email": "Ana <ana@gmail.com>"}, ["invalid_email"]),
        ({"email": 12}, ["invalid_email"]),
        ({"document_number": "12.345.678-9"}, ["invalid_rut"]),
        ({"document_type": " rut ", "document_number": "12345678K"}, ["invalid_rut"]),
        ({"document_number": "12.345.678"}, ["invalid_rut"]),
        ({"document_number": "no tiene"}, ["invalid_rut"]),
    ],
)
def test_each_rejection_code(overrides: dict[str, Any], codes: list[str]) -> None:
    record = client(**overrides)
    result = run(record)

    row = the_rejected_row(result)
    assert row["reasons"] == codes
    assert orjson.loads(row["record"]) == record  # the raw record, as it arrived
    assert result.rejected_by_reason == dict.fromkeys(codes, 1)
    assert_conserved(result)


@pytest.mark.parametrize("item", [[1, 2], "a string", 42, None, True])
def test_an_item_that_is_not_an_object_is_rejected_with_that_reason_alone(item: Any) -> None:
    row = the_rejected_row(run(item))

    assert row["reasons"] == ["not_an_object"]
    assert row["hermes_id"] is None and row["updated_at"] is None
    assert orjson.loads(row["record"]) == item


def test_an_empty_object_is_not_a_non_object() -> None:
    row = the_rejected_row(run({}))

    assert row["reasons"] == ["missing_id", "invalid_updated_at", "missing_email"]


def test_a_rejected_row_carries_all_its_reasons_in_catalogue_order() -> None:
    record = client(
        id=" ",
        updated_at="yesterday",
        deleted_at="soon",
        email="nope",
        document_number="1-1",
        phone="123",  # cleared fields do not matter once the row is rejected
    )

    row = the_rejected_row(run(record))

    assert row["reasons"] == [
        "missing_id",
        "invalid_updated_at",
        "invalid_deleted_at",
        "invalid_email",
        "invalid_rut",
    ]
    assert row["record"] == orjson.dumps(record).decode()


def test_a_rejected_row_keeps_its_normalized_id_and_instant() -> None:
    row = the_rejected_row(
        run(client(id=" c-9 ", email="x", updated_at="2024-05-01T09:00:00-03:00"))
    )

    assert row["hermes_id"] == "c-9"
    assert row["updated_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)


# --- Cleared fields -----------------------------------------------------------------------------

_TOO_OLD = TODAY.replace(year=TODAY.year - 120) - timedelta(days=1)


@pytest.mark.parametrize(
    ("overrides", "field", "code"),
    [
        ({"phone": "12345"}, "phone", "invalid_phone"),
        ({"phone": "sin teléfono"}, "phone", "invalid_phone"),
        ({"phone": "+56 9 8765"}, "phone", "invalid_phone"),
        ({"phone": "0"}, "phone", "invalid_phone"),
        ({"birth_date": "31/12/1985"}, "birth_date", "invalid_birth_date"),
        ({"birth_date": "1985-02-30"}, "birth_date", "invalid_birth_date"),
        ({"birth_date": "1985-2-3"}, "birth_date", "invalid_birth_date"),
        ({"birth_date": "no informa"}, "birth_date", "invalid_birth_date"),
        ({"birth_date": "0000-01-01"}, "birth_date", "invalid_birth_date"),
        ({"birth_date": "2025-06-16"}, "birth_date", "birth_date_in_future"),
        ({"birth_date": _TOO_OLD.isoformat()}, "birth_date", "birth_date_too_old"),
        ({"country": "Chile"}, "country", "invalid_country"),
        ({"country": "XX"}, "country", "invalid_country"),
        ({"country": "CHL"}, "country", "invalid_country"),
        ({"created_at": "hace un año"}, "created_at", "invalid_created_at"),
        ({"created_at": "2024-01-10T09:30:00"}, "created_at", "invalid_created_at"),
        ({"accepts_marketing": "yes"}, "accepts_marketing", "invalid_accepts_marketing"),
        ({"accepts_marketing": "TRUE"}, "accepts_marketing", "invalid_accepts_marketing"),
        ({"accepts_marketing": 1}, "accepts_marketing", "invalid_accepts_marketing"),
        ({"custom_fields": "texto libre"}, "custom_fields", "invalid_custom_fields"),
        ({"custom_fields": [1, 2]}, "custom_fields", "invalid_custom_fields"),
        ({"custom_fields": 42}, "custom_fields", "invalid_custom_fields"),
        ({"custom_fields": "{not json}"}, "custom_fields", "invalid_custom_fields"),
    ],
)
def test_each_cleared_code_nulls_the_field_and_keeps_the_row(
    overrides: dict[str, Any], field: str, code: str
) -> None:
    result = run(client(**overrides))

    row = the_valid_row(result)
    assert row[field] is None
    assert notes(row) == [(field, code)]
    assert result.cleared_by_reason == {code: 1}
    assert reasons.REASONS[code].kind == "cleared"


def test_birth_dates_on_the_limits_are_kept() -> None:
    exactly_120 = TODAY.replace(year=TODAY.year - 120)
    for birth_date in (TODAY, exactly_120):
        row = the_valid_row(run(client(birth_date=birth_date.isoformat())))
        assert row["birth_date"] == birth_date
        assert notes(row) == []


def test_a_birth_date_is_judged_against_the_given_day() -> None:
    row = the_valid_row(run(client(birth_date="2030-01-01"), today=date(2031, 1, 1)))

    assert row["birth_date"] == date(2030, 1, 1)


def test_several_cleared_fields_are_noted_together() -> None:
    row = the_valid_row(run(client(phone="n/a", country="Chile", accepts_marketing="si")))

    assert row["phone"] is None and row["country"] is None and row["accepts_marketing"] is None
    assert notes(row) == [
        ("country", "invalid_country"),
        ("phone", "invalid_phone"),
        ("accepts_marketing", "invalid_accepts_marketing"),
    ]


def test_a_clean_row_has_no_quality_notes() -> None:
    assert the_valid_row(run(client()))["quality_notes"] is None


# --- Normalization ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "raw", "clean"),
    [
        ("email", "  Juan.Perez@GMAIL.com ", "juan.perez@gmail.com"),
        ("email", "INFO@Tienda.CL", "info@tienda.cl"),
        ("email", "José.Núñez@Correo.CL", "josé.núñez@correo.cl"),
        ("email", "ana@xn--p1ai.com", "ana@рф.com"),
        ("document_number", "12.345.678-5", "12345678-5"),
        ("document_number", " 12345678-5 ", "12345678-5"),
        ("document_number", "123456785", "12345678-5"),
        ("document_number", "7.654.321-6", "7654321-6"),
        ("document_number", "10.000.013-k", "10000013-K"),
        ("document_number", "CL 12.345.678-5", "12345678-5"),
        ("phone", "9 8765 4321", "+56987654321"),
        ("phone", "+56 9 8765 4321", "+56987654321"),
        ("phone", "+56987654321", "+56987654321"),
        ("phone", "987654321", "+56987654321"),
        ("phone", "56987654321", "+56987654321"),
        ("phone", "(2) 2345 6789", "+56223456789"),
        ("phone", "+1 650 253 0000", "+16502530000"),  # a foreign number keeps its own code
        ("phone", 987654321, "+56987654321"),
        ("country", " cl ", "CL"),
        ("document_type", " rut ", "RUT"),
        ("first_name", "  Ana María  ", "Ana María"),
        ("last_name", "", None),
        ("city", "   ", None),
        ("region", None, None),
        ("gender", "F", "F"),
        ("birth_date", "1990-01-02", date(1990, 1, 2)),
        ("birth_date", " 1990-01-02 ", date(1990, 1, 2)),
        ("accepts_marketing", True, True),
        ("accepts_marketing", False, False),
        ("accepts_marketing", None, None),
        ("custom_fields", {"talla": "M", "puntos": 120}, '{"talla":"M","puntos":120}'),
        ("custom_fields", {}, "{}"),
        ("custom_fields", None, None),
    ],
)
def test_field_normalization(field: str, raw: Any, clean: Any) -> None:
    row = the_valid_row(run(client(**{field: raw})))

    assert row[field] == clean
    assert notes(row) == []


@pytest.mark.parametrize(
    "spelling",
    [
        "2024-05-01T12:00:00Z",
        "2024-05-01T09:00:00-03:00",
        "2024-05-01T08:00:00.000-04:00",
        "2024-05-01T12:00:00.000000+00:00",
        "2024-05-01t12:00:00z",
        "2024-05-01 12:00:00Z",
        "2024-05-01T12:00:00.0000000001Z",  # digits past the microsecond are truncated
    ],
)
def test_timestamps_become_utc_instants_whatever_the_offset(spelling: str) -> None:
    row = the_valid_row(run(client(updated_at=spelling, created_at=spelling)))

    assert row["updated_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert row["created_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)


def test_fractional_seconds_of_any_precision_are_kept_to_the_microsecond() -> None:
    result = run(
        client(id="a", updated_at="2024-05-01T12:00:00.5Z"),
        client(id="b", updated_at="2024-05-01T08:00:00.123-04:00"),
        client(id="c", updated_at="2024-05-01T12:00:00.1234567Z"),
    )

    assert [row.microsecond for row in result.valid.column("updated_at").to_pylist()] == [
        500_000,
        123_000,
        123_456,
    ]


def test_phones_are_read_in_the_client_country_else_the_default_one() -> None:
    result = run(
        client(id="pe", country="PE", phone="912 345 678"),
        client(id="ar", country="AR", phone="011 15-2345-6789"),
        client(id="none", country=None, phone="912 345 678"),
        client(id="bad", country="Perú", phone="912 345 678"),
        default_country="PE",
    )

    phones = {row["hermes_id"]: row["phone"] for row in result.valid.to_pylist()}
    assert phones == {
        "pe": "+51912345678",
        "ar": "+5491123456789",
        "none": "+51912345678",
        "bad": "+51912345678",
    }


@pytest.mark.parametrize(
    ("phone", "e164"),
    [
        ("+54 9 11 2345-6789", "+5491123456789"),  # a mobile, as sent from abroad
        ("+54 9 351 234-5678", "+5493512345678"),
        ("9 11 2345-6789", "+5491123456789"),
        ("+54 11 2345-6789", "+541123456789"),  # a fixed line
        ("11 2345-6789", "+541123456789"),
        ("011 15-2345-6789", "+5491123456789"),  # national prefix and 15: rewritten as a mobile
        ("0 11 2345-6789", "+541123456789"),
        ("15 2345-6789", None),  # 15 without an area code
    ],
)
def test_argentine_numbers_are_read_as_the_phone_library_reads_them(
    phone: str, e164: str | None
) -> None:
    result = run(client(country="AR", phone=phone))

    assert _outcomes(result, "phone", "invalid_phone") == {"c-1": e164}
    assert e164 == _library_phone(phone, "AR")


def test_only_argentine_numbers_with_a_national_prefix_go_through_the_library_one_by_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[str] = []
    one_by_one = validation._phone_or_none

    def recording(text: str, region: str) -> str | None:
        asked.append(text)
        return one_by_one(text, region)

    monkeypatch.setattr(validation, "_phone_or_none", recording)
    phones = ["+54 9 11 2345-6789", "9 11 2345-6789", "11 2345-6789", "011 15-2345-6789"]
    result = run(*(client(id=str(n), country="AR", phone=p) for n, p in enumerate(phones)))

    assert asked == ["011 15-2345-6789"]
    assert [row["phone"] for row in result.valid.to_pylist()] == [
        "+5491123456789", "+5491123456789", "+541123456789", "+5491123456789",
    ]  # fmt: skip


def test_numbers_other_documents_and_unknown_properties_are_kept_as_sent() -> None:
    record = client(
        id=12,
        document_type="dni",
        document_number=" 30.123.456 ",
        loyalty={"tier": "gold", "since": 2019},
    )

    row = the_valid_row(run(record))

    assert row["hermes_id"] == "12"
    assert row["document_type"] == "DNI"
    assert row["document_number"] == "30.123.456"  # only RUTs are checked and reformatted
    assert orjson.loads(row["unknown_fields"]) == {"loyalty": {"tier": "gold", "since": 2019}}


def test_a_rut_number_without_a_rut_document_type_is_not_checked() -> None:
    row = the_valid_row(run(client(document_type=None, document_number="12.345.678-9")))

    assert row["document_number"] == "12.345.678-9"


# --- Duplicates ---------------------------------------------------------------------------------


def test_the_latest_version_of_an_id_wins() -> None:
    result = run(
        client(email="old@gmail.com", updated_at="2024-05-01T10:00:00Z"),
        client(email="new@gmail.com", updated_at="2024-05-01T11:00:00Z"),
        client(email="middle@gmail.com", updated_at="2024-05-01T10:30:00Z"),
    )

    assert the_valid_row(result)["email"] == "new@gmail.com"
    assert result.duplicates_dropped == 2
    assert_conserved(result)


def test_versions_are_ordered_by_instant_not_by_text() -> None:
    result = run(
        client(email="later@gmail.com", updated_at="2024-05-01T10:00:00-04:00"),  # 14:00Z
        client(email="earlier@gmail.com", updated_at="2024-05-01T12:00:00Z"),
    )

    assert the_valid_row(result)["email"] == "later@gmail.com"


def test_a_tie_goes_to_the_later_row() -> None:
    result = run(
        client(email="first@gmail.com", updated_at="2024-05-01T12:00:00Z"),
        client(email="second@gmail.com", updated_at="2024-05-01T09:00:00.000-03:00"),
    )

    assert the_valid_row(result)["email"] == "second@gmail.com"
    assert result.duplicates_dropped == 1


def test_an_invalid_newest_version_rejects_the_client_and_no_older_one_is_loaded() -> None:
    result = run(
        client(email="ana@gmail.com", updated_at="2024-05-01T10:00:00Z"),
        client(email="ana(at)gmail.com", updated_at="2024-05-01T11:00:00Z"),
    )

    row = the_rejected_row(result)
    assert row["reasons"] == ["invalid_email"]
    assert orjson.loads(row["record"])["email"] == "ana(at)gmail.com"
    assert result.duplicates_dropped == 1
    assert_conserved(result)


def test_an_invalid_older_version_does_not_matter() -> None:
    result = run(
        client(email="ana(at)gmail.com", updated_at="2024-05-01T10:00:00Z"),
        client(email="ana@gmail.com", updated_at="2024-05-01T11:00:00Z"),
    )

    assert the_valid_row(result)["email"] == "ana@gmail.com"
    assert result.rejected_by_reason == {}


def test_a_version_without_a_usable_updated_at_is_rejected_apart() -> None:
    result = run(
        client(email="ana@gmail.com", updated_at="2024-05-01T10:00:00Z"),
        client(email="newer@gmail.com", updated_at="tomorrow"),
    )

    assert result.valid.column("email").to_pylist() == ["ana@gmail.com"]
    assert result.rejected.column("reasons").to_pylist() == [["invalid_updated_at"]]
    assert result.duplicates_dropped == 0
    assert_conserved(result)


def test_distinct_ids_keep_their_input_order() -> None:
    ids = [f"c-{n}" for n in (5, 3, 9, 1)]

    result = run(*(client(id=i) for i in ids))

    assert result.valid.column("hermes_id").to_pylist() == ids


# --- Tombstones ---------------------------------------------------------------------------------


def test_a_tombstone_needs_only_its_id_and_updated_at() -> None:
    record = {
        "id": "c-1",
        "updated_at": "2024-05-01T12:00:00Z",
        "deleted_at": "2024-05-01T12:00:00Z",
    }

    row = the_valid_row(run(record))

    assert row["deleted_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert row["email"] is None
    assert notes(row) == []


def test_a_tombstone_with_bad_personal_data_is_kept_with_those_fields_cleared() -> None:
    result = run(
        client(
            deleted_at="2024-05-01T09:00:00-03:00",
            email="borrado",
            document_number="12.345.678-0",
            phone="1",
            first_name=" Ana ",
        )
    )

    row = the_valid_row(result)
    assert row["deleted_at"] == datetime(2024, 5, 1, 12, tzinfo=UTC)
    assert (row["email"], row["document_number"], row["phone"]) == (None, None, None)
    assert row["first_name"] == "Ana"  # other fields are still normalized
    assert notes(row) == [
        ("email", "invalid_email"),
        ("document_number", "invalid_rut"),
        ("phone", "invalid_phone"),
    ]
    assert result.cleared_by_reason == {"invalid_email": 1, "invalid_rut": 1, "invalid_phone": 1}


def test_an_unreadable_deleted_at_never_silently_undeletes() -> None:
    row = the_rejected_row(run(client(deleted_at="2024-13-01T00:00:00Z", email=None)))

    assert row["reasons"] == ["invalid_deleted_at", "missing_email"]


# --- Hostile values -----------------------------------------------------------------------------

MEGABYTE = "x" * 1_000_000
SQL = "Robert'); DROP TABLE clients;--"
CONTROL = "Ana\x07\x1b[31mRojas\x7f"
EMOJI = "Zoë 👩‍👩‍👧 Nu\u0303nez ﷽"
NESTED: Any = "leaf"
for _ in range(200):
    NESTED = {"n": NESTED}


@pytest.mark.parametrize(
    ("overrides", "expect"),
    [
        ({"first_name": MEGABYTE}, {"first_name": MEGABYTE}),
        ({"last_name": SQL}, {"last_name": SQL}),
        ({"city": CONTROL}, {"city": CONTROL}),
        ({"first_name": EMOJI}, {"first_name": EMOJI}),
        ({"gender": "\u200b"}, {"gender": "\u200b"}),  # zero-width space is not whitespace
        ({"first_name": "Ana\x00"}, {"first_name": "Ana"}),  # PostgreSQL text refuses NUL
        ({"first_name": 3.5, "last_name": False}, {"first_name": "3.5", "last_name": "false"}),
        ({"phone": MEGABYTE}, {"phone": None}),
        ({"phone": SQL}, {"phone": None}),
        ({"birth_date": MEGABYTE}, {"birth_date": None}),
        ({"created_at": MEGABYTE}, {"created_at": None}),
        ({"country": EMOJI}, {"country": None}),
        ({"custom_fields": NESTED}, {"custom_fields": orjson.dumps(NESTED).decode()}),
        ({"custom_fields": {"q": SQL}}, {"custom_fields": orjson.dumps({"q": SQL}).decode()}),
        ({"document_type": "PASSPORT", "document_number": MEGABYTE}, {"document_number": MEGABYTE}),
    ],
)
def test_hostile_values_that_are_kept_or_cleared(
    overrides: dict[str, Any], expect: dict[str, Any]
) -> None:
    row = the_valid_row(run(client(**overrides)))

    assert {field: row[field] for field in expect} == expect


@pytest.mark.parametrize(
    ("overrides", "codes"),
    [
        ({"email": MEGABYTE + "@gmail.com"}, ["invalid_email"]),
        ({"email": SQL}, ["invalid_email"]),
        ({"email": EMOJI}, ["invalid_email"]),
        ({"email": "ana\x00@gmail.com\x07"}, ["invalid_email"]),
        ({"document_number": MEGABYTE}, ["invalid_rut"]),
        ({"updated_at": MEGABYTE}, ["invalid_updated_at"]),
        ({"id": "\x00 \t"}, ["missing_id"]),
    ],
)
def test_hostile_values_that_reject(overrides: dict[str, Any], codes: list[str]) -> None:
    assert the_rejected_row(run(client(**overrides)))["reasons"] == codes


def test_custom_fields_nested_past_the_json_parser_limit_are_cleared_not_fatal() -> None:
    deep = '{"n":' * 5000 + "1" + "}" * 5000
    raw = pa.Table.from_batches([records_to_batch([client()])])
    raw = raw.set_column(
        raw.schema.get_field_index("custom_fields"), "custom_fields", pa.array([deep])
    )

    row = the_valid_row(validate_partition(raw, today=TODAY))

    assert row["custom_fields"] is None
    assert notes(row) == [("custom_fields", "invalid_custom_fields")]


# --- Shape of the input -------------------------------------------------------------------------


def test_an_empty_partition() -> None:
    result = validate_partition(RAW_SCHEMA.empty_table())

    assert result == ValidationResult(
        CLEAN_SCHEMA.empty_table(), REJECTED_SCHEMA.empty_table(), 0, 0, {}, {}
    )


def run_table(raw: pa.Table | pa.RecordBatch) -> ValidationResult:
    return validate_partition(raw, today=TODAY)


def test_a_record_batch_and_a_many_chunk_table_are_accepted() -> None:
    batches = [records_to_batch([client(id=f"c-{n}")]) for n in range(3)]

    assert run_table(batches[0]).valid.num_rows == 1
    assert run_table(pa.Table.from_batches(batches)).valid.num_rows == 3


def test_a_missing_raw_record_is_rebuilt_for_the_rejected_row() -> None:
    raw = pa.Table.from_batches([records_to_batch([client(email="nope")])])
    raw = raw.set_column(raw.schema.get_field_index("record"), "record", pa.nulls(1, pa.string()))

    row = the_rejected_row(run_table(raw))

    assert orjson.loads(row["record"])["email"] == "nope"


def test_columns_missing_from_the_raw_rows_are_named() -> None:
    raw = pa.Table.from_batches([records_to_batch([client()])]).drop_columns(["email", "record"])

    with pytest.raises(ValueError, match=r"lack the column\(s\) email, record; build them with"):
        validate_partition(raw)


@pytest.mark.parametrize("country", ["", "Chile", "XX", "AC"])
def test_an_unknown_default_country_is_refused(country: str) -> None:
    with pytest.raises(ValueError, match="is not an ISO 3166-1 alpha-2 country"):
        run(client(), default_country=country)


def test_the_default_country_may_be_written_in_lower_case() -> None:
    row = the_valid_row(run(client(country=None, phone="912 345 678"), default_country="pe"))

    assert row["phone"] == "+51912345678"


# --- The catalogue ------------------------------------------------------------------------------


def test_the_reason_catalogue() -> None:
    assert set(reasons.codes("rejected")) == {
        "not_an_object",
        "missing_id",
        "invalid_updated_at",
        "invalid_deleted_at",
        "missing_email",
        "invalid_email",
        "invalid_rut",
    }
    assert set(reasons.codes("cleared")) == {
        "invalid_phone",
        "invalid_birth_date",
        "birth_date_in_future",
        "birth_date_too_old",
        "invalid_country",
        "invalid_created_at",
        "invalid_accepts_marketing",
        "invalid_custom_fields",
    }
    table = reasons.markdown_table()
    assert all(f"| `{code}` | {reason.kind} |" in table for code, reason in reasons.REASONS.items())


def test_the_country_list_is_iso_3166_alpha_2() -> None:
    assert len(ISO_3166_ALPHA2) == 249
    assert {"CL", "AR", "PE", "AQ", "BV", "SS", "XK"} - ISO_3166_ALPHA2 == {"XK"}


# --- Properties ---------------------------------------------------------------------------------

_json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
_json_values = st.recursive(
    _json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_timestamps = st.sampled_from(
    ["2024-05-01T12:00:00Z", "2024-05-01T09:00:00-03:00", "2024-05-01T08:00:00.5-04:00"]
) | st.text(max_size=30)
_field_values = {
    "id": st.sampled_from(["a", "b", " a ", "", "  ", "c"]) | st.integers(-3, 3) | st.none(),
    "email": st.sampled_from(["ana@gmail.com", "ANA@GMAIL.COM", "x", ""]) | _json_values,
    "updated_at": _timestamps | _json_values,
    "deleted_at": st.none() | _timestamps,
    "created_at": st.none() | _timestamps,
    "document_type": st.sampled_from(["RUT", "rut", "DNI", None]),
    "document_number": st.sampled_from(["12.345.678-5", "12.345.678-4", None])
    | st.text(max_size=12),
    "phone": st.sampled_from(["+56 9 8765 4321", "987654321", "12"]) | _json_values,
    "birth_date": st.sampled_from(["1990-01-02", "2999-01-01", "1800-01-01"]) | _json_values,
    "country": st.sampled_from(["CL", "cl", "Chile", "AR"]) | _json_values,
    "accepts_marketing": _json_values,
    "custom_fields": _json_values,
}
_records = st.fixed_dictionaries(
    {}, optional={**_field_values, **{name: _json_values for name in ("first_name", "city", "zz")}}
)
_items = st.lists(_records | _json_values, max_size=12)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=_items)
def test_validation_never_raises_and_every_row_is_accounted_for(items: list[Any]) -> None:
    result = run(*items)

    assert_conserved(result)
    assert result.rows_in == len(items)
    assert sum(result.rejected_by_reason.values()) >= result.rejected.num_rows
    valid = result.valid.to_pylist()
    assert len({row["hermes_id"] for row in valid}) == len(valid)  # one row per id
    for row in valid:
        assert row["hermes_id"] and row["updated_at"] is not None
        assert row["email"] is not None or row["deleted_at"] is not None
        assert row["country"] is None or row["country"] in ISO_3166_ALPHA2
        assert row["phone"] is None or row["phone"].startswith("+")
    # Every id that came in ends up loaded, rejected, or superseded by a loaded/rejected version.
    ids_in = {str(item.get("id")).strip() for item in items if isinstance(item, dict)}
    ids_out = {row["hermes_id"] for row in valid}
    ids_out |= set(result.rejected.column("hermes_id").to_pylist())
    assert ids_in - {"None", ""} <= ids_out


# The shortcuts that skip a library call must agree with the library exactly.


def _library_email(text: str) -> str | None:
    try:
        return validate_email(text, check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return None


_labels = st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=8)
_emails = st.builds(
    lambda local, labels, tld: f"{local}@{'.'.join(labels)}.{tld}",
    st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=12),
    st.lists(_labels, min_size=1, max_size=3),
    st.sampled_from(["com", "CL", "test", "local", "c0m", "x", "xn--p1ai", "onion", "invalid"])
    | st.text(string.ascii_letters, min_size=1, max_size=4),
)


@settings(max_examples=40, deadline=None)
@given(emails=st.lists(_emails, min_size=1, max_size=25))
def test_emails_match_email_validator_exactly(emails: list[str]) -> None:
    result = run(*(client(id=str(n), email=email) for n, email in enumerate(emails)))

    outcome = _outcomes(result, "email", "invalid_email")
    assert outcome == {str(n): _library_email(email) for n, email in enumerate(emails)}


def _library_phone(text: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
    except phonenumbers.NumberParseException:
        return None
    if not phonenumbers.is_valid_number(number):
        return None
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


_REGIONS = ["CL", "AR", "PE", "BR", "MX", "CO", "ES", "IT", "DE", "US", "GB", "RU"]


@st.composite
def _phones(draw: st.DrawFn) -> tuple[str, str]:
    """A region and a phone close to one of its example numbers, written in some way."""
    region = draw(st.sampled_from(_REGIONS))
    kind = draw(
        st.sampled_from(
            [phonenumbers.PhoneNumberType.MOBILE, phonenumbers.PhoneNumberType.FIXED_LINE]
        )
    )
    example = phonenumbers.example_number_for_type(region, kind)
    national = phonenumbers.national_significant_number(example)
    changed = draw(st.integers(min_value=0, max_value=min(5, len(national))))
    tail = draw(st.text("0123456789", min_size=changed, max_size=changed))
    national = national[: len(national) - changed] + tail + draw(st.sampled_from(["", "", "1"]))
    prefix = draw(
        st.sampled_from(
            ["", "", f"+{example.country_code}", f"+{example.country_code} ", "0", "+1"]
        )
    )
    separator = draw(st.sampled_from(["", " ", "-"]))
    cut = draw(st.integers(min_value=1, max_value=len(national)))
    return region, prefix + national[:cut] + separator + national[cut:]


@settings(max_examples=40, deadline=None)
@given(phones=st.lists(_phones(), min_size=1, max_size=25))
def test_phones_match_phonenumbers_exactly(phones: list[tuple[str, str]]) -> None:
    records = [
        client(id=str(n), country=region, phone=phone) for n, (region, phone) in enumerate(phones)
    ]

    outcome = _outcomes(run(*records), "phone", "invalid_phone")
    assert outcome == {
        str(n): _library_phone(phone, region) for n, (region, phone) in enumerate(phones)
    }


def _library_rut(text: str) -> str | None:
    if not cl_rut.is_valid(text):
        return None
    number = cl_rut.compact(text)
    return f"{number[:-1]}-{number[-1]}"


@st.composite
def _ruts(draw: st.DrawFn) -> str:
    body = str(draw(st.integers(min_value=0, max_value=99_999_999)))
    check = draw(st.sampled_from([cl_rut.calc_check_digit(body)] * 3 + list("0123456789Kk")))
    if draw(st.booleans()):
        body = f"{int(body):,}".replace(",", ".")
    return body + draw(st.sampled_from(["-", "", " - "])) + check


@settings(max_examples=40, deadline=None)
@given(ruts=st.lists(_ruts(), min_size=1, max_size=25))
def test_ruts_match_python_stdnum_exactly(ruts: list[str]) -> None:
    outcome = _outcomes(
        run(*(client(id=str(n), document_number=rut) for n, rut in enumerate(ruts))),
        "document_number",
        "invalid_rut",
    )
    assert outcome == {str(n): _library_rut(rut) for n, rut in enumerate(ruts)}


@st.composite
def _instants(draw: st.DrawFn) -> tuple[str, datetime]:
    """An RFC 3339 spelling of an instant, and the instant (to the microsecond)."""
    local = draw(st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1)))
    minutes = draw(st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59))
    digits = draw(st.integers(min_value=0, max_value=9))
    fraction = f"{local.microsecond:06d}{draw(st.text('0123456789', min_size=3, max_size=3))}"
    text = local.strftime("%Y-%m-%d") + draw(st.sampled_from("Tt ")) + local.strftime("%H:%M:%S")
    text += "." + fraction[:digits] if digits else ""
    if minutes == 0 and draw(st.booleans()):
        text += draw(st.sampled_from("Zz"))
    else:
        sign = "-" if minutes < 0 else "+"
        text += f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"
    kept = int(fraction[: min(digits, 6)].ljust(6, "0")) if digits else 0
    instant = local.replace(microsecond=kept) - timedelta(minutes=minutes)
    return text, instant.replace(tzinfo=UTC)


@settings(max_examples=40, deadline=None)
@given(instants=st.lists(_instants(), min_size=1, max_size=25))
def test_any_rfc3339_spelling_gives_its_utc_instant(instants: list[tuple[str, datetime]]) -> None:
    result = run(*(client(id=str(n), updated_at=text) for n, (text, _) in enumerate(instants)))

    assert result.valid.column("updated_at").to_pylist() == [instant for _, instant in instants]


_ODD_INSTANTS = [
    None,
    "",
    " 2024-05-01T12:00:00Z",  # cleaned, then read
    "2024-05-01T12:00:00Z\x00",
    "2024-02-30T12:00:00Z",  # no such day
    "2023-02-29T12:00:00Z",
    "2024-05-01T12:00:00",  # no offset
    "2024-05-01T12:00Z",
    "2024-05-01",
    "0000-01-01T00:00:00Z",
    "2024-05-01T12:00:00.1234567Z",
    "ayer",
]


@settings(max_examples=60, deadline=None)
@given(
    texts=st.one_of(
        st.lists(_instants().map(lambda pair: pair[0]), min_size=1, max_size=25),
        st.lists(
            st.one_of(_instants().map(lambda pair: pair[0]), st.sampled_from(_ODD_INSTANTS)),
            min_size=1,
            max_size=25,
        ),
    )
)
def test_the_instants_a_fetch_files_rows_by_are_those_validation_reads(
    texts: list[str | None],
) -> None:
    micros, usable = updated_instants(pa.array(texts, pa.string()))
    result = run(*(client(id=str(n), updated_at=text) for n, text in enumerate(texts)))

    read = {
        row["hermes_id"]: row["updated_at"]
        for table in (result.valid, result.rejected)
        for row in table.select(["hermes_id", "updated_at"]).to_pylist()
    }
    epoch = datetime(1970, 1, 1, tzinfo=UTC)
    filed = [
        epoch + timedelta(microseconds=int(m)) if ok else None
        for m, ok in zip(micros, usable, strict=True)
    ]
    assert filed == [read[str(n)] for n in range(len(texts))]


def _outcomes(result: ValidationResult, field: str, code: str) -> dict[str, str | None]:
    """Each id's normalized ``field``, or None where the row was rejected or the field cleared."""
    assert {tuple(r) for r in result.rejected.column("reasons").to_pylist()} <= {(code,)}
    outcome = dict.fromkeys(result.rejected.column("hermes_id").to_pylist())
    for row in result.valid.to_pylist():
        outcome[row["hermes_id"]] = row[field]
        assert notes(row) == ([] if row[field] is not None else [(field, code)])
    return outcome


# --- A partition read piece by piece -----------------------------------------------------------


def dirty_clients(clients: int, seed: int, days: int) -> ClientDataset:
    """Simulated clients, a third of them dirty, updated over ``days`` days from 2025-06-01."""
    start = datetime(2025, 6, 1, tzinfo=UTC)
    config = SimulatorConfig(
        clients=clients, seed=seed, start=start, end=start + timedelta(days=days), dirty_share=0.3
    )
    return ClientDataset(config)


def test_validating_row_group_by_row_group_equals_validating_the_whole_partition() -> None:
    dataset = dirty_clients(1500, seed=3, days=1)
    records = dataset.window(dataset.start, dataset.end)
    # Versions of one client in different pieces: an older one late, a newer one early, a tie.
    records = [
        client(id="split", updated_at="2025-06-01T10:00:00Z", first_name="Nueva"),
        *records,
        client(id="split", updated_at="2025-06-01T09:00:00Z", first_name="Vieja"),
        client(id="tie", updated_at="2025-06-01T11:00:00-03:00", first_name="Primera"),
        client(id="tie", updated_at="2025-06-01T14:00:00Z", first_name="Segunda"),
        "not an object",
    ]
    raw = pa.Table.from_batches([records_to_batch(records)])
    whole = validate_partition(raw, today=TODAY)
    assert whole.duplicates_dropped >= 2

    latest = latest_versions(raw.select(["id", "updated_at"]).to_batches(max_chunksize=97))
    assert latest.tolist() == latest_versions([raw]).tolist()
    pieces = list(validate_row_groups(raw.to_batches(max_chunksize=97), latest, today=TODAY))

    assert len(pieces) == -(-raw.num_rows // 97)
    assert pa.concat_tables(piece.valid for piece in pieces).equals(whole.valid)
    assert pa.concat_tables(piece.rejected for piece in pieces).equals(whole.rejected)
    assert sum(piece.rows_in for piece in pieces) == whole.rows_in
    assert sum(piece.duplicates_dropped for piece in pieces) == whole.duplicates_dropped
    for counts in ("rejected_by_reason", "cleared_by_reason"):
        total: Counter[str] = Counter()
        for piece in pieces:
            total.update(getattr(piece, counts))
        assert total == Counter(getattr(whole, counts)), counts
    by_id = {row["hermes_id"]: row for row in whole.valid.to_pylist()}
    assert by_id["split"]["first_name"] == "Nueva"
    assert by_id["tie"]["first_name"] == "Segunda"


def test_partitions_validated_together_get_what_each_gets_validated_alone() -> None:
    dataset = dirty_clients(900, seed=5, days=3)
    days = [datetime(2025, 6, day, tzinfo=UTC) for day in (1, 2, 3, 4)]
    partitions = [dataset.window(start, end) for start, end in pairwise(days)]
    # A client in two partitions: each partition judges its own version of it.
    partitions[0].append(client(id="twice", updated_at="2025-06-01T10:00:00Z", first_name="Una"))
    partitions[2].append(client(id="twice", updated_at="2025-06-03T10:00:00Z", first_name="Otra"))
    partitions.insert(1, [])  # a partition without rows
    tables = [pa.Table.from_batches([records_to_batch(records)]) for records in partitions]
    tables[1] = tables[0].slice(0, 0)

    sizes = [table.num_rows for table in tables]
    together = validate_partitions(pa.concat_tables(tables), sizes, today=TODAY)
    alone = [validate_partition(table, today=TODAY) for table in tables]
    assert together == alone
    latest = np.concatenate([latest_versions([table]) for table in tables])
    assert validate_partitions(pa.concat_tables(tables), sizes, latest=latest, today=TODAY) == alone
    assert sum(result.rejected.num_rows for result in alone) > 0
    assert any(result.cleared_by_reason for result in alone)


def test_partitions_that_do_not_add_up_to_the_rows_are_refused() -> None:
    raw = pa.Table.from_batches([records_to_batch([client(id="a"), client(id="b")])])
    with pytest.raises(ValueError, match=r"partitions of \[1\] rows, but there are 2"):
        validate_partitions(raw, [1], today=TODAY)


def test_pieces_that_do_not_add_up_to_the_partition_are_refused() -> None:
    raw = pa.Table.from_batches([records_to_batch([client(id="a"), client(id="b")])])
    latest = latest_versions([raw])
    with pytest.raises(ValueError, match="the pieces hold 1 rows, but latest describes 2"):
        list(validate_row_groups([raw.slice(0, 1)], latest, today=TODAY))
