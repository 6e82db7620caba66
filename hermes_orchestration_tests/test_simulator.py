"""The bundled Hermes simulator follows the Clients API contract, over real HTTP on loopback.

Every test talks to the simulator with plain httpx (or http.client), never with the project's own
client, so these tests pin down the contract itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta, timezone
from http.client import HTTPConnection
from itertools import pairwise
from typing import Any

import httpx
import orjson
import phonenumbers
import pytest
from email_validator import EmailNotValidError, validate_email
from stdnum.cl import rut

from hermes_orchestration import simulator_data as kinds
from hermes_orchestration.simulator import (
    DROPPED,
    ClientDataset,
    Faults,
    HermesSimulator,
    SimulatorConfig,
    add_cli_arguments,
    config_from_args,
)

START = datetime(2024, 5, 1, tzinfo=UTC)
END = START + timedelta(days=7)
READER = "reader-token"
OTHER_READER = "other-reader-token"
ORDERS_ONLY = "orders-only-token"
TOKENS = {READER: ("clients:read",), OTHER_READER: ("clients:read",), ORDERS_ONLY: ("orders:read",)}
CONTRACT_FIELDS = frozenset(
    {
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
    }
)


def make_config(**overrides: Any) -> SimulatorConfig:
    settings: dict[str, Any] = {"clients": 400, "start": START, "end": END, "tokens": TOKENS}
    settings.update(overrides)
    return SimulatorConfig(**settings)


def window(since: datetime = START, until: datetime = END, **extra: Any) -> dict[str, Any]:
    return {"updated_since": since.isoformat(), "updated_until": until.isoformat(), **extra}


def instant(text: str) -> datetime:
    return datetime.fromisoformat(text)


def list_all(client: httpx.Client, params: dict[str, Any]) -> tuple[list[dict[str, Any]], int]:
    """Page through a window the way a consumer must; returns the rows and the number of pages."""
    rows: list[dict[str, Any]] = []
    pages = 0
    cursor = None
    while True:
        response = client.get("/clients", params={**params, "cursor": cursor} if cursor else params)
        assert response.status_code == 200, response.text
        page = response.json()
        rows.extend(page["data"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return rows, pages


@pytest.fixture(scope="module")
def simulator() -> Iterator[HermesSimulator]:
    with HermesSimulator(make_config()) as running:
        yield running


@pytest.fixture
def api(simulator: HermesSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=simulator.api_url, headers={"Authorization": f"Bearer {READER}"}, timeout=10
    ) as client:
        yield client


@pytest.fixture
def faulty() -> Iterator[HermesSimulator]:
    """A small simulator of its own, for tests that switch faults on."""
    with HermesSimulator(make_config(clients=120)) as running:
        yield running


def client_for(simulator: HermesSimulator, token: str = READER) -> httpx.Client:
    return httpx.Client(
        base_url=simulator.api_url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )


def error_of(response: httpx.Response) -> dict[str, str]:
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"code", "message"}, body
    return body["error"]


# ---------------------------------------------------------------------------------------------
# Authentication and scopes


def test_verify_names_the_site_and_lists_the_token_scopes(
    simulator: HermesSimulator, api: httpx.Client
) -> None:
    response = api.get("/verify")

    assert response.status_code == 200
    assert response.json() == {
        "site": {"name": "Tienda Demo", "url": simulator.url, "timezone": "America/Santiago"},
        "token": {"scopes": ["clients:read"], "expires_at": None},
    }


def test_a_token_without_clients_read_is_verified_but_cannot_list_clients(
    simulator: HermesSimulator,
) -> None:
    with client_for(simulator, ORDERS_ONLY) as client:
        verified = client.get("/verify")
        listed = client.get("/clients", params=window())

    assert verified.status_code == 200
    assert verified.json()["token"]["scopes"] == ["orders:read"]
    assert listed.status_code == 403
    assert error_of(listed)["code"] == "insufficient_scope"
    assert "clients:read" in error_of(listed)["message"]


@pytest.mark.parametrize(
    ("authorization", "message"),
    [
        (None, "missing Authorization header"),
        (READER, "malformed Authorization header"),
        (f"Basic {READER}", "malformed Authorization header"),
        ("Bearer", "malformed Authorization header"),
        (f"Bearer {READER} extra", "malformed Authorization header"),
        ("Bearer not-a-token-of-this-site", "not valid for this site"),
    ],
)
@pytest.mark.parametrize("path", ["/verify", "/clients"])
def test_a_missing_malformed_or_unknown_token_gets_401_invalid_token(
    simulator: HermesSimulator, path: str, authorization: str | None, message: str
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}

    response = httpx.get(f"{simulator.api_url}{path}", params=window(), headers=headers)

    assert response.status_code == 401
    assert error_of(response)["code"] == "invalid_token"
    assert message in error_of(response)["message"]
    assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'


def test_the_bearer_scheme_is_case_insensitive(simulator: HermesSimulator) -> None:
    response = httpx.get(
        f"{simulator.api_url}/verify", headers={"Authorization": f"bearer {READER}"}
    )

    assert response.status_code == 200


def test_unknown_paths_and_methods_get_json_errors(
    simulator: HermesSimulator, api: httpx.Client
) -> None:
    missing = api.get("/customers")
    posted = api.post("/clients", json={})

    assert missing.status_code == 404
    assert error_of(missing)["code"] == "not_found"
    assert posted.status_code == 405
    assert error_of(posted)["code"] == "method_not_allowed"
    assert posted.headers["Allow"] == "GET"


# ---------------------------------------------------------------------------------------------
# Paging


@pytest.mark.parametrize("limit", [1, 7, 100, 1000])
def test_paging_covers_the_window_exactly_in_order(
    simulator: HermesSimulator, api: httpx.Client, limit: int
) -> None:
    expected = simulator.dataset.window(START, END)

    rows, pages = list_all(api, window(limit=limit))

    assert rows == expected
    assert pages == max(1, math.ceil(len(expected) / limit))


def test_every_page_but_the_last_is_full_and_only_the_last_has_no_cursor(
    api: httpx.Client,
) -> None:
    first = api.get("/clients", params=window(limit=150)).json()
    second = api.get("/clients", params=window(limit=150, cursor=first["next_cursor"])).json()

    assert len(first["data"]) == 150 and first["next_cursor"] is not None
    assert len(second["data"]) == 150 and second["next_cursor"] is not None


def test_a_full_last_page_has_no_cursor(simulator: HermesSimulator, api: httpx.Client) -> None:
    listing = simulator.dataset.window(START, END)
    # A window of exactly 60 versions, bounded by the instant of the 61st.
    until = instant(listing[60]["updated_at"])
    assert instant(listing[59]["updated_at"]) < until

    first = api.get("/clients", params=window(until=until, limit=30)).json()
    last = api.get("/clients", params=window(until=until, limit=30, cursor=first["next_cursor"]))

    assert len(first["data"]) == 30
    assert last.json() == {"data": listing[30:60], "next_cursor": None}


def test_the_default_page_size_is_100(api: httpx.Client) -> None:
    page = api.get("/clients", params=window()).json()

    assert len(page["data"]) == 100
    assert page["next_cursor"] is not None


def test_a_window_with_no_clients_is_one_empty_page(api: httpx.Client) -> None:
    response = api.get("/clients", params=window(START - timedelta(days=30), START))

    assert response.json() == {"data": [], "next_cursor": None}


def test_the_window_includes_its_start_and_excludes_its_end_as_instants(
    simulator: HermesSimulator, api: httpx.Client
) -> None:
    listing = simulator.dataset.window(START, END)
    first, last = listing[10], listing[20]
    assert instant(listing[9]["updated_at"]) < instant(first["updated_at"])
    # The same instants written at another offset than the records use.
    since = instant(first["updated_at"]).astimezone(timezone(timedelta(hours=5, minutes=30)))
    until = instant(last["updated_at"]).astimezone(UTC)

    rows, _ = list_all(api, window(since, until, limit=1000))

    assert rows == listing[10:20]


def test_records_are_ordered_by_instant_then_id_whatever_their_offset_and_precision(
    simulator: HermesSimulator, api: httpx.Client
) -> None:
    rows, _ = list_all(api, window(limit=1000))

    keys = [(instant(row["updated_at"]), row["id"]) for row in rows]
    assert keys == sorted(keys)
    stamps = [row["updated_at"] for row in rows]
    assert {stamp[-1] == "Z" or stamp[-6:] for stamp in stamps} >= {True, "-03:00", "-04:00"}
    assert {
        len(stamp.split(".")[1].rstrip("Z").split("-")[0]) for stamp in stamps if "." in stamp
    } == {3, 6}
    assert any("." not in stamp for stamp in stamps)
    # Text order disagrees with instant order somewhere, so sorting by text would be wrong.
    assert any(a > b for a, b in pairwise(stamps))


# ---------------------------------------------------------------------------------------------
# Cursors and parameters


@pytest.mark.parametrize(
    "changed",
    [
        {"limit": 51},
        {"updated_since": (START + timedelta(seconds=1)).isoformat()},
        {"updated_until": (END - timedelta(seconds=1)).isoformat()},
    ],
)
def test_a_cursor_needs_the_other_parameters_unchanged(
    api: httpx.Client, changed: dict[str, Any]
) -> None:
    params = window(limit=50)
    cursor = api.get("/clients", params=params).json()["next_cursor"]

    response = api.get("/clients", params={**params, **changed, "cursor": cursor})

    assert response.status_code == 400
    assert error_of(response)["code"] == "bad_request"
    assert (
        "repeat updated_since, updated_until and limit unchanged" in error_of(response)["message"]
    )


def test_a_cursor_accepts_the_same_bounds_written_at_another_offset(api: httpx.Client) -> None:
    cursor = api.get("/clients", params=window(limit=50)).json()["next_cursor"]
    santiago = timezone(timedelta(hours=-4))

    response = api.get(
        "/clients",
        params=window(
            START.astimezone(santiago), END.astimezone(santiago), limit=50, cursor=cursor
        ),
    )

    assert response.status_code == 200


def tampered(cursor: str) -> str:
    flipped = "A" if cursor[5] != "A" else "B"
    return cursor[:5] + flipped + cursor[6:]


@pytest.mark.parametrize("mangle", [lambda c: "nonsense", lambda c: "", tampered, lambda c: c[:-3]])
def test_an_unknown_or_garbled_cursor_is_a_bad_request(api: httpx.Client, mangle: Any) -> None:
    params = window(limit=50)
    cursor = api.get("/clients", params=params).json()["next_cursor"]

    response = api.get("/clients", params={**params, "cursor": mangle(cursor)})

    assert response.status_code == 400
    assert error_of(response)["code"] == "bad_request"
    assert "cursor is unknown or garbled" in error_of(response)["message"]


def test_an_expired_cursor_is_a_bad_request(faulty: HermesSimulator) -> None:
    faulty.set_faults(Faults(cursor_ttl_seconds=0.3))
    params = window(limit=10)
    with client_for(faulty) as client:
        fresh = client.get("/clients", params=params).json()["next_cursor"]
        assert client.get("/clients", params={**params, "cursor": fresh}).status_code == 200
        time.sleep(0.4)
        expired = client.get("/clients", params={**params, "cursor": fresh})

    assert expired.status_code == 400
    assert error_of(expired)["code"] == "bad_request"
    assert "cursor expired" in error_of(expired)["message"]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("updated_until=2024-05-08T00:00:00Z", "updated_since is required"),
        ("updated_since=2024-05-01T00:00:00Z", "updated_until is required"),
        (
            "updated_since=2024-05-01T00:00:00&updated_until=2024-05-08T00:00:00Z",
            "has no UTC offset",
        ),
        ("updated_since=yesterday&updated_until=2024-05-08T00:00:00Z", "not an RFC 3339"),
        ("updated_since=2024-05-01&updated_until=2024-05-08T00:00:00Z", "not an RFC 3339"),
        (
            "updated_since=2024-02-30T00:00:00Z&updated_until=2024-05-08T00:00:00Z",
            "not a valid date",
        ),
        (
            "updated_since=2024-05-01T00:00:00+00:00&updated_until=2024-05-08T00:00:00Z",
            "must be percent-encoded as %2B",
        ),
        (
            "updated_since=2024-05-08T00:00:00Z&updated_until=2024-05-01T00:00:00Z",
            "the window is empty or reversed",
        ),
        (
            "updated_since=2024-05-01T00:00:00Z&updated_until=2024-04-30T21:00:00-03:00",
            "the window is empty or reversed",
        ),
        ("limit=0", "limit must be a whole number from 1 to 1000"),
        ("limit=1001", "limit must be a whole number from 1 to 1000"),
        ("limit=ten", "limit must be a whole number from 1 to 1000"),
        ("limit=1.5", "limit must be a whole number from 1 to 1000"),
        ("limit=-1", "limit must be a whole number from 1 to 1000"),
        ("limit=10&limit=20", "limit is given 2 times"),
    ],
)
def test_bad_parameters_are_a_bad_request_that_says_what_is_wrong(
    simulator: HermesSimulator, query: str, message: str
) -> None:
    if "updated_since" not in query and "updated_until" not in query:
        query += "&updated_since=2024-05-01T00:00:00Z&updated_until=2024-05-08T00:00:00Z"
    url = f"{simulator.api_url}/clients?{query}"

    response = httpx.get(url, headers={"Authorization": f"Bearer {READER}"})

    assert response.status_code == 400
    assert error_of(response)["code"] == "bad_request"
    assert message in error_of(response)["message"]


# ---------------------------------------------------------------------------------------------
# The dataset


def raw_data(simulator: HermesSimulator) -> bytes:
    response = httpx.get(
        f"{simulator.api_url}/clients",
        params=window(limit=1000),
        headers={"Authorization": f"Bearer {READER}"},
    )
    return response.content.partition(b',"next_cursor":')[0]


def test_the_same_seed_gives_the_same_bytes_and_another_seed_other_ones() -> None:
    config = make_config(clients=300)
    with HermesSimulator(config) as one, HermesSimulator(config) as two:
        same_one, same_two = raw_data(one), raw_data(two)
    with HermesSimulator(make_config(clients=300, seed=8)) as other:
        different = raw_data(other)

    assert same_one == same_two
    assert len(same_one) > 100_000
    assert different != same_one


def test_updated_at_lies_in_the_configured_range(simulator: HermesSimulator) -> None:
    listing = simulator.dataset.window(START - timedelta(days=3650), END + timedelta(days=3650))

    assert len(listing) == len(simulator.dataset)
    assert all(START <= instant(row["updated_at"]) < END for row in listing)
    assert simulator.dataset.count(START, END) == len(simulator.dataset)


def email_is_valid(value: str) -> bool:
    try:
        validate_email(value, check_deliverability=False)
    except EmailNotValidError:
        return False
    return True


def phone_is_valid(value: str, country: str) -> bool:
    try:
        number = phonenumbers.parse(value, country if len(country) == 2 else "CL")
    except phonenumbers.NumberParseException:
        return False
    return phonenumbers.is_valid_number(number)


def birth_date_of(value: str) -> date | None:
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


# What each kind of dirt looks like in (all versions of) one client.
DIRT_CHECKS = {
    kinds.INVALID_EMAIL: lambda v: v[-1]["email"] and not email_is_valid(v[-1]["email"].strip()),
    kinds.MISSING_EMAIL: lambda v: v[-1]["email"] in (None, ""),
    kinds.UNNORMALIZED_EMAIL: lambda v: (
        v[-1]["email"] != v[-1]["email"].strip().lower()
        and email_is_valid(v[-1]["email"].strip().lower())
    ),
    kinds.BAD_RUT_CHECK_DIGIT: lambda v: (
        v[-1]["document_type"] == "RUT" and not rut.is_valid(v[-1]["document_number"])
    ),
    kinds.DUPLICATE: lambda v: (
        len(v) == 2 and instant(v[0]["updated_at"]) < instant(v[1]["updated_at"])
    ),
    kinds.CHANGED_EMAIL: lambda v: v[0]["email"] != v[-1]["email"],
    kinds.TOMBSTONE: lambda v: v[-1]["deleted_at"] == v[-1]["updated_at"],
    kinds.TOMBSTONE_WITHOUT_EMAIL: lambda v: v[-1]["deleted_at"] and v[-1]["email"] is None,
    kinds.UNKNOWN_PROPERTY: lambda v: set(v[-1]) > CONTRACT_FIELDS,
    kinds.GARBAGE_PHONE: lambda v: not phone_is_valid(v[-1]["phone"], v[-1]["country"]),
    kinds.FUTURE_BIRTH_DATE: lambda v: (
        (birth_date_of(v[-1]["birth_date"]) or date.min) > END.date()
    ),
    kinds.UNPARSEABLE_BIRTH_DATE: lambda v: birth_date_of(v[-1]["birth_date"]) is None,
    kinds.COUNTRY_NAME: lambda v: v[-1]["country"] in ("Chile", "Argentina", "Perú"),
    kinds.EMPTY_STRINGS: lambda v: "" in v[-1].values(),
}


def is_clean(versions: list[dict[str, Any]]) -> bool:
    (record,) = versions
    return (
        set(record) == CONTRACT_FIELDS
        and record["deleted_at"] is None
        and email_is_valid(record["email"])
        and record["email"] == record["email"].strip().lower()
        and (record["document_type"] != "RUT" or rut.is_valid(record["document_number"]))
        and (record["phone"] is None or phone_is_valid(record["phone"], record["country"]))
        and (record["birth_date"] is None or birth_date_of(record["birth_date"]) <= END.date())
        and record["country"] in ("CL", "AR", "PE")
        and "" not in record.values()
        and instant(record["created_at"]) <= instant(record["updated_at"])
    )


@pytest.fixture(scope="module")
def dirty_dataset() -> ClientDataset:
    return ClientDataset(make_config(clients=1500, dirty_share=0.3))


def versions_by_id(dataset: ClientDataset) -> dict[str, list[dict[str, Any]]]:
    by_id: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record in dataset.window(START, END):
        by_id[record["id"]].append(record)
    return by_id


@pytest.mark.parametrize("share", [0.0, 0.1, 0.5])
def test_the_dirty_share_is_as_configured(share: float) -> None:
    dataset = ClientDataset(make_config(clients=600, dirty_share=share))

    assert len(dataset.dirty) == round(600 * share)


def test_clean_clients_are_valid_and_unique(dirty_dataset: ClientDataset) -> None:
    clean = [
        v for cid, v in versions_by_id(dirty_dataset).items() if cid not in dirty_dataset.dirty
    ]

    assert len(clean) == 1500 - 450
    assert [v[0]["id"] for v in clean if not is_clean(v)] == []
    emails = [v[0]["email"] for v in clean]
    assert len(set(emails)) == len(emails)


def test_every_dirty_client_shows_each_of_its_kinds(dirty_dataset: ClientDataset) -> None:
    by_id = versions_by_id(dirty_dataset)
    seen: set[str] = set()
    for client_id, client_kinds in dirty_dataset.dirty.items():
        for kind in client_kinds:
            assert DIRT_CHECKS[kind](by_id[client_id]), (kind, by_id[client_id])
            seen.add(kind)

    assert seen == set(kinds.DIRTY_KINDS)


def test_clients_look_chilean(dirty_dataset: ClientDataset) -> None:
    latest = list(dirty_dataset.latest(START, END).values())
    countries = [row["country"] for row in latest]
    ruts = [row["document_number"] for row in latest if row["document_type"] == "RUT"]

    assert countries.count("CL") > 0.8 * len(latest)
    assert {"AR", "PE"} <= set(countries)
    assert any("." in number for number in ruts if number)
    assert any(number and "-" in number and "." not in number for number in ruts)
    assert any(number and number.isalnum() for number in ruts)
    assert {"Región Metropolitana", "Valparaíso", "Biobío"} <= {row["region"] for row in latest}
    phones = {row["phone"] for row in latest if row["phone"]}
    assert any(p.startswith("+56 9 ") for p in phones) and any(p.startswith("+569") for p in phones)
    assert any(len(p) == 9 and p.startswith("9") for p in phones)
    assert {True, False, None} == {row["accepts_marketing"] for row in latest}


# ---------------------------------------------------------------------------------------------
# Changing the dataset


def test_added_versions_are_served_in_listing_order(faulty: HermesSimulator) -> None:
    dataset = faulty.dataset
    before = dataset.window(START, END)
    target, other = [row for row in before if row["id"] not in dataset.dirty][5:7]
    changed = dict(target, email="nuevo.correo@gmail.com", updated_at="2024-05-07T19:00:00-04:00")
    deleted = dict(other, deleted_at="2024-05-07T23:30:00Z", updated_at="2024-05-07T23:30:00Z")
    # Same instant as an existing version but a smaller id: it goes before that version.
    tie = dict(before[20], id="00000001")

    dataset.add_records([changed, deleted, tie])
    with client_for(faulty) as client:
        rows, _ = list_all(client, window(limit=1000))

    assert len(dataset) == len(before) + 3
    assert rows == dataset.window(START, END)
    keys = [(instant(row["updated_at"]), row["id"]) for row in rows]
    assert keys == sorted(keys)
    assert rows.index(tie) == rows.index(before[20]) - 1
    assert dataset.latest(START, END)[target["id"]]["email"] == "nuevo.correo@gmail.com"
    assert dataset.latest(START, END)[other["id"]]["deleted_at"] == "2024-05-07T23:30:00Z"


def test_versions_added_while_a_window_is_paged_never_leave_a_gap(
    faulty: HermesSimulator,
) -> None:
    dataset = faulty.dataset
    original = dataset.window(START, END)
    # New versions of existing clients, spread over the window, added while it is listed.
    changes = [
        dict(row, accepts_marketing=True, updated_at=(START + timedelta(hours=i)).isoformat())
        for i, row in enumerate(original[::2])
    ]

    def add_slowly() -> None:
        for change in changes:
            dataset.add_records([change])
            time.sleep(0.001)

    writer = threading.Thread(target=add_slowly)
    with client_for(faulty) as client:
        writer.start()
        served, _ = list_all(client, window(limit=5))
    writer.join()

    served_keys = {(row["id"], row["updated_at"]) for row in served}
    final_keys = {(row["id"], row["updated_at"]) for row in dataset.window(START, END)}
    assert {(row["id"], row["updated_at"]) for row in original} <= served_keys <= final_keys


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"updated_at": "2024-05-01T00:00:00Z"}, "needs a non-empty string 'id'"),
        ({"id": "1"}, "needs a string 'updated_at'"),
        ({"id": "1", "updated_at": "2024-05-01T00:00:00"}, "has no UTC offset"),
        (
            {"id": "1", "updated_at": "2024-05-01T00:00:00Z", "x": {1, 2}},
            "record 0 \\(1\\): Type is not JSON serializable",
        ),
        ("not a record", "not a mapping"),
    ],
)
def test_add_records_rejects_records_it_cannot_list(record: Any, message: str) -> None:
    dataset = ClientDataset(make_config(clients=5))

    with pytest.raises(ValueError, match=message):
        dataset.add_records([record])
    assert len(dataset) == len(ClientDataset(make_config(clients=5)))


# ---------------------------------------------------------------------------------------------
# Faults


def test_error_rate_answers_about_that_share_with_5xx_some_not_json(
    faulty: HermesSimulator,
) -> None:
    faulty.set_faults(Faults(error_rate=0.5))
    with client_for(faulty) as client:
        responses = [client.get("/verify") for _ in range(300)]

    failed = [r for r in responses if r.status_code >= 500]
    assert 0.38 < len(failed) / len(responses) < 0.62
    assert {r.status_code for r in failed} == {500, 502, 503, 504}
    assert {r.status_code for r in responses} - {500, 502, 503, 504} == {200}
    assert any(r.content == b"" for r in failed)
    assert any(r.headers.get("Content-Type") == "text/html" for r in failed)
    assert any(error_of(r)["code"] == "unavailable" for r in failed if r.content.startswith(b"{"))


def test_retrying_5xx_answers_still_lists_the_window_exactly(faulty: HermesSimulator) -> None:
    faulty.set_faults(Faults(error_rate=0.3))
    rows: list[dict[str, Any]] = []
    params = window(limit=25)
    with client_for(faulty) as client:
        while True:
            response = client.get("/clients", params=params)
            if response.status_code >= 500:
                continue
            page = response.json()
            rows.extend(page["data"])
            if page["next_cursor"] is None:
                break
            params = {**params, "cursor": page["next_cursor"]}

    assert rows == faulty.dataset.window(START, END)
    assert faulty.stats.count(path="/api/v1/clients", status=200) < faulty.stats.count(
        path="/api/v1/clients"
    )


@pytest.mark.parametrize("retry_after", [0, 3])
def test_past_the_rate_limit_a_token_gets_429_with_retry_after(
    faulty: HermesSimulator, retry_after: int
) -> None:
    faulty.set_faults(Faults(rate_limit_per_second=5, retry_after_seconds=retry_after))
    with client_for(faulty) as client, client_for(faulty, OTHER_READER) as other:
        started = time.monotonic()
        burst = [client.get("/clients", params=window(limit=1)) for _ in range(20)]
        elapsed = time.monotonic() - started
        other_first = other.get("/verify")
        time.sleep(0.25)  # a fifth of a second earns the next request
        later = client.get("/verify")

    limited = [r for r in burst if r.status_code == 429]
    # A burst of five, then five a second.
    assert 20 - len(limited) <= 5 + math.ceil(5 * elapsed)
    assert len(limited) >= 1
    assert all(r.headers["Retry-After"] == str(retry_after) for r in limited)
    assert {error_of(r)["code"] for r in limited} == {"rate_limited"}
    assert burst[0].status_code == 200
    assert other_first.status_code == 200
    assert later.status_code == 200
    assert faulty.stats.count(path="/api/v1/clients", status=429) == len(limited)


def test_a_dropped_request_closes_the_connection_without_an_answer(
    faulty: HermesSimulator,
) -> None:
    faulty.set_faults(Faults(drop_rate=1.0))
    with client_for(faulty) as client:
        with pytest.raises(httpx.RemoteProtocolError):
            client.get("/verify")
        faulty.set_faults(Faults())
        recovered = client.get("/verify")

    assert recovered.status_code == 200
    assert faulty.stats.count(path="/api/v1/verify", status=DROPPED) == 1


def test_a_truncated_page_is_well_framed_but_malformed_json(faulty: HermesSimulator) -> None:
    faulty.set_faults(Faults(truncated_rate=1.0))
    with client_for(faulty) as client:
        page = client.get("/clients", params=window())
        verified = client.get("/verify")

    assert page.status_code == 200
    assert int(page.headers["Content-Length"]) == len(page.content)
    with pytest.raises(json.JSONDecodeError):
        json.loads(page.content)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(page.content)
    assert verified.json()["token"]["scopes"] == ["clients:read"]


def test_latency_delays_every_answer(faulty: HermesSimulator) -> None:
    faulty.set_faults(Faults(latency_seconds=0.2))
    with client_for(faulty) as client:
        answered = client.get("/verify")
        rejected = client.get("/clients", params={"limit": "0"})

    assert answered.elapsed >= timedelta(seconds=0.2)
    assert rejected.elapsed >= timedelta(seconds=0.2)


def test_set_faults_takes_only_faults(faulty: HermesSimulator) -> None:
    with pytest.raises(TypeError, match="set_faults takes a Faults"):
        faulty.set_faults({"error_rate": 1.0})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# HTTP behaviour


def test_every_answer_carries_a_unique_request_id(faulty: HermesSimulator) -> None:
    responses = []
    with client_for(faulty) as client, client_for(faulty, ORDERS_ONLY) as orders:
        responses += [client.get("/verify"), client.get("/clients", params=window())]
        responses += [client.get("/clients"), client.get("/nothing"), client.post("/verify")]
        responses += [orders.get("/clients", params=window())]
        responses += [httpx.get(f"{faulty.api_url}/verify")]
        faulty.set_faults(Faults(rate_limit_per_second=1, retry_after_seconds=1))
        responses += [client.get("/verify"), client.get("/verify")]
        faulty.set_faults(Faults(error_rate=1.0))
        responses += [client.get("/verify") for _ in range(30)]

    assert {200, 400, 401, 403, 404, 405, 429, 500, 502, 503, 504} <= {
        r.status_code for r in responses
    }
    ids = [r.headers["X-Request-Id"] for r in responses]
    assert len(set(ids)) == len(ids)
    assert all(r.headers["Content-Length"] == str(len(r.content)) for r in responses)


def test_a_malformed_request_gets_a_json_error_with_a_request_id(
    simulator: HermesSimulator,
) -> None:
    host, port = simulator.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(b"GET /api/v1/verify BAD/1.1\r\n\r\n")
        answer = b""
        while chunk := raw.recv(65536):
            answer += chunk

    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ")
    assert b"X-Request-Id: " in head
    assert orjson.loads(body)["error"]["code"] == "bad_request"


def test_a_connection_is_kept_alive_across_requests(simulator: HermesSimulator) -> None:
    host, port = simulator.url.removeprefix("http://").split(":")
    connection = HTTPConnection(host, int(port), timeout=5)
    headers = {"Authorization": f"Bearer {READER}"}
    try:
        connection.request("GET", "/api/v1/verify", headers=headers)
        connection.getresponse().read()
        first_socket = connection.sock
        for path in ("/api/v1/verify", "/api/v1/nothing", "/api/v1/clients?limit=0"):
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            response.read()
            assert response.version == 11
            assert response.getheader("Connection") != "close"
        assert connection.sock is first_socket
    finally:
        connection.close()


def test_stop_closes_idle_connections_and_frees_the_port() -> None:
    running = HermesSimulator(make_config(clients=10)).start()
    client = client_for(running)
    assert client.get("/verify").status_code == 200  # leaves a keep-alive connection open

    started = time.monotonic()
    running.stop()
    running.stop()  # idempotent

    assert time.monotonic() - started < 2
    with pytest.raises(httpx.TransportError):
        client.get("/verify")
    client.close()


def test_stats_count_requests_by_path_and_status(faulty: HermesSimulator) -> None:
    faulty.stats.reset()
    with client_for(faulty) as client:
        client.get("/verify")
        client.get("/verify")
        client.get("/clients")

    assert faulty.stats.count(path="/api/v1/verify", status=200) == 2
    assert faulty.stats.count(status=400) == 1
    assert faulty.stats.total == 3
    assert faulty.stats.snapshot() == {("/api/v1/verify", 200): 2, ("/api/v1/clients", 400): 1}


def test_serve_forever_stops_cleanly_on_sigterm() -> None:
    running = HermesSimulator(make_config(clients=10))

    def terminate_once_serving() -> None:
        for _ in range(100):
            try:
                httpx.get(f"{running.api_url}/verify", timeout=1)
                break
            except httpx.TransportError:
                time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=terminate_once_serving, daemon=True).start()
    running.serve_forever()

    assert signal.getsignal(signal.SIGTERM) is before
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{running.api_url}/verify", timeout=1)


# ---------------------------------------------------------------------------------------------
# Configuration and command line


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: Faults(error_rate=1.5), "error_rate must be a share from 0 to 1"),
        (lambda: Faults(drop_rate=-0.1), "drop_rate must be a share"),
        (lambda: Faults(rate_limit_per_second=0), "rate_limit_per_second must be positive"),
        (lambda: Faults(retry_after_seconds=-1), "retry_after_seconds must be >= 0"),
        (lambda: Faults(retry_after_seconds=1.5), "retry_after_seconds must be a whole number"),
        (lambda: Faults(latency_seconds=-1), "latency_seconds must be >= 0"),
        (lambda: Faults(cursor_ttl_seconds=0), "cursor_ttl_seconds must be positive"),
        (lambda: SimulatorConfig(clients=-1), "clients must be a whole number >= 0"),
        (lambda: SimulatorConfig(dirty_share=2), "dirty_share must be a share"),
        (lambda: SimulatorConfig(start=datetime(2024, 5, 1)), "start 2024-05-01T00:00:00 has no"),
        (lambda: SimulatorConfig(start=END, end=START), "must be before end"),
        (lambda: SimulatorConfig(timezone="Mars/Olympus"), "not an IANA time zone"),
        (lambda: SimulatorConfig(tokens={"": ("clients:read",)}), "non-empty string"),
        (lambda: SimulatorConfig(tokens={"t": "clients:read"}), "tuple of strings"),
    ],
)
def test_invalid_settings_are_refused_with_a_clear_message(build: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build()


def test_the_default_range_is_the_seven_days_before_this_minute() -> None:
    config = SimulatorConfig(clients=0)

    assert config.end is not None and config.start is not None
    assert config.end.second == config.end.microsecond == 0
    assert timedelta(0) <= datetime.now(UTC) - config.end < timedelta(minutes=1)
    assert config.end - config.start == timedelta(days=7)
    assert dict(config.tokens) == {"demo-token": ("clients:read",)}


def test_token_values_stay_out_of_reprs() -> None:
    config = make_config(clients=3)
    running = HermesSimulator(config)
    try:
        shown = repr(config) + repr(running) + str(config)
    finally:
        running.stop()

    assert all(token not in shown for token in TOKENS)


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cli_arguments(parser)
    return parser.parse_args(argv)


def test_the_command_line_builds_the_config() -> None:
    args = parse(
        [
            *("--port", "0", "--clients", "10", "--seed", "3", "--dirty-share", "0.2"),
            *("--token", "a", "--token", "b", "--token-without-scope", "c"),
            *("--start", "2024-05-01T00:00:00Z", "--end", "2024-05-02T00:00:00-04:00"),
            *("--error-rate", "0.1", "--rate-limit", "5", "--retry-after", "0"),
            *("--latency", "0.01", "--drop-rate", "0.01", "--truncated-rate", "0.02"),
            *("--cursor-ttl", "30"),
        ]
    )

    config, host, port = config_from_args(args)

    assert (host, port) == ("127.0.0.1", 0)
    assert (config.clients, config.seed, config.dirty_share) == (10, 3, 0.2)
    assert dict(config.tokens) == {
        "a": ("clients:read",),
        "b": ("clients:read",),
        "c": ("orders:read",),
    }
    assert config.start == START
    assert config.end == datetime(2024, 5, 2, 4, tzinfo=UTC)
    assert config.faults == Faults(
        error_rate=0.1,
        rate_limit_per_second=5,
        retry_after_seconds=0,
        latency_seconds=0.01,
        drop_rate=0.01,
        truncated_rate=0.02,
        cursor_ttl_seconds=30,
    )


def test_the_command_line_defaults_to_the_demo_token() -> None:
    config, host, port = config_from_args(parse([]))

    assert dict(config.tokens) == {"demo-token": ("clients:read",)}
    assert config.faults == Faults()
    assert (host, port, config.clients, config.seed) == ("127.0.0.1", 8765, 1000, 7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--error-rate", "2"], "out of range"),
        (["--clients", "many"], "is not a whole number"),
        (["--start", "2024-05-01T00:00:00"], "has no UTC offset"),
        (["--rate-limit", "0"], "must be greater than 0"),
    ],
)
def test_bad_command_line_values_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(argv)

    assert message in capsys.readouterr().err


def test_contradicting_command_line_options_are_refused() -> None:
    with pytest.raises(ValueError, match="both with --token and --token-without-scope"):
        config_from_args(parse(["--token", "x", "--token-without-scope", "x"]))
    with pytest.raises(ValueError, match="must be before end"):
        config_from_args(
            parse(["--start", "2024-05-02T00:00:00Z", "--end", "2024-05-01T00:00:00Z"])
        )
