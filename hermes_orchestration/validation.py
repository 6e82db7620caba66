"""Validation rules that turn raw Hermes client rows into clean rows for the master database.

A partition is validated column by column with Arrow compute. The field libraries
(``email-validator``, ``phonenumbers``, ``python-stdnum``) stay the authority on what is valid.
They are called once per distinct value (results are cached), and skipped only for values of a
narrow shape that the library provably accepts unchanged: a plain ASCII address, a number
written in digits that matches its region's fixed-line or mobile pattern, a RUT written with
digits, dots and a dash whose check digit holds. Those shortcuts only ever *accept*; anything
outside them, or that they would refuse, goes to the library.

Duplicates: rows whose ``id`` or ``updated_at`` is unusable are rejected as they are. Among the
others, the latest ``updated_at`` instant of each ``id`` wins (a tie goes to the later row) and
only that version is judged: if it is invalid, the client is rejected for the partition and no
older version is loaded in its place.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, timezone

import email_validator
import numpy as np
import orjson
import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
from phonenumbers.phonemetadata import PhoneMetadata, PhoneNumberDesc
from stdnum.cl import rut as cl_rut

from hermes_orchestration import reasons
from hermes_orchestration.records import (
    CLEAN_SCHEMA,
    CLIENT_FIELDS,
    RAW_SCHEMA,
    REJECTED_SCHEMA,
    UTC_TIMESTAMP,
)

logger = logging.getLogger(__name__)

# The 249 officially assigned ISO 3166-1 alpha-2 codes.
ISO_3166_ALPHA2: frozenset[str] = frozenset(
    """
    AD AE AF AG AI AL AM AO AQ AR AS AT AU AW AX AZ BA BB BD BE BF BG BH BI BJ BL BM BN BO BQ BR BS
    BT BV BW BY BZ CA CC CD CF CG CH CI CK CL CM CN CO CR CU CV CW CX CY CZ DE DJ DK DM DO DZ EC EE
    EG EH ER ES ET FI FJ FK FM FO FR GA GB GD GE GF GG GH GI GL GM GN GP GQ GR GS GT GU GW GY HK HM
    HN HR HT HU ID IE IL IM IN IO IQ IR IS IT JE JM JO JP KE KG KH KI KM KN KP KR KW KY KZ LA LB LC
    LI LK LR LS LT LU LV LY MA MC MD ME MF MG MH MK ML MM MN MO MP MQ MR MS MT MU MV MW MX MY MZ NA
    NC NE NF NG NI NL NO NP NR NU NZ OM PA PE PF PG PH PK PL PM PN PR PS PT PW PY QA RE RO RS RU RW
    SA SB SC SD SE SG SH SI SJ SK SL SM SN SO SR SS ST SV SX SY SZ TC TD TF TG TH TJ TK TL TM TN TO
    TR TT TV TW TZ UA UG UM US UY UZ VA VC VE VG VI VN VU WF WS YE YT ZA ZM ZW
    """.split()  # noqa: SIM905 (a grid of codes reads better than 249 quoted strings)
)

# RAW_SCHEMA columns that validation reads (all but the raw record).
_FIELD_COLUMNS: tuple[str, ...] = (*CLIENT_FIELDS, "unknown_fields")
_COUNTRY_SET = pa.array(sorted(ISO_3166_ALPHA2))
_PHONE_REGION_SET = pa.array(sorted(ISO_3166_ALPHA2 & phonenumbers.SUPPORTED_REGIONS))
_NULL_TEXT = pa.scalar(None, pa.string())
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)
# Instants that Python's datetime (and so every consumer of the clean rows) can represent.
_MIN_MICROS = (datetime(1, 1, 1, tzinfo=UTC) - _EPOCH) // _MICROSECOND
_MAX_MICROS = (datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC) - _EPOCH) // _MICROSECOND
# Library results are cached per distinct value; longer (hostile) values are not worth keeping.
_CACHE_SIZE = 1 << 16
_CACHEABLE_LENGTH = 256


@dataclass(frozen=True)
class ValidationResult:
    """The outcome of validating one partition of raw client rows."""

    valid: pa.Table  # CLEAN_SCHEMA, one row per surviving client id
    rejected: pa.Table  # REJECTED_SCHEMA
    rows_in: int
    duplicates_dropped: int  # older versions of an id superseded within the partition
    rejected_by_reason: dict[str, int]
    cleared_by_reason: dict[str, int]


def latest_versions(pieces: Iterable[pa.Table | pa.RecordBatch]) -> np.ndarray:
    """Which rows of a partition are judged: for each row, whether no other row supersedes it.

    ``pieces`` are the partition's rows in listing order, piece by piece (with at least their
    raw ``id`` and ``updated_at`` columns). Only the cleaned ids and the instants of the rows
    are kept from one piece to the next, never their text. A row with an unusable id or
    updated_at is judged (and rejected) as it is; among the others, the latest instant of each id
    wins, a tie going to the later row.
    """
    ids: list[pa.Array] = []
    micros: list[np.ndarray] = []
    usable: list[np.ndarray] = []
    for piece in pieces:
        piece_ids = _clean_text(_combined(piece.column("id")))
        piece_micros, has_instant = updated_instants(piece.column("updated_at"))
        ids.append(piece_ids)
        micros.append(piece_micros)
        usable.append(_usable(piece_ids, has_instant))
    if not ids:
        return np.zeros(0, dtype=bool)
    all_ids = pa.concat_arrays(ids) if len(ids) > 1 else ids[0]
    return ~_superseded(all_ids, np.concatenate(micros), np.concatenate(usable))


def updated_instants(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, np.ndarray]:
    """Raw ``updated_at`` values read as validation reads them: microseconds since the epoch,
    and the mask of the usable ones (a missing or invalid value is not)."""
    values = _combined(values)
    micros = _plain_instants(values)
    if micros is not None:
        return micros, np.ones(len(values), dtype=bool)
    instants, micros, _ = _parse_instants(_clean_text(values))
    return micros, _valid(instants)


def _plain_instants(values: pa.Array) -> np.ndarray | None:
    """The values as microseconds since the epoch if every one is a date-time that validation
    reads on its fast path with nothing to clean (a page of a listing, as sites send them), else
    None. A fetch reads every page's instants: a few calls, not those of the general path."""
    if values.null_count or _has_nul(values):
        return None
    if not pc.all(pc.match_substring_regex(values, _INSTANT_FAST)).as_py():
        return None
    try:  # Arrow refuses impossible days (30 February), as validation does
        micros = pc.cast(values, UTC_TIMESTAMP).cast(pa.int64()).to_numpy(zero_copy_only=False)
    except pa.ArrowInvalid:
        return None
    if len(micros) and (micros.min() < _MIN_MICROS or micros.max() > _MAX_MICROS):
        return None
    return micros


