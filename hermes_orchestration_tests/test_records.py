"""Pages of client records become RAW_SCHEMA batches that keep every value verbatim."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes_orchestration.records import (
    CLIENT_FIELDS,
    RAW_SCHEMA,
    _general_batch,
    encode_each,
    records_to_batch,
)

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
field_values = st.one_of(st.text(), st.none(), json_values)
records = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={name: field_values for name in CLIENT_FIELDS}
        | {"loyalty_tier": json_values, "tags": json_values},
    ),
    json_values,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(records, max_size=6))
def test_the_fast_path_gives_exactly_what_the_general_path_gives(page: list) -> None:
    assert records_to_batch(page).equals(_general_batch(page))
    # Also from the encodings a fetch makes for the page's digest.
    assert records_to_batch(page, encode_each(page)).equals(_general_batch(page))


def test_values_of_the_wrong_type_are_kept_as_their_json_text() -> None:
    batch = records_to_batch(
        [
            {
                "id": 12,
                "updated_at": "2026-11-02T10:00:00-03:00",
                "accepts_marketing": "yes",
                "custom_fields": {"puntos": 10},
                "nivel": "oro",
            }
        ]
    ).to_pylist()[0]
    assert batch["id"] == "12"
    assert batch["accepts_marketing"] == "yes"
    assert batch["custom_fields"] == '{"puntos":10}'
    assert orjson.loads(batch["unknown_fields"]) == {"nivel": "oro"}
    assert orjson.loads(batch["record"])["id"] == 12


def test_a_page_of_clean_records_keeps_contract_types_as_text() -> None:
    batch = records_to_batch(
        [
            {
                "id": "1",
                "updated_at": "2026-11-02T10:00:00Z",
                "email": "a@b.cl",
                "accepts_marketing": False,
            }
        ]
    )
    assert batch.schema == RAW_SCHEMA
    row = batch.to_pylist()[0]
    assert row["accepts_marketing"] == "false"
    assert row["unknown_fields"] is None and row["custom_fields"] is None
