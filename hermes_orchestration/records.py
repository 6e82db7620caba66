"""The columnar shapes that Hermes clients take between the assets.

Pages of client records become Arrow record batches at the boundary, so that nothing downstream
walks raw dicts and the data path streams: pages -> batches -> Parquet -> batched loads.

- ``RAW_SCHEMA``: what the site sent, verbatim. Every field is kept as text (a number or a boolean
  where a string belongs is kept as its JSON text), and the whole record is kept as JSON in
  ``record`` so that a rejected row can be shown exactly as it arrived.
- ``CLEAN_SCHEMA``: a validated, normalized client, ready for the master database.
- ``REJECTED_SCHEMA``: a rejected row with its reason codes and the raw record.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc

from hermes_orchestration import memory

# Before any module of the package converts a Python list into Arrow (they all import this one).
memory.withhold_pandas_from_arrow()

# The Client properties of the API contract, in contract order.
CLIENT_FIELDS: tuple[str, ...] = (
    "id",
    "email",
    "first_name",
    "last_name",
    "document_type",
    "document_number",
    "phone",
    "birth_date",
    "gender",
    "country",
    "region",
    "city",
    "accepts_marketing",
    "created_at",
    "updated_at",
    "deleted_at",
    "custom_fields",
)
_KNOWN = frozenset(CLIENT_FIELDS)

RAW_SCHEMA = pa.schema(
    [pa.field(name, pa.string()) for name in CLIENT_FIELDS]
    + [
        # Properties the contract does not name yet (forward compatibility), as a JSON object.
        pa.field("unknown_fields", pa.string()),
        # The whole record exactly as decoded, as JSON.
        pa.field("record", pa.string()),
    ]
)

UTC_TIMESTAMP = pa.timestamp("us", tz="UTC")

# Text fields copied to the master database after normalization.
CONTACT_TEXT_FIELDS: tuple[str, ...] = (
    "first_name",
    "last_name",
    "document_type",
    "document_number",
    "phone",
    "gender",
    "country",
    "region",
    "city",
)

CLEAN_SCHEMA = pa.schema(
    [
        pa.field("hermes_id", pa.string(), nullable=False),
        pa.field("email", pa.string()),  # null only on tombstones
        *[pa.field(name, pa.string()) for name in CONTACT_TEXT_FIELDS],
        pa.field("birth_date", pa.date32()),
        pa.field("accepts_marketing", pa.bool_()),
        pa.field("custom_fields", pa.string()),  # JSON object or null
        pa.field("unknown_fields", pa.string()),  # JSON object or null
        pa.field("created_at", UTC_TIMESTAMP),
        pa.field("updated_at", UTC_TIMESTAMP, nullable=False),
        pa.field("deleted_at", UTC_TIMESTAMP),
        # JSON list of {"field": ..., "reason": ...}: fields cleared, the row kept.
        pa.field("quality_notes", pa.string()),
    ]
)

REJECTED_SCHEMA = pa.schema(
    [
        pa.field("hermes_id", pa.string()),
        pa.field("updated_at", UTC_TIMESTAMP),
        pa.field("reasons", pa.list_(pa.string()), nullable=False),
        pa.field("record", pa.string(), nullable=False),
    ]
)


# orjson decodes up to 1024 levels of nesting but encodes only about 254: a value nested deeper
# is replaced by this text, which validation treats as a malformed field (cleared, with a note).
TOO_DEEP = "<value nested too deeply to store>"


def encode(value: Any) -> bytes:
    """``value`` as compact JSON. Decoded JSON has text keys only, and orjson encodes those four
    times faster without ``OPT_NON_STR_KEYS`` (a cost per call): the option is the fallback for
    other keys. Raises orjson.JSONEncodeError for a value nested too deeply."""
    try:
        return orjson.dumps(value)
    except orjson.JSONEncodeError:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)


def _dumps(value: Any) -> str:
    try:
        return encode(value).decode()
    except orjson.JSONEncodeError:
        return orjson.dumps(TOO_DEEP).decode()


def _as_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    # Numbers, booleans, objects and arrays are kept as their JSON text, verbatim.
    text = _dumps(value)
    return TOO_DEEP if text == '"' + TOO_DEEP + '"' else text


def _record_text(record: Mapping[str, Any]) -> str:
    try:
        return encode(record).decode()
    except orjson.JSONEncodeError:
        # Keep every property that can be stored; only the too-deep values are replaced.
        return orjson.dumps(
            {key: orjson.loads(_dumps(value)) for key, value in record.items()},
            option=orjson.OPT_NON_STR_KEYS,
        ).decode()


# The common case: every record an object whose fields have the contract's types. Arrow converts
# those in C; anything else (a number where text belongs, a non-object...) takes the general path.
_TEXT_FIELDS = tuple(
    name for name in CLIENT_FIELDS if name not in ("accepts_marketing", "custom_fields")
)
_TYPED = pa.struct(
    [pa.field(name, pa.string()) for name in _TEXT_FIELDS]
    + [pa.field("accepts_marketing", pa.bool_())]
)


def encode_each(records: Sequence[Any]) -> list[bytes] | None:
    """Each record as compact JSON (``encode``); None if one is nested too deeply."""
    dumps = orjson.dumps
    try:
        return [dumps(record) for record in records]
    except orjson.JSONEncodeError:
        try:
            return [encode(record) for record in records]
        except orjson.JSONEncodeError:
            return None


def records_to_batch(
    records: Sequence[Any], encoded: Sequence[bytes] | None = None
) -> pa.RecordBatch:
    """Flatten decoded client records into one ``RAW_SCHEMA`` batch, keeping every value.

    ``encoded``: the records' ``encode_each``, if made already.
    """
    if all(isinstance(record, dict) for record in records):
        try:
            return _typed_batch(records, encoded)
        except (pa.ArrowTypeError, pa.ArrowInvalid, orjson.JSONEncodeError):
            pass
    return _general_batch(records)


def _typed_batch(
    records: Sequence[dict[str, Any]], encoded: Sequence[bytes] | None
) -> pa.RecordBatch:
    typed = pa.array(records, type=_TYPED)
    columns = {name: typed.field(name) for name in _TEXT_FIELDS}
    columns["accepts_marketing"] = pc.cast(typed.field("accepts_marketing"), pa.string())
    dumps = orjson.dumps
    custom = [record.get("custom_fields") for record in records]
    columns["custom_fields"] = pa.array(
        [value if value is None or isinstance(value, str) else dumps(value).decode()
         for value in custom],
        pa.string(),
    )  # fmt: skip
    known = _KNOWN.issuperset
    unknown = [None if known(record) else _unknown(record) for record in records]
    columns["unknown_fields"] = pa.array(unknown, pa.string())
    # As bytes, checked as UTF-8 by Arrow: a third faster than decoding each into a str first.
    if encoded is None:
        encoded = [dumps(record) for record in records]  # (a key that is not text fails here)
    columns["record"] = pa.array(encoded, pa.binary()).cast(pa.string())
    return pa.RecordBatch.from_arrays(
        [columns[name] for name in RAW_SCHEMA.names], schema=RAW_SCHEMA
    )


def _unknown(record: Mapping[str, Any]) -> str | None:
    if _KNOWN.issuperset(record):
        return None
    extra = {key: item for key, item in record.items() if key not in _KNOWN}
    return encode(extra).decode()


def _general_batch(records: Iterable[Any]) -> pa.RecordBatch:
    columns: dict[str, list[str | None]] = {name: [] for name in RAW_SCHEMA.names}
    field_columns = [(name, columns[name]) for name in CLIENT_FIELDS]
    unknown_column = columns["unknown_fields"]
    record_column = columns["record"]
    for record in records:
        if not isinstance(record, Mapping):
            # A non-object in `data` is kept verbatim so that validation can reject it visibly.
            for _, column in field_columns:
                column.append(None)
            unknown_column.append(None)
            record_column.append(_dumps(record))
            continue
        for name, column in field_columns:
            column.append(_as_text(record.get(name)))
        unknown = {key: value for key, value in record.items() if key not in _KNOWN}
        unknown_column.append(_record_text(unknown) if unknown else None)
        record_column.append(_record_text(record))
    return pa.RecordBatch.from_pydict(columns, schema=RAW_SCHEMA)


def empty_table(schema: pa.Schema) -> pa.Table:
    """An empty table of ``schema``, for partitions with no rows."""
    return schema.empty_table()