def _usable(ids: pa.Array, has_instant: np.ndarray) -> np.ndarray:
    # Rows without a usable id or updated_at cannot be ordered against other versions.
    return _valid(ids) & has_instant


def validate_row_groups(
    row_groups: Iterable[pa.Table | pa.RecordBatch],
    latest: np.ndarray,
    *,
    default_country: str = "CL",
    today: date | None = None,
) -> Iterator[ValidationResult]:
    """``validate_partition`` of a partition read piece by piece, one result per piece.

    ``latest`` comes from ``latest_versions`` over the whole partition, so that a client listed
    in two pieces is judged once, on its latest version: the pieces' results, concatenated, are
    those of validating the whole partition at once, while only one piece is held at a time.
    """
    offset = 0
    for rows in row_groups:
        yield validate_partition(
            rows,
            default_country=default_country,
            today=today,
            latest=latest[offset : offset + rows.num_rows],
        )
        offset += rows.num_rows
    if offset != len(latest):
        raise ValueError(f"the pieces hold {offset} rows, but latest describes {len(latest)}")


def validate_partition(
    raw: pa.Table | pa.RecordBatch,
    *,
    default_country: str = "CL",
    today: date | None = None,
    latest: np.ndarray | None = None,
) -> ValidationResult:
    """Validate and normalize raw client rows (``RAW_SCHEMA``) into clean and rejected rows.

    Args:
        raw: Raw rows, as built by ``records_to_batch`` (a table or a record batch).
        default_country: The site's country (ISO 3166-1 alpha-2), used to read phone numbers
            of clients without a valid country of their own.
        today: The day birth dates are checked against; the current UTC day when omitted.
        latest: Which rows are judged (see ``latest_versions``); by default, the latest version
            of each id among ``raw``'s rows.

    Raises:
        ValueError: ``raw`` does not have the ``RAW_SCHEMA`` columns, or ``default_country`` is
            not a country whose phone numbers can be read.
    """
    table = _conform(raw)
    (result,) = validate_partitions(
        table, [table.num_rows], default_country=default_country, today=today, latest=latest
    )
    return result


def validate_partitions(
    raw: pa.Table | pa.RecordBatch,
    sizes: list[int],
    *,
    default_country: str = "CL",
    today: date | None = None,
    latest: np.ndarray | None = None,
) -> list[ValidationResult]:
    """``validate_partition`` of consecutive partitions held in one table, ``sizes`` rows each:
    the rules run once over all of the rows (most of their cost is per call, not per row), and
    each partition gets its own result.

    ``latest`` says which rows are judged (``latest_versions`` of each partition, one after the
    other); by default, the latest version of each id in its partition, as each partition
    validated alone would judge.
    """
    table = _conform(raw)
    if sum(sizes) != table.num_rows or any(size < 0 for size in sizes):
        raise ValueError(f"partitions of {sizes} rows, but there are {table.num_rows}")
    default_region = _check_default_country(default_country)
    if today is None:
        today = datetime.now(UTC).date()
    elif isinstance(today, datetime):
        today = today.date()

    rows_in = table.num_rows
    if rows_in == 0:
        return [_nothing() for _ in sizes]

    # The raw record (the widest column) is only read for rejected rows, so it stays chunked.
    fields = {name: table.column(name).combine_chunks() for name in _FIELD_COLUMNS}
    not_object = _not_an_object(fields, table.column("record"))
    ids = _clean_text(fields["id"])
    updated_at, updated_micros, _ = _parse_instants(_clean_text(fields["updated_at"]))
    if latest is None:
        parts = np.repeat(np.arange(len(sizes)), sizes) if len(sizes) > 1 else None
        latest = ~_superseded(ids, updated_micros, _usable(ids, _valid(updated_at)), parts)
    elif len(latest) != rows_in:
        raise ValueError(f"latest describes {len(latest)} rows, but there are {rows_in}")

    # Every row is checked (one pass over whole columns is cheaper than selecting first), but
    # only the latest version of an id is judged: an older one never stands in for it.
    findings = _Findings(not_object)
    findings.reject(reasons.MISSING_ID, ~_valid(ids))
    findings.reject(reasons.INVALID_UPDATED_AT, ~_valid(updated_at))
    columns = _validate_fields(fields, findings, default_region, today)
    columns["hermes_id"] = ids
    columns["updated_at"] = updated_at

    results = _assemble(table, latest, columns, findings, sizes)
    for result in results:
        logger.debug(
            "validated %d rows: %d valid, %d rejected, %d superseded duplicates",
            result.rows_in, result.valid.num_rows, result.rejected.num_rows,
            result.duplicates_dropped,
        )  # fmt: skip
    return results


def _nothing() -> ValidationResult:
    return ValidationResult(CLEAN_SCHEMA.empty_table(), REJECTED_SCHEMA.empty_table(), 0, 0, {}, {})


# --- The rules, field by field ----------------------------------------------------------------


def _validate_fields(
    fields: dict[str, pa.Array], findings: _Findings, default_region: str, today: date
) -> dict[str, pa.Array]:
    """Normalize every field but ``id`` and ``updated_at``, recording what is wrong."""
    columns: dict[str, pa.Array] = {}

    deleted_at, _, deleted_bad = _parse_instants(_clean_text(fields["deleted_at"]))
    findings.reject(reasons.INVALID_DELETED_AT, deleted_bad)
    tombstone = _valid(deleted_at)
    columns["deleted_at"] = deleted_at

    # A deleted client needs only its id and updated_at: a bad email or RUT is cleared instead.
    emails = _clean_text(fields["email"])
    normalized, email_bad = _normalize_emails(emails)
    findings.reject(reasons.MISSING_EMAIL, ~_valid(emails) & ~tombstone)
    findings.reject(reasons.INVALID_EMAIL, email_bad & ~tombstone)
    columns["email"] = findings.clear("email", reasons.INVALID_EMAIL, email_bad, normalized)

    document_type = pc.utf8_upper(_clean_text(fields["document_type"]))
    is_rut = _mask(pc.equal(document_type, "RUT"))
    document_number = _clean_text(fields["document_number"])
    ruts, rut_bad = _normalize_ruts(document_number, is_rut)
    findings.reject(reasons.INVALID_RUT, rut_bad & ~tombstone)
    columns["document_type"] = document_type
    document_number = pc.if_else(_arrow(is_rut), ruts, document_number)
    columns["document_number"] = findings.clear(
        "document_number", reasons.INVALID_RUT, rut_bad, document_number
    )

    country = pc.utf8_upper(_clean_text(fields["country"]))
    country_bad = _valid(country) & ~_mask(pc.is_in(country, value_set=_COUNTRY_SET))
    country = findings.clear("country", reasons.INVALID_COUNTRY, country_bad, country)
    columns["country"] = country

    # Phones are read in the client's own country, else in the site's.
    regions = pc.if_else(pc.is_in(country, value_set=_PHONE_REGION_SET), country, default_region)
    phones, phone_bad = _normalize_phones(_clean_text(fields["phone"]), regions)
    columns["phone"] = findings.clear("phone", reasons.INVALID_PHONE, phone_bad, phones)

    birth_dates, days, birth_bad = _parse_dates(_clean_text(fields["birth_date"]))
    present = _valid(birth_dates)
    in_future = present & (days > _days(today))
    too_old = present & (days < _days(_years_before(today, reasons.MAX_AGE_YEARS)))
    birth_dates = findings.clear("birth_date", reasons.INVALID_BIRTH_DATE, birth_bad, birth_dates)
    birth_dates = findings.clear("birth_date", reasons.BIRTH_DATE_IN_FUTURE, in_future, birth_dates)
    columns["birth_date"] = findings.clear(
        "birth_date", reasons.BIRTH_DATE_TOO_OLD, too_old, birth_dates
    )

    created_at, _, created_bad = _parse_instants(_clean_text(fields["created_at"]))
    columns["created_at"] = findings.clear(
        "created_at", reasons.INVALID_CREATED_AT, created_bad, created_at
    )

    marketing = _clean_text(fields["accepts_marketing"])
    is_true = pc.equal(marketing, "true")
    marketing_bad = _valid(marketing) & ~_mask(is_true) & ~_mask(pc.equal(marketing, "false"))
    columns["accepts_marketing"] = findings.clear(
        "accepts_marketing", reasons.INVALID_ACCEPTS_MARKETING, marketing_bad, is_true
    )

    custom_fields = _clean_text(fields["custom_fields"])
    custom_bad = _valid(custom_fields) & ~_json_objects(custom_fields)
    columns["custom_fields"] = findings.clear(
        "custom_fields", reasons.INVALID_CUSTOM_FIELDS, custom_bad, custom_fields
    )

    for name in ("first_name", "last_name", "gender", "region", "city"):
        columns[name] = _clean_text(fields[name])
    # Forward-compatible properties are kept exactly as they came.
    columns["unknown_fields"] = fields["unknown_fields"]
    return columns


class _Findings:
    """The rejection and clearing masks found so far, one boolean per row."""

    def __init__(self, not_object: np.ndarray) -> None:
        self.not_object = not_object
        self.rejected: dict[str, np.ndarray] = {reasons.NOT_AN_OBJECT: not_object}
        self.cleared: list[tuple[str, str, np.ndarray]] = []

    def reject(self, code: str, mask: np.ndarray) -> None:
        # A non-object has no fields to judge: its one reason says it all.
        self.rejected[code] = mask & ~self.not_object

    def clear(self, field: str, code: str, mask: np.ndarray, values: pa.Array) -> pa.Array:
        """Record that ``field`` is cleared where ``mask`` holds; return the cleared values."""
        if not mask.any():
            return values
        self.cleared.append((field, code, mask))
        return pc.if_else(_arrow(mask), pa.scalar(None, values.type), values)


def _assemble(
    table: pa.Table,
    latest: np.ndarray,
    columns: dict[str, pa.Array],
    findings: _Findings,
    sizes: list[int],
) -> list[ValidationResult]:
    """Split the latest version of each id into clean and rejected rows, once for all of the
    rows, and give each partition (``sizes`` rows each, one after the other) its share: its
    rows follow one another in both tables, so each one's are a slice."""
    n = table.num_rows
    rejected_mask = np.zeros(n, dtype=bool)
    for mask in findings.rejected.values():
        rejected_mask |= mask
    rejected_mask &= latest
    valid_mask = latest & ~rejected_mask
    bounds = np.cumsum([0, *sizes])

    def per_partition(mask: np.ndarray) -> list[int]:
        running = np.concatenate([[0], np.cumsum(mask, dtype=np.int64)])
        return (running[bounds[1:]] - running[bounds[:-1]]).tolist()

    notes: dict[int, list[dict[str, str]]] = {}
    cleared_by_reason: list[dict[str, int]] = [{} for _ in sizes]
    for field, code, mask in findings.cleared:
        kept = mask & valid_mask
        for counts, count in zip(cleared_by_reason, per_partition(kept), strict=True):
            if count:
                counts[code] = counts.get(code, 0) + count
        for row in np.flatnonzero(kept).tolist():
            notes.setdefault(row, []).append({"field": field, "reason": code})
    note_rows = np.array(sorted(notes), dtype=np.int64)
    columns["quality_notes"] = _scatter(
        n, note_rows, pa.array([orjson.dumps(notes[row]).decode() for row in note_rows.tolist()])
    )
    selection = None if valid_mask.all() else _arrow(valid_mask)
    valid = pa.Table.from_arrays(
        [
            columns[name] if selection is None else columns[name].filter(selection)
            for name in CLEAN_SCHEMA.names
        ],
        schema=CLEAN_SCHEMA,
    )

    rejected_rows = np.flatnonzero(rejected_mask)
    position = np.full(n, -1, dtype=np.int64)
    position[rejected_rows] = np.arange(len(rejected_rows))
    row_reasons: list[list[str]] = [[] for _ in rejected_rows]
    rejected_by_reason: list[dict[str, int]] = [{} for _ in sizes]
    for code in reasons.codes("rejected"):
        mask = findings.rejected.get(code, False) & rejected_mask
        for counts, count in zip(rejected_by_reason, per_partition(mask), strict=True):
            if count:
                counts[code] = count
        for row in position[np.flatnonzero(mask)].tolist():
            row_reasons[row].append(code)
    rejected = pa.Table.from_arrays(
        [
            columns["hermes_id"].take(rejected_rows),
            columns["updated_at"].take(rejected_rows),
            pa.array(row_reasons, type=pa.list_(pa.string())),
            _records(table, rejected_rows),
        ],
        schema=REJECTED_SCHEMA,
    )

    results = []
    valid_at = rejected_at = 0
    for size, judged, valid_rows, rejected_count, rejected_counts, cleared_counts in zip(
        sizes,
        per_partition(latest),
        per_partition(valid_mask),
        per_partition(rejected_mask),
        rejected_by_reason,
        cleared_by_reason,
        strict=True,
    ):
        results.append(
            ValidationResult(
                valid=valid.slice(valid_at, valid_rows),
                rejected=rejected.slice(rejected_at, rejected_count),
                rows_in=size,
                duplicates_dropped=size - judged,
                rejected_by_reason=rejected_counts,
                cleared_by_reason={
                    code: cleared_counts[code] for code in reasons.REASONS if code in cleared_counts
                },
            )
        )
        valid_at += valid_rows
        rejected_at += rejected_count
    return results


def _records(table: pa.Table, rows: np.ndarray) -> pa.Array:
    """The raw record of each rejected row, rebuilt from its fields where it is missing."""
    records = _take_chunked(table.column("record"), rows)
    if records.null_count == 0:
        return records
    fields = pa.table({name: _take_chunked(table.column(name), rows) for name in CLIENT_FIELDS})
    return pa.array(
        [
            record
            if record is not None
            else orjson.dumps({k: v for k, v in row.items() if v is not None}).decode()
            for record, row in zip(records.to_pylist(), fields.to_pylist(), strict=True)
        ],
        type=pa.string(),
    )


# --- Rows: shape checks and deduplication -----------------------------------------------------


def _conform(raw: pa.Table | pa.RecordBatch) -> pa.Table:
    if isinstance(raw, pa.RecordBatch):
        raw = pa.Table.from_batches([raw])
    if not isinstance(raw, pa.Table):
        raise TypeError(f"expected a pyarrow Table of raw client rows, got {type(raw).__name__}")
    present = set(raw.column_names)  # a new list at each call: read once
    missing = [name for name in RAW_SCHEMA.names if name not in present]
    if missing:
        raise ValueError(
            f"raw client rows lack the column(s) {', '.join(missing)}; "
            "build them with hermes_orchestration.records.records_to_batch"
        )
    try:
        return raw.select(RAW_SCHEMA.names).cast(RAW_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as err:
        raise ValueError(f"raw client rows do not match RAW_SCHEMA: {err}") from err


def _check_default_country(default_country: str) -> str:
    region = default_country.strip().upper() if isinstance(default_country, str) else ""
    if region not in ISO_3166_ALPHA2 or region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError(
            f"default_country {default_country!r} is not an ISO 3166-1 alpha-2 country with "
            "a phone numbering plan; set the site's country, such as 'CL'"
        )
    return region


def _not_an_object(fields: dict[str, pa.Array], records: pa.ChunkedArray) -> np.ndarray:
    """Rows built from a ``data`` item that was not a JSON object (a list, a number, null...)."""
    all_null = np.ones(len(records), dtype=bool)
    for values in fields.values():
        all_null &= ~_valid(values)
    if not all_null.any():
        return all_null
    return all_null & ~_mask(pc.starts_with(records, "{"))


def _superseded(
    ids: pa.Array, micros: np.ndarray, usable: np.ndarray, parts: np.ndarray | None = None
) -> np.ndarray:
    """The usable rows superseded by another version of the same id in the partition (in the
    same one of ``parts``, the partition of each row, if given).

    The version with the latest ``updated_at`` instant wins (instants, never text, are
    compared); a tie goes to the row that came later in the listing.
    """
    superseded = np.zeros(len(ids), dtype=bool)
    rows = np.flatnonzero(usable)
    if len(rows) < 2:
        return superseded
    usable_ids = ids.take(rows)
    if parts is None:
        order = pc.sort_indices(usable_ids).to_numpy()
    else:
        keys = pa.table({"part": parts[rows], "id": usable_ids})
        order = pc.sort_indices(keys, [("part", "ascending"), ("id", "ascending")]).to_numpy()
    sorted_ids = usable_ids.take(order)
    same_as_next = _mask(pc.equal(sorted_ids[:-1], sorted_ids[1:]))
    if parts is not None:
        sorted_parts = parts[rows][order]
        same_as_next &= sorted_parts[:-1] == sorted_parts[1:]
    if not same_as_next.any():
        return superseded
    # Only the rows of a repeated id need ranking: by id, then instant, then input position.
    run = np.concatenate([[0], np.cumsum(~same_as_next)])
    repeated = np.zeros(len(order), dtype=bool)
    repeated[:-1] |= same_as_next
    repeated[1:] |= same_as_next
    members, member_runs = rows[order[repeated]], run[repeated]
    ranked = np.lexsort((members, micros[members], member_runs))
    members, member_runs = members[ranked], member_runs[ranked]
    last_of_id = np.ones(len(members), dtype=bool)
    last_of_id[:-1] = member_runs[:-1] != member_runs[1:]
    superseded[members[~last_of_id]] = True
    return superseded


# --- Text ----------------------------------------------------------------------------------------


def _clean_text(values: pa.Array) -> pa.Array:
    """Trim, turn blanks into nulls and drop NUL characters (which PostgreSQL text refuses)."""
    if values.null_count == len(values):
        return values
    if _has_nul(values):
        values = pc.replace_substring(values, "\x00", "")
    values = pc.utf8_trim_whitespace(values)
    return _with_validity(values, _valid(values) & _mask(pc.not_equal(values, "")))


def _with_validity(values: pa.Array, valid: np.ndarray) -> pa.Array:
    """``values`` with nulls wherever ``valid`` is false, sharing the character data."""
    if values.offset or values.buffers()[2] is None:  # rare shapes: let Arrow copy
        return pc.if_else(_arrow(valid), values, _NULL_TEXT)
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(values.type, len(values), [bitmap, *values.buffers()[1:]])


def _has_nul(values: pa.Array) -> bool:
    # Scanning the character buffer is far cheaper than a search per value; bytes outside the
    # array's slice can only cause a needless (and harmless) replacement.
    data = values.buffers()[2]
    return data is not None and not np.frombuffer(data, dtype=np.uint8).all()


def _json_objects(values: pa.Array) -> np.ndarray:
    """Which values are the JSON text of an object (nested values are allowed)."""
    result = _mask(pc.and_(pc.starts_with(values, "{"), pc.ends_with(values, "}")))
    rows = np.flatnonzero(result)
    if len(rows):
        encoded = values.take(rows).dictionary_encode()
        objects = np.array([_is_json_object(text) for text in encoded.dictionary.to_pylist()])
        result[rows] = objects[encoded.indices.to_numpy(zero_copy_only=False)]
    return result


def _is_json_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:  # also raised past orjson's nesting limit
        return False


# --- Timestamps and dates ---------------------------------------------------------------------

# RFC 3339 date-time in the shape Arrow parses exactly (upper-case T or a space, at most six
# fractional digits, Z or a +hh:mm offset). Other RFC 3339 spellings go to _instant_micros.
_INSTANT_FAST = (
    r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])[T ]"
    r"(?:[01][0-9]|2[0-3]):[0-5][0-9]:[0-5][0-9](?:\.[0-9]{1,6})?"
    r"(?:Z|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])$"
)
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?"
    r"(?:([Zz])|([+-])(\d{2}):(\d{2}))",
    re.ASCII,
)
_DATE_FAST = r"^[0-9]{4}-(?:0[1-9]|1[0-2])-(?:0[1-9]|[12][0-9]|3[01])$"
_DATE = re.compile(r"(\d{4})-(\d{2})-(\d{2})", re.ASCII)


def _parse_instants(values: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Parse RFC 3339 date-times with an offset into UTC instants.

    Returns the instants (null where missing or invalid), the same as microseconds since the
    epoch, and the mask of present but invalid values. Digits past the microsecond are
    truncated.
    """
    present = _valid(values)
    micros = np.zeros(len(values), dtype=np.int64)
    ok = np.zeros(len(values), dtype=bool)
    if present.any():
        fast = _mask(pc.match_substring_regex(values, _INSTANT_FAST))
        rows = _on_calendar(values, np.flatnonzero(fast))
        if len(rows):
            micros[rows], ok[rows] = _cast_strict(
                values.take(rows), UTC_TIMESTAMP, pa.int64(), _instant_micros
            )
        rows = np.flatnonzero(present & ~fast)
        if len(rows):
            micros[rows], ok[rows] = _per_value(values.take(rows), _instant_micros)
        ok &= (micros >= _MIN_MICROS) & (micros <= _MAX_MICROS)
    instants = pa.array(micros, mask=~ok).cast(UTC_TIMESTAMP)
    return instants, micros, present & ~ok


def _instant_micros(text: str) -> int | None:
    """One RFC 3339 date-time as microseconds since the epoch, or None."""
    match = _RFC3339.fullmatch(text)
    if match is None:
        return None
    year, month, day, hour, minute, second, fraction, zulu, sign, off_h, off_m = match.groups()
    try:
        offset = timedelta(0)
        if not zulu:
            if int(off_h) > 23 or int(off_m) > 59:
                return None
            offset = timedelta(hours=int(off_h), minutes=int(off_m))
            offset = -offset if sign == "-" else offset
        local = datetime(
            int(year),
            int(month),
            int(day),
            int(hour),
            int(minute),
            int(second),
            int((fraction or "")[:6].ljust(6, "0")),
            tzinfo=timezone(offset),
        )
        return (local.astimezone(UTC) - _EPOCH) // _MICROSECOND
    except (ValueError, OverflowError):  # impossible dates, leap seconds, out of range
        return None


def _parse_dates(values: pa.Array) -> tuple[pa.Array, np.ndarray, np.ndarray]:
    """Parse YYYY-MM-DD calendar dates.

    Returns the dates (null where missing or invalid), the same as days since the epoch, and
    the mask of present but invalid values.
    """
    present = _valid(values)
    days = np.zeros(len(values), dtype=np.int64)
    ok = np.zeros(len(values), dtype=bool)
    rows = _on_calendar(values, np.flatnonzero(_mask(pc.match_substring_regex(values, _DATE_FAST))))
    if len(rows):
        days[rows], ok[rows] = _cast_strict(values.take(rows), pa.date32(), pa.int32(), _date_days)
    dates = pa.array(days.astype(np.int32), mask=~ok).cast(pa.date32())
    return dates, days, present & ~ok


def _date_days(text: str) -> int | None:
    match = _DATE.fullmatch(text)
    if match is None:
        return None
    try:
        return _days(date(*(int(part) for part in match.groups())))
    except ValueError:
        return None


def _days(day: date) -> int:
    return (day - date(1970, 1, 1)).days


def _years_before(day: date, years: int) -> date:
    try:
        return day.replace(year=day.year - years)
    except ValueError:  # 29 February in a year that has none
        return day.replace(year=day.year - years, day=28)


_DAYS_IN_MONTH = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31])


def _on_calendar(values: pa.Array, rows: np.ndarray) -> np.ndarray:
    """The ``rows`` whose value starts with a real YYYY-MM-DD day (month already 01-12).

    Checked up front because one impossible day, such as 30 February, fails a whole cast.
    """
    if len(rows) == 0:
        return rows
    digits = _leading_bytes(values.take(rows), 10).astype(np.int64) - ord("0")
    year = digits[:, 0] * 1000 + digits[:, 1] * 100 + digits[:, 2] * 10 + digits[:, 3]
    month = digits[:, 5] * 10 + digits[:, 6]
    day = digits[:, 8] * 10 + digits[:, 9]
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    last_day = _DAYS_IN_MONTH[month - 1] + (leap & (month == 2))
    return rows[(year >= 1) & (day <= last_day)]


def _leading_bytes(values: pa.Array, width: int) -> np.ndarray:
    """The first ``width`` bytes of each value (all non-null and at least that long), as rows."""
    offsets = np.frombuffer(values.buffers()[1], dtype=np.int32)
    starts = offsets[values.offset : values.offset + len(values)]
    data = np.frombuffer(values.buffers()[2], dtype=np.uint8)
    return data[starts[:, None] + np.arange(width)]


def _cast_strict(
    values: pa.Array,
    target: pa.DataType,
    integer: pa.DataType,
    fallback: Callable[[str], int | None],
) -> tuple[np.ndarray, np.ndarray]:
    """Cast text to a temporal type as integers, isolating the values Arrow refuses.

    A cast fails as a whole on one value it refuses, so a failing slice is halved until such
    values are found and judged one by one. (Impossible days are removed beforehand; this is
    the safety net for anything else Arrow might refuse.)
    """
    try:
        cast = pc.cast(values, target).cast(integer)
        return cast.to_numpy(zero_copy_only=False), np.ones(len(values), dtype=bool)
    except pa.ArrowInvalid:
        if len(values) <= 16:
            return _per_value(values, fallback)
        middle = len(values) // 2
        head = _cast_strict(values.slice(0, middle), target, integer, fallback)
        tail = _cast_strict(values.slice(middle), target, integer, fallback)
        return np.concatenate([head[0], tail[0]]), np.concatenate([head[1], tail[1]])


def _per_value(
    values: pa.Array, parse: Callable[[str], int | None]
) -> tuple[np.ndarray, np.ndarray]:
    parsed = [parse(text) for text in values.to_pylist()]
    ok = np.array([value is not None for value in parsed], dtype=bool)
    return np.array([value or 0 for value in parsed], dtype=np.int64), ok


# --- Email ---------------------------------------------------------------------------------------

# Addresses that email-validator accepts unchanged but for the case of the domain: a dot-atom
# local part of letters, digits, "_", "+" and "-", and a domain of ASCII labels ending in an
# all-letter top-level domain. Values with "--" (Punycode and reserved labels), special-use
# domains or more than 254 bytes are excluded separately.
_EMAIL_FAST = (
    r"^[A-Za-z0-9_+-]+(?:\.[A-Za-z0-9_+-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,63}$"
)
_EMAIL_MAX_BYTES = 254


def _normalize_emails(emails: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Normalize addresses to email-validator's form, lower-cased; returns the invalid mask."""
    present = _valid(emails)
    fast = _email_fast(emails)
    rows = np.flatnonzero(present & ~fast)
    normalized = [_email_or_none(text) for text in emails.take(rows).to_pylist()]
    bad = np.zeros(len(emails), dtype=bool)
    bad[rows[[value is None for value in normalized]]] = True
    # utf8_lower equals str.lower on the ASCII values that take the fast path.
    lowered = pc.utf8_lower(emails)
    if len(rows):
        lowered = pc.replace_with_mask(
            lowered, _arrow(present & ~fast), pa.array(normalized, type=pa.string())
        )
    return lowered, bad


def _email_fast(emails: pa.Array) -> np.ndarray:
    fast = _mask(pc.match_substring_regex(emails, _EMAIL_FAST))
    if not fast.any():
        return fast
    special = "|".join(re.escape(name) for name in email_validator.SPECIAL_USE_DOMAIN_NAMES)
    fast &= ~_mask(pc.match_substring(emails, "--"))
    fast &= ~_mask(pc.match_substring_regex(emails, f"[@.](?:{special})$", ignore_case=True))
    fast &= _mask(pc.less_equal(pc.binary_length(emails), _EMAIL_MAX_BYTES))
    return fast


def _email_or_none(text: str) -> str | None:
    # A valid address is never longer than 254 bytes; this also keeps huge values out of the
    # library, whose parsing is slow on them.
    if len(text) > _EMAIL_MAX_BYTES:
        return None
    return _email_library(text)


@functools.lru_cache(maxsize=_CACHE_SIZE)
def _email_library(text: str) -> str | None:
    try:
        checked = email_validator.validate_email(
            text,
            check_deliverability=False,
            allow_smtputf8=True,
            allow_empty_local=False,
            allow_quoted_local=False,
            allow_domain_literal=False,
            allow_display_name=False,
            strict=False,
            globally_deliverable=True,
            test_environment=False,
        )
    except email_validator.EmailNotValidError:
        return None
    except Exception:  # a library fault on one hostile value costs that value, not the partition
        logger.debug("email-validator failed on a value; treating it as invalid", exc_info=True)
        return None
    return checked.normalized.lower()


# --- RUT -----------------------------------------------------------------------------------------

# A RUT of 7 or 8 digits and a check character, with the usual dots and dash, e.g. 12.345.678-5.
_RUT_FAST = r"^[0-9]{1,2}\.?[0-9]{3}\.?[0-9]{3}-?[0-9Kk]$"
# python-stdnum's weights for an 8-digit body, left to right: 4 + (5 - i) % 6, i from the right.
_RUT_WEIGHTS = np.array([4 + (5 - i) % 6 for i in range(7, -1, -1)], dtype=np.int64)
_RUT_CHECK = np.frombuffer(b"0123456789K", dtype=np.uint8)


def _normalize_ruts(numbers: pa.Array, is_rut: np.ndarray) -> tuple[pa.Array, np.ndarray]:
    """Canonical RUTs (``12345678-5``) where ``is_rut``; returns them and the invalid mask."""
    candidates = is_rut & _valid(numbers)
    result = pa.nulls(len(numbers), pa.string())
    bad = np.zeros(len(numbers), dtype=bool)
    if not candidates.any():
        return result, bad
    fast_rows = np.flatnonzero(candidates & _mask(pc.match_substring_regex(numbers, _RUT_FAST)))
    compact = pc.utf8_upper(_without(numbers.take(fast_rows), ".", "-"))
    checked = _rut_check_digit_ok(compact)
    accepted = fast_rows[checked]
    slow = candidates.copy()
    slow[accepted] = False
    slow_rows = np.flatnonzero(slow)
    canonical = [_rut_or_none(text) for text in numbers.take(slow_rows).to_pylist()]
    bad[slow_rows[[value is None for value in canonical]]] = True
    rows = np.concatenate([accepted, slow_rows])
    values = pa.concat_arrays(
        [
            pc.utf8_replace_slice(compact.filter(_arrow(checked)), -1, -1, "-"),
            pa.array(canonical, type=pa.string()),
        ]
    )
    return _scatter(len(numbers), rows, values), bad


def _rut_check_digit_ok(compact: pa.Array) -> np.ndarray:
    """The check of python-stdnum's ``calc_check_digit``, on 8- and 9-character compact RUTs."""
    if len(compact) == 0:
        return np.zeros(0, dtype=bool)
    padded = pc.utf8_lpad(compact, 9, "0").cast(pa.binary(9))
    data = np.frombuffer(padded.buffers()[1], dtype=np.uint8)
    chars = data[padded.offset * 9 : (padded.offset + len(padded)) * 9].reshape(-1, 9)
    total = (chars[:, :8].astype(np.int64) - ord("0")) @ _RUT_WEIGHTS
    return chars[:, 8] == _RUT_CHECK[total % 11]


def _rut_or_none(text: str) -> str | None:
    return _rut_library(text) if len(text) <= _CACHEABLE_LENGTH else _rut_uncached(text)


def _rut_uncached(text: str) -> str | None:
    try:
        number = cl_rut.validate(text)
    except Exception:  # stdnum's ValidationError, or a library fault on a hostile value
        return None
    return f"{number[:-1]}-{number[-1]}"


_rut_library = functools.lru_cache(maxsize=_CACHE_SIZE)(_rut_uncached)


# --- Phone ---------------------------------------------------------------------------------------

_PHONE_SHAPE = r"^\+?[0-9]+(?:[ \-][0-9]+)*$"


def _normalize_phones(phones: pa.Array, regions: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Phones in E.164, read in each row's region; returns them and the invalid mask."""
    present = _valid(phones)
    accepted: list[np.ndarray] = []
    values: list[pa.Array] = []
    shaped = np.flatnonzero(present & _mask(pc.match_substring_regex(phones, _PHONE_SHAPE)))
    if len(shaped):
        digits = _without(phones.take(shaped), " ", "-")
        shaped_regions = regions.take(shaped)
        for region in pc.unique(shaped_regions).to_pylist():
            plan = _phone_plan(region)
            if plan is None:
                continue
            in_region = _mask(pc.equal(shaped_regions, region))
            ok, e164 = plan.accept(digits.filter(_arrow(in_region)))
            accepted.append(shaped[in_region][ok])
            values.append(e164.filter(_arrow(ok)))
    fast_rows = np.concatenate(accepted) if accepted else np.zeros(0, dtype=np.int64)
    slow = present.copy()
    slow[fast_rows] = False
    slow_rows = np.flatnonzero(slow)
    normalized = [
        _phone_or_none(text, region)
        for text, region in zip(
            phones.take(slow_rows).to_pylist(), regions.take(slow_rows).to_pylist(), strict=True
        )
    ]
    bad = np.zeros(len(phones), dtype=bool)
    bad[slow_rows[[value is None for value in normalized]]] = True
    values.append(pa.array(normalized, type=pa.string()))
    rows = np.concatenate([fast_rows, slow_rows])
    return _scatter(len(phones), rows, pa.concat_arrays(values)), bad


def _phone_or_none(text: str, region: str) -> str | None:
    if len(text) > _CACHEABLE_LENGTH:
        return _phone_uncached(text, region)
    return _phone_library(text, region)


def _phone_uncached(text: str, region: str) -> str | None:
    try:
        number = phonenumbers.parse(text, region)
        if not phonenumbers.is_valid_number(number):
            return None
        return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    except phonenumbers.NumberParseException:
        return None
    except Exception:  # a library fault on one hostile value costs that value, not the partition
        logger.debug("phonenumbers failed on a value; treating it as invalid", exc_info=True)
        return None


_phone_library = functools.lru_cache(maxsize=_CACHE_SIZE)(_phone_uncached)


@dataclass(frozen=True)
class _PhonePlan:
    """The numbers of one region that ``phonenumbers`` provably accepts unchanged.

    Built from the library's own metadata. A number qualifies when it is written as digits,
    either national or after ``+`` and the region's calling code, does not start with 0, with
    the international or the national prefix, and matches the region's general pattern and its
    fixed-line or mobile pattern at a possible length. For such a number, ``parse`` strips
    nothing and ``is_valid_number`` holds, so its E.164 form is ``+<calling code><digits>``.

    A national prefix pattern that can match nothing (Argentina's: an optional 0, an optional
    area code and 15) strips nothing where it does match nothing, unless that empty match
    triggers the region's transform rule: ``prefix_may_be_empty`` is then true, and only a
    number that starts with a prefix of one character or more is left to the library.
    """

    calling_code: str
    plus_ok: bool  # no shorter prefix of the calling code is itself a calling code
    international_prefix: str | None
    national_prefix: str | None
    general: tuple[str, tuple[int, ...]]
    types: tuple[tuple[str, tuple[int, ...]], ...]
    prefix_may_be_empty: bool = False  # then ``national_prefix`` has no capturing group

    def accept(self, digits: pa.Array) -> tuple[np.ndarray, pa.Array]:
        """Which of ``digits`` (``+`` and digits only) qualify, and their E.164 forms."""
        has_plus = _mask(pc.starts_with(digits, "+"))
        prefix = "+" + self.calling_code
        ok = ~has_plus
        if self.plus_ok:
            ok |= _mask(pc.starts_with(digits, prefix))
        national = pc.if_else(
            _arrow(has_plus), pc.utf8_slice_codeunits(digits, len(prefix)), digits
        )
        if self.international_prefix:
            idd = f"^(?:{self.international_prefix})"
            ok &= has_plus | ~_mask(pc.match_substring_regex(national, idd))
        if self.national_prefix:
            ok &= ~self._starts_with_national_prefix(national)
        ok &= ~_mask(pc.starts_with(national, "0"))
        lengths = pc.utf8_length(national).to_numpy(zero_copy_only=False)
        ok &= _matches(national, lengths, *self.general)
        any_type = np.zeros(len(digits), dtype=bool)
        for pattern, possible in self.types:
            any_type |= _matches(national, lengths, pattern, possible)
        ok &= any_type
        return ok, pc.binary_join_element_wise(prefix, national, "")

    def _starts_with_national_prefix(self, national: pa.Array) -> np.ndarray:
        """Which numbers start with a national prefix that ``parse`` would strip or transform."""
        if not self.prefix_may_be_empty:
            return _mask(pc.match_substring_regex(national, f"^(?:{self.national_prefix})"))
        found = pc.extract_regex(national, f"^(?P<prefix>{self.national_prefix})")
        return _mask(pc.greater(pc.utf8_length(pc.struct_field(found, "prefix")), 0))


def _matches(
    national: pa.Array, lengths: np.ndarray, pattern: str, possible: tuple[int, ...]
) -> np.ndarray:
    """``phonenumbers``' _is_number_matching_desc: a possible length and a full match."""
    ok = np.isin(lengths, possible) if possible else np.ones(len(national), dtype=bool)
    return ok & _mask(pc.match_substring_regex(national, f"^(?:{pattern})$"))


@functools.cache
def _phone_plan(region: str) -> _PhonePlan | None:
    """The fast-path plan of a region, or None where the shortcut cannot be proven exact."""
    metadata = PhoneMetadata.metadata_for_region(region, None)
    if metadata is None or metadata.country_code is None:
        return None
    regions = phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(metadata.country_code, ())
    if len(regions) != 1:  # shared calling codes need the library to tell regions apart
        return None
    code = str(metadata.country_code)
    plus_ok = all(
        int(code[:i]) not in phonenumbers.COUNTRY_CODE_TO_REGION_CODE for i in range(1, len(code))
    )
    general = _desc(metadata.general_desc)
    types = tuple(
        desc for desc in (_desc(metadata.fixed_line), _desc(metadata.mobile)) if desc is not None
    )
    if general is None or not general[1] or not types:
        return None
    national_prefix = metadata.national_prefix_for_parsing or None
    prefix_may_be_empty = False
    if national_prefix is not None and (empty := re.match(national_prefix, "")) is not None:
        # What ``_maybe_strip_national_prefix_carrier_code`` does with a match of nothing: it
        # strips nothing, unless the transform rule applies (its last group took part).
        transforms = bool(metadata.national_prefix_transform_rule) and bool(empty.groups())
        # Digits, classes, groups and alternatives only: no escaped parenthesis, no lookaround.
        plain = re.fullmatch(r"(?:[0-9|?:()\[\]\-]|\\d)*", national_prefix) is not None
        if plain and not (transforms and empty.groups()[-1] is not None):
            national_prefix = re.sub(r"\((?!\?)", "(?:", national_prefix)  # no capturing group
            prefix_may_be_empty = True
    plan = _PhonePlan(
        calling_code=code,
        plus_ok=plus_ok,
        international_prefix=metadata.international_prefix or None,
        national_prefix=national_prefix,
        general=general,
        types=types,
        prefix_may_be_empty=prefix_may_be_empty,
    )
    try:  # the library's patterns are plain regular expressions; make sure RE2 agrees
        plan.accept(pa.array(["+" + code + "2", "2"]))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return plan


def _desc(desc: PhoneNumberDesc | None) -> tuple[str, tuple[int, ...]] | None:
    if desc is None or not desc.national_number_pattern:
        return None
    return desc.national_number_pattern, tuple(desc.possible_length or ())


# --- Arrow helpers -------------------------------------------------------------------------------


def _combined(values: pa.Array | pa.ChunkedArray) -> pa.Array:
    return values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values


def _valid(values: pa.Array) -> np.ndarray:
    return values.is_valid().to_numpy(zero_copy_only=False)


def _mask(values: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A boolean Arrow result as a NumPy mask, null counting as false."""
    return pc.fill_null(values, False).to_numpy(zero_copy_only=False)


def _arrow(mask: np.ndarray) -> pa.Array:
    return pa.array(mask, type=pa.bool_())


def _without(values: pa.Array, *characters: str) -> pa.Array:
    for character in characters:
        values = pc.replace_substring(values, character, "")
    return values


def _take_chunked(values: pa.ChunkedArray, rows: np.ndarray) -> pa.Array:
    """``values.take(rows)`` for ascending ``rows``, without concatenating every chunk first."""
    if values.num_chunks == 1:
        return values.chunk(0).take(rows)
    starts = np.cumsum([0] + [len(chunk) for chunk in values.chunks])
    chunk_of = np.searchsorted(starts, rows, side="right") - 1
    pieces = [
        values.chunk(index).take(rows[chunk_of == index] - starts[index])
        for index in np.unique(chunk_of)
    ]
    return pa.concat_arrays(pieces) if pieces else pa.array([], type=values.type)


def _scatter(n: int, rows: np.ndarray, values: pa.Array) -> pa.Array:
    """An array of ``n`` nulls with ``values[i]`` placed at position ``rows[i]``."""
    result = pa.nulls(n, values.type)
    if len(rows) == 0:
        return result
    order = np.argsort(rows, kind="stable")
    mask = np.zeros(n, dtype=bool)
    mask[rows] = True
    return pc.replace_with_mask(result, _arrow(mask), values.take(order))
