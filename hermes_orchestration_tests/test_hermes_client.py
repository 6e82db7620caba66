"""The Hermes HTTP client, over real loopback HTTP.

Most tests talk to the bundled simulator. A few contract breaches the simulator never commits
(a body of the wrong shape, a redirect, a 404) are played by ``ScriptedSite``, a tiny HTTP server
that answers a fixed script.
"""

from __future__ import annotations

import http.server
import logging
import pickle
import re
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson
import pytest

from hermes_orchestration.hermes_client import (
    SEND_AHEAD_AFTER_SECONDS,
    AuthError,
    ClientPage,
    CursorExpiredError,
    HermesClient,
    HermesError,
    MissingTokenError,
    ProtocolError,
    RetryPolicy,
    ScopeError,
    TLSError,
    TransientExhaustedError,
    UnreachableError,
)
from hermes_orchestration.simulator import Faults, HermesSimulator, SimulatorConfig

# Distinctive values, so that a leak is found by scanning for them.
TOKEN = "tok-Quetzal-5f1c2e9a7b3d"
NO_SCOPE_TOKEN = "tok-OrdersOnly-83d1c4"
REVOKED_TOKEN = "tok-Revoked-0b9e77aa"
TOKEN_ENV = "HERMES_TOKEN_TIENDA_DEMO"
SECRETS = (TOKEN, NO_SCOPE_TOKEN, REVOKED_TOKEN)

# Fast, generous retries for tests whose waits are injected.
PATIENT = RetryPolicy(max_attempts=12, base_delay=0.01, max_delay=0.05, timeout=5.0)


class FakeSleep:
    """Records the waits the client asks for instead of waiting; ``then`` runs after each."""

    def __init__(self, then: Callable[[float], None] | None = None) -> None:
        self.waits: list[float] = []
        self._then = then

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        if self._then is not None:
            self._then(seconds)


@pytest.fixture(scope="module")
def sim() -> Iterator[HermesSimulator]:
    config = SimulatorConfig(
        clients=1000,
        seed=7,
        tokens={TOKEN: ("clients:read",), NO_SCOPE_TOKEN: ("orders:read",)},
    )
    with HermesSimulator(config).start() as running:
        yield running


@pytest.fixture(autouse=True)
def calm_site(sim: HermesSimulator) -> Iterator[None]:
    sim.set_faults(Faults())
    yield
    sim.set_faults(Faults())


@pytest.fixture
def connect(sim: HermesSimulator) -> Iterator[Callable[..., HermesClient]]:
    """Open clients towards the simulator (unthrottled unless asked); all closed afterwards."""
    opened: list[HermesClient] = []

    def open_client(**kwargs: Any) -> HermesClient:
        kwargs.setdefault("token_env", TOKEN_ENV)
        kwargs.setdefault("max_requests_per_second", None)
        client = HermesClient(kwargs.pop("site_url", sim.url), kwargs.pop("token", TOKEN), **kwargs)
        opened.append(client)
        return client

    yield open_client
    for client in opened:
        client.close()


def read_window(client: HermesClient, since: datetime, until: datetime) -> list[ClientPage]:
    return list(client.iter_pages(since, until))


def first_days(sim: HermesSimulator, days: int) -> tuple[datetime, datetime]:
    return sim.dataset.start, sim.dataset.start + timedelta(days=days)


def whole(sim: HermesSimulator) -> tuple[datetime, datetime]:
    return sim.dataset.start, sim.dataset.end


def records_of(pages: list[ClientPage]) -> list[Any]:
    return [record for page in pages for record in page.records]


def settled(read: Callable[[], int], expected: int) -> int:
    """``read()`` once it reaches ``expected``, or after 2 s.

    The simulator counts an answer just after sending it, so a count can trail the client by a
    moment.
    """
    deadline = time.monotonic() + 2.0
    while (value := read()) < expected and time.monotonic() < deadline:
        time.sleep(0.01)
    return value


def server_errors(sim: HermesSimulator) -> int:
    return sum(sim.stats.count(path="/api/v1/clients", status=s) for s in (500, 502, 503, 504))


def retry_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and "retrying" in r.getMessage()
    ]


# --- Paging -------------------------------------------------------------------------------


@pytest.mark.parametrize(("page_size", "days"), [(1, 3), (7, 10), (1000, None)])
def test_pages_return_exactly_the_window_in_order(
    sim: HermesSimulator, connect: Callable[..., HermesClient], page_size: int, days: int | None
) -> None:
    since, until = whole(sim) if days is None else first_days(sim, days)
    expected = sim.dataset.window(since, until)
    assert expected, "the window should hold clients"

    pages = read_window(connect(page_size=page_size), since, until)

    assert records_of(pages) == expected
    assert [page.number for page in pages] == list(range(1, len(pages) + 1))
    assert all(len(page.records) <= page_size for page in pages)
    assert [page.next_cursor is None for page in pages] == [False] * (len(pages) - 1) + [True]
    assert all(page.request_id for page in pages)


def test_a_site_slow_to_answer_is_asked_for_the_next_page_while_the_caller_works_on_one(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    sim.set_faults(Faults(latency_seconds=SEND_AHEAD_AFTER_SECONDS * 5))  # a site far away

    def answered() -> int:
        return sim.stats.count(path="/api/v1/clients", status=200)

    before = answered()
    pages = connect(page_size=10).iter_pages(*whole(sim))

    first = next(pages)
    # The site is asked for page 2 with page 1's cursor before the caller asks for page 2, and
    # for nothing further.
    assert first.next_cursor is not None
    assert settled(answered, before + 2) == before + 2
    time.sleep(0.1)
    assert answered() == before + 2
    second = next(pages)
    assert second.number == 2 and second.records == sim.dataset.window(*whole(sim))[10:20]
    # A caller that stops early leaves at most the one request sent ahead.
    pages.close()
    time.sleep(0.1)
    assert answered() <= before + 3


def test_a_site_that_answers_at_once_is_asked_page_after_page(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    def answered() -> int:
        return sim.stats.count(path="/api/v1/clients", status=200)

    before = answered()
    pages = connect(page_size=10).iter_pages(*whole(sim))

    next(pages)
    time.sleep(0.2)

    # The simulator on this machine answers in a few milliseconds: nothing is requested ahead.
    assert answered() == before + 1
    assert next(pages).number == 2
    assert settled(answered, before + 2) == before + 2


def test_a_caller_that_stops_early_does_not_wait_for_the_page_requested_ahead(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    sim.set_faults(Faults(latency_seconds=1.0))  # every answer takes a second

    def answered() -> int:
        return sim.stats.count(path="/api/v1/clients", status=200)

    before = answered()
    pages = connect(page_size=10).iter_pages(*whole(sim))
    next(pages)  # page 2 is requested ahead now, and answers a second later

    started = time.monotonic()
    pages.close()

    assert time.monotonic() - started < 0.5
    # The request was indeed out when the caller stopped: the site answers it afterwards.
    assert settled(answered, before + 2) == before + 2


def test_an_empty_window_is_one_empty_last_page(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    since = sim.dataset.start - timedelta(days=30)
    pages = read_window(connect(), since, since + timedelta(days=1))

    assert len(pages) == 1
    assert pages[0].records == []
    assert pages[0].next_cursor is None


def test_window_bounds_are_sent_in_utc_and_repeated_with_the_cursor() -> None:
    first = {"data": [{"id": "a"}], "next_cursor": "c/1+="}
    last = {"data": [{"id": "b"}], "next_cursor": None}
    santiago = timezone(timedelta(hours=-4))
    with ScriptedSite([json_answer(first), json_answer(last)]) as site, site.client() as client:
        pages = read_window(
            client,
            datetime(2024, 5, 1, 0, 0, tzinfo=santiago),
            datetime(2024, 5, 2, 0, 0, 0, 250000, tzinfo=santiago),
        )

    assert records_of(pages) == [{"id": "a"}, {"id": "b"}]
    (path1, query1, headers1), (path2, query2, _) = site.requests
    assert path1 == path2 == "/api/v1/clients"
    assert query1 == {
        "updated_since": ["2024-05-01T04:00:00Z"],
        "updated_until": ["2024-05-02T04:00:00.250000Z"],
        "limit": ["500"],
    }
    assert query2 == {**query1, "cursor": ["c/1+="]}
    assert headers1["authorization"] == f"Bearer {TOKEN}"


def test_records_that_are_not_objects_are_passed_through_as_sent() -> None:
    data = [{"id": "1", "updated_at": "2024-05-01T00:00:00Z"}, 42, "text", None, [1]]
    with (
        ScriptedSite([json_answer({"data": data, "next_cursor": None})]) as site,
        site.client() as client,
    ):
        (page,) = read_window(client, *MAY)

    assert page.records == data


def test_naive_datetimes_and_empty_windows_are_refused_before_any_request(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    client = connect()
    start = sim.dataset.start
    before = sim.stats.count(path="/api/v1/clients")

    with pytest.raises(ValueError, match="no timezone"):
        client.iter_pages(start.replace(tzinfo=None), start + timedelta(days=1))
    with pytest.raises(ValueError, match="empty or reversed"):
        client.iter_pages(start, start)

    assert sim.stats.count(path="/api/v1/clients") == before


# --- Credentials --------------------------------------------------------------------------


def test_verify_describes_the_site_and_the_token(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    verification = connect().verify()

    assert verification.site_name == "Tienda Demo"
    assert verification.timezone == "America/Santiago"
    assert verification.site_url == sim.url
    assert "clients:read" in verification.scopes
    assert verification.expires_at is None or verification.expires_at.tzinfo is not None
    assert verification.request_id


@pytest.mark.parametrize("call", ["verify", "iter_pages"])
def test_a_rejected_token_is_an_auth_error_naming_the_variable(
    sim: HermesSimulator, connect: Callable[..., HermesClient], call: str
) -> None:
    client = connect(token=REVOKED_TOKEN)
    rejected = sim.stats.count(status=401)

    with pytest.raises(AuthError) as caught:
        client.verify() if call == "verify" else read_window(client, *whole(sim))

    err = caught.value
    assert err.status == 401
    assert err.code == "invalid_token"
    assert TOKEN_ENV in err.hint
    assert "new App Token" in err.hint
    assert err.request_id and err.request_id in str(err)
    assert settled(lambda: sim.stats.count(status=401), rejected + 1) == rejected + 1


def test_a_token_without_clients_read_is_a_scope_error_on_clients(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    with pytest.raises(ScopeError) as caught:
        read_window(connect(token=NO_SCOPE_TOKEN), *whole(sim))

    assert caught.value.status == 403
    assert caught.value.code == "insufficient_scope"
    assert "clients:read" in caught.value.hint
    assert caught.value.request_id in str(caught.value)


def test_verify_without_clients_read_in_the_scopes_is_a_scope_error(
    connect: Callable[..., HermesClient],
) -> None:
    with pytest.raises(ScopeError) as caught:
        connect(token=NO_SCOPE_TOKEN).verify()

    err = caught.value
    assert err.status == 200
    assert "orders:read" in str(err)
    assert "clients:read" in err.hint
    assert err.request_id


def test_from_env_reads_the_token_at_call_time(
    monkeypatch: pytest.MonkeyPatch, sim: HermesSimulator
) -> None:
    monkeypatch.setenv(TOKEN_ENV, f"  {TOKEN}\n")  # as pasted from a file
    with HermesClient.from_env(sim.url, TOKEN_ENV, max_requests_per_second=None) as client:
        assert client.verify().site_name == "Tienda Demo"


@pytest.mark.parametrize(("value", "state"), [(None, "not set"), ("", "empty"), ("  ", "empty")])
def test_a_missing_token_variable_is_named_before_any_request(
    monkeypatch: pytest.MonkeyPatch, sim: HermesSimulator, value: str | None, state: str
) -> None:
    if value is None:
        monkeypatch.delenv(TOKEN_ENV, raising=False)
    else:
        monkeypatch.setenv(TOKEN_ENV, value)
    before = sim.stats.count()

    with pytest.raises(MissingTokenError) as caught:
        HermesClient.from_env(sim.url, TOKEN_ENV)

    assert TOKEN_ENV in str(caught.value) and state in str(caught.value)
    assert TOKEN_ENV in caught.value.hint
    assert sim.stats.count() == before


def test_a_token_with_spaces_inside_is_refused_without_echoing_it(sim: HermesSimulator) -> None:
    with pytest.raises(AuthError) as caught:
        HermesClient(sim.url, "tok-Half Pasted-77", token_env=TOKEN_ENV)

    assert "Half" not in str(caught.value) + caught.value.hint
    assert TOKEN_ENV in caught.value.hint


# --- Transient failures -------------------------------------------------------------------


def test_server_errors_at_a_30_percent_rate_still_give_the_exact_window(
    sim: HermesSimulator, connect: Callable[..., HermesClient], caplog: pytest.LogCaptureFixture
) -> None:
    since, until = whole(sim)
    sim.set_faults(Faults(error_rate=0.3))
    sleep = FakeSleep()
    before = server_errors(sim)

    with caplog.at_level(logging.WARNING):
        pages = read_window(connect(page_size=25, retry=PATIENT, sleep=sleep), since, until)

    assert records_of(pages) == sim.dataset.window(since, until)
    warnings = retry_warnings(caplog)
    assert len(warnings) == len(sleep.waits) > 0
    assert settled(lambda: server_errors(sim) - before, len(warnings)) == len(warnings)
    assert all("HTTP 5" in w and "request id" in w and "attempt" in w for w in warnings)


@pytest.mark.parametrize(
    ("faults", "cause"),
    [
        (Faults(drop_rate=0.3), "connection dropped"),
        (Faults(truncated_rate=0.3), "malformed or truncated JSON"),
    ],
)
def test_dropped_connections_and_truncated_pages_are_recovered(
    sim: HermesSimulator,
    connect: Callable[..., HermesClient],
    caplog: pytest.LogCaptureFixture,
    faults: Faults,
    cause: str,
) -> None:
    since, until = whole(sim)
    sim.set_faults(faults)

    with caplog.at_level(logging.WARNING):
        pages = read_window(connect(page_size=25, retry=PATIENT, sleep=FakeSleep()), since, until)

    assert records_of(pages) == sim.dataset.window(since, until)
    assert any(cause in warning for warning in retry_warnings(caplog))


def test_a_slow_answer_times_out_and_is_retried(
    sim: HermesSimulator, connect: Callable[..., HermesClient], caplog: pytest.LogCaptureFixture
) -> None:
    sim.set_faults(Faults(latency_seconds=1.0))
    # The site recovers while the client waits to retry.
    sleep = FakeSleep(then=lambda _: sim.set_faults(Faults()))
    client = connect(retry=RetryPolicy(timeout=0.2, base_delay=0.01), sleep=sleep)

    with caplog.at_level(logging.WARNING):
        verification = client.verify()

    assert verification.site_name == "Tienda Demo"
    (warning,) = retry_warnings(caplog)
    assert "timed out" in warning and "attempt 1 of 6" in warning


def test_an_always_slow_site_exhausts_the_retries(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    sim.set_faults(Faults(latency_seconds=1.0))
    sleep = FakeSleep()
    client = connect(retry=RetryPolicy(max_attempts=3, timeout=0.15), sleep=sleep)

    started = time.monotonic()
    with pytest.raises(TransientExhaustedError) as caught:
        client.verify()

    assert time.monotonic() - started < 2.0
    err = caught.value
    assert err.attempts == 3 and len(sleep.waits) == 2
    assert "timed out" in err.last_cause
    assert "try again later" in err.hint


def test_retries_back_off_exponentially_with_full_jitter_then_give_up(
    sim: HermesSimulator, connect: Callable[..., HermesClient], caplog: pytest.LogCaptureFixture
) -> None:
    sim.set_faults(Faults(error_rate=1.0))
    sleep = FakeSleep()
    policy = RetryPolicy(max_attempts=5, base_delay=0.5, max_delay=1.5)

    with caplog.at_level(logging.WARNING), pytest.raises(TransientExhaustedError) as caught:
        read_window(connect(retry=policy, sleep=sleep), *whole(sim))

    assert len(sleep.waits) == 4
    for wait, ceiling in zip(sleep.waits, [0.5, 1.0, 1.5, 1.5], strict=True):
        assert 0 <= wait <= ceiling
    err = caught.value
    assert err.attempts == 5
    assert err.status is not None and 500 <= err.status <= 599
    assert err.request_id and err.request_id in str(err) and err.request_id in err.hint
    assert "HTTP 5" in err.last_cause
    assert "failing or slow" in err.hint and "try again later" in err.hint
    assert [f"attempt {n} of 5" in w for n, w in enumerate(retry_warnings(caplog), 1)] == [True] * 4


def test_the_total_time_budget_bounds_the_retries(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    sim.set_faults(Faults(error_rate=1.0))
    sleep = FakeSleep()
    policy = RetryPolicy(max_attempts=1000, base_delay=1.0, max_delay=1.0, max_total_seconds=5.0)

    with pytest.raises(TransientExhaustedError) as caught:
        connect(retry=policy, sleep=sleep).verify()

    assert sum(sleep.waits) <= 5.0
    assert caught.value.attempts == len(sleep.waits) + 1 < 1000
    assert "5 s budget" in str(caught.value)


def test_the_time_a_caller_spends_on_a_page_is_not_taken_from_the_next_pages_budget() -> None:
    first = {"data": [{"id": "a"}], "next_cursor": "c1"}
    last = {"data": [{"id": "b"}], "next_cursor": None}
    unavailable: Answer = (503, {}, b"try later")
    policy = RetryPolicy(base_delay=0.01, max_delay=0.01, max_total_seconds=0.5)
    with (
        ScriptedSite(
            [json_answer(first), unavailable, json_answer(last)],
            delay=SEND_AHEAD_AFTER_SECONDS * 2,  # slow enough to be asked ahead
        ) as site,
        site.client(retry=policy) as client,
    ):
        pages = client.iter_pages(
            datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 5, 2, tzinfo=UTC)
        )
        next(pages)  # page 2 is requested ahead now, and refused at once
        time.sleep(1.0)  # the caller works on page 1 for longer than a request's whole budget
        assert len(site.requests) == 2  # (the refused request went out ahead)

        second = next(pages)

    assert second.records == [{"id": "b"}]
    assert len(site.requests) == 3  # the refused request ahead, then its retry


def test_rate_limited_answers_are_retried_after_retry_after(
    sim: HermesSimulator, connect: Callable[..., HermesClient], caplog: pytest.LogCaptureFixture
) -> None:
    # One request a second: the second of two quick requests is refused.
    sim.set_faults(Faults(rate_limit_per_second=1, retry_after_seconds=1))
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        time.sleep(seconds)

    client = connect(sleep=sleep)
    limited = sim.stats.count(path="/api/v1/verify", status=429)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            client.verify()
    elapsed = time.monotonic() - started

    assert waits and min(waits) >= 1.0
    assert (
        settled(lambda: sim.stats.count(path="/api/v1/verify", status=429), limited + 1) > limited
    )
    assert elapsed >= 1.0
    assert any("HTTP 429" in w for w in retry_warnings(caplog))


def test_retry_after_is_a_floor_on_the_wait_and_its_absence_means_backoff() -> None:
    limited = (429, {"Retry-After": "3"}, b'{"error": {"code": "rate_limited", "message": "x"}}')
    bare = (429, {}, b"")
    ok = json_answer({"data": [], "next_cursor": None})
    sleep = FakeSleep()
    policy = RetryPolicy(base_delay=0.1, max_delay=0.1)
    with (
        ScriptedSite([limited, bare, ok]) as site,
        site.client(sleep=sleep, retry=policy) as client,
    ):
        read_window(client, *MAY)

    assert sleep.waits[0] >= 3
    assert 0 <= sleep.waits[1] <= 0.1


def test_a_retry_after_past_the_budget_gives_up_at_once() -> None:
    limited = (429, {"Retry-After": "120"}, b"")
    sleep = FakeSleep()
    with (
        ScriptedSite([limited]) as site,
        site.client(sleep=sleep, retry=RetryPolicy(max_total_seconds=60)) as client,
        pytest.raises(TransientExhaustedError) as caught,
    ):
        client.verify()

    assert sleep.waits == []
    assert "429" in caught.value.last_cause


def test_a_body_that_stays_malformed_is_a_protocol_error_after_the_retries() -> None:
    sleep = FakeSleep()
    with (
        ScriptedSite([(200, {}, b'{"data": [{"id": "1"')]) as site,
        site.client(sleep=sleep, retry=RetryPolicy(max_attempts=3)) as client,
        pytest.raises(ProtocolError) as caught,
    ):
        read_window(client, *MAY)

    assert len(site.requests) == 3
    assert "malformed JSON" in str(caught.value)
    # The request id of the last failed answer is the one to report.
    assert "req-3" in str(caught.value) and "req-3" in caught.value.hint


def test_the_client_spaces_its_requests_across_threads(
    connect: Callable[..., HermesClient],
) -> None:
    client = connect(max_requests_per_second=10)
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(pool.map(lambda _: client.verify(), range(11)))
    elapsed = time.monotonic() - started

    assert len(results) == 11
    assert elapsed >= 0.95  # 11 starts, at least 0.1 s apart


# --- Refusals and breaches of the contract ------------------------------------------------


def test_an_expired_cursor_is_a_cursor_expired_error(
    sim: HermesSimulator, connect: Callable[..., HermesClient]
) -> None:
    # Each answer takes 0.3 s: a cursor is older than its 0.2 s when the site reads it, however
    # soon the client sends it.
    sim.set_faults(Faults(cursor_ttl_seconds=0.2, latency_seconds=0.3))
    refused = sim.stats.count(path="/api/v1/clients", status=400)
    pages = connect(page_size=10).iter_pages(*whole(sim))
    next(pages)

    with pytest.raises(CursorExpiredError) as caught:
        next(pages)

    err = caught.value
    assert err.status == 400
    assert err.request_id and err.request_id in str(err)
    assert "first page" in err.hint
    assert (
        settled(lambda: sim.stats.count(path="/api/v1/clients", status=400), refused + 1)
        == refused + 1
    )


def payload_cases() -> list[tuple[bytes, str]]:
    return [
        (b"[]", "the body is a JSON array, not an object"),
        (b'{"next_cursor": null}', "lacks data"),
        (b'{"data": []}', "lacks next_cursor"),
        (b'{"data": {}, "next_cursor": null}', "data is a JSON object, not an array"),
        (b'{"data": [], "next_cursor": 5}', "neither a string nor null"),
    ]


@pytest.mark.parametrize(("body", "problem"), payload_cases())
def test_a_page_of_the_wrong_shape_is_a_protocol_error_without_retry(
    body: bytes, problem: str
) -> None:
    with (
        ScriptedSite([(200, {}, body)]) as site,
        site.client() as client,
        pytest.raises(ProtocolError) as caught,
    ):
        read_window(client, *MAY)

    assert problem in str(caught.value)
    assert "req-1" in str(caught.value) and "req-1" in caught.value.hint
    assert len(site.requests) == 1


def test_a_cursor_that_never_advances_is_a_protocol_error() -> None:
    page = json_answer({"data": [], "next_cursor": "same"})
    with (
        ScriptedSite([page, page]) as site,
        site.client() as client,
        pytest.raises(ProtocolError, match="cursor it was sent"),
    ):
        read_window(client, *MAY)


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"site": {"name": "x"}, "token": {"scopes": []}}, "site.url is missing"),
        ({"site": {"name": "x", "url": "u"}, "token": {"scopes": "all"}}, "token.scopes is a"),
        ({"site": {"name": "x", "url": "u"}}, "token is missing"),
        (
            {"site": {"name": "x", "url": "u"}, "token": {"scopes": [], "expires_at": "soon"}},
            "Invalid isoformat string",
        ),
    ],
)
def test_a_verification_of_the_wrong_shape_is_a_protocol_error(
    body: dict[str, Any], problem: str
) -> None:
    with (
        ScriptedSite([json_answer(body)]) as site,
        site.client() as client,
        pytest.raises(ProtocolError, match="does not match the contract") as caught,
    ):
        client.verify()

    assert problem in str(caught.value)
    assert "req-1" in caught.value.hint


@pytest.mark.parametrize(
    ("answer", "in_hint"),
    [
        ((404, {}, b"not found"), "/api/v1"),
        ((400, {}, b'{"error": {"code": "bad_request", "message": "no"}}'), "req-1"),
        ((418, {}, b""), "req-1"),
        ((301, {"Location": "https://www.tienda.example.cl/api/v1/verify"}, b""), "www.tienda"),
    ],
)
def test_other_refusals_are_protocol_errors_without_retry(
    answer: tuple[int, dict[str, str], bytes], in_hint: str
) -> None:
    with (
        ScriptedSite([answer]) as site,
        site.client() as client,
        pytest.raises(ProtocolError) as caught,
    ):
        read_window(client, *MAY)

    assert type(caught.value) is ProtocolError  # no cursor was sent: not an expired one
    assert caught.value.status == answer[0]
    assert in_hint in caught.value.hint
    assert len(site.requests) == 1


# --- The network --------------------------------------------------------------------------


def test_a_closed_port_is_unreachable() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed again when the block ends: nothing listens
    with (
        HermesClient(f"http://127.0.0.1:{port}", TOKEN) as client,
        pytest.raises(UnreachableError) as caught,
    ):
        client.verify()

    assert "refused" in str(caught.value)
    assert "site_url" in caught.value.hint


def test_an_unknown_host_is_unreachable() -> None:
    with (
        HermesClient("https://tienda-demo.invalid", TOKEN) as client,
        pytest.raises(UnreachableError) as caught,
    ):
        client.verify()

    assert "does not resolve" in str(caught.value)
    assert "https://tienda-demo.invalid" in caught.value.hint


def test_a_failed_tls_handshake_is_a_tls_error(sim: HermesSimulator) -> None:
    port = urlsplit(sim.url).port
    with (
        HermesClient(f"https://127.0.0.1:{port}", TOKEN) as client,
        pytest.raises(TLSError) as caught,
    ):
        client.verify()

    assert "cannot be turned off" in caught.value.hint
    assert "site_url" in caught.value.hint


@pytest.mark.parametrize(
    ("site_url", "message"),
    [
        ("tienda.example.cl", "must be an http(s) URL"),
        ("ftp://tienda.example.cl", "must be an http(s) URL"),
        ("", "must be an http(s) URL"),
        ("https://tienda.example.cl/?shop=1", "no query or fragment"),
        ("https://admin:hunter2@tienda.example.cl", "must not carry a user name or password"),
    ],
)
def test_a_site_url_that_is_not_a_plain_http_address_is_refused(
    site_url: str, message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)) as caught:
        HermesClient(site_url, TOKEN)

    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("site_url", "base_url"),
    [
        ("https://tienda.example.cl/", "https://tienda.example.cl/api/v1"),
        (" https://tienda.example.cl/shop/ ", "https://tienda.example.cl/shop/api/v1"),
    ],
)
def test_the_api_lives_under_api_v1_of_the_site_url(site_url: str, base_url: str) -> None:
    with HermesClient(site_url, TOKEN) as client:
        assert client.base_url == base_url


# --- Secrets ------------------------------------------------------------------------------


def test_no_token_in_any_message_hint_repr_or_log(
    sim: HermesSimulator, connect: Callable[..., HermesClient], caplog: pytest.LogCaptureFixture
) -> None:
    texts: list[str] = []

    def collect(action: Callable[[], object]) -> None:
        try:
            action()
        except HermesError as err:
            texts.extend([str(err), err.hint, repr(err), *traceback.format_exception(err)])
        else:
            raise AssertionError("expected a HermesError")

    sim_port = urlsplit(sim.url).port
    with caplog.at_level(logging.INFO):
        good = connect(retry=RetryPolicy(max_attempts=2), sleep=FakeSleep())
        texts += [repr(good), str(good)]
        collect(lambda: connect(token=REVOKED_TOKEN).verify())
        collect(lambda: read_window(connect(token=NO_SCOPE_TOKEN), *whole(sim)))
        collect(lambda: connect(token=NO_SCOPE_TOKEN).verify())
        collect(lambda: connect(site_url=f"https://127.0.0.1:{sim_port}").verify())
        collect(lambda: connect(site_url="http://tienda-demo.invalid").verify())
        sim.set_faults(Faults(error_rate=1.0))
        collect(good.verify)
        sim.set_faults(Faults(truncated_rate=1.0))
        collect(lambda: read_window(good, *whole(sim)))
        sim.set_faults(Faults(drop_rate=1.0))
        collect(good.verify)
        sim.set_faults(Faults())
    texts.append(caplog.text)

    assert len(retry_warnings(caplog)) == 3
    blob = "\n".join(texts)
    assert "request id" in blob
    for secret in SECRETS:
        assert secret not in blob


def test_errors_survive_pickling_with_their_details() -> None:
    err = TransientExhaustedError("m", "h", 503, "req-9", None, "HTTP 503", 6)
    copy = pickle.loads(pickle.dumps(err))

    assert (copy.message, copy.hint, copy.status, copy.request_id) == ("m", "h", 503, "req-9")
    assert (copy.last_cause, copy.attempts) == ("HTTP 503", 6)


# --- A scripted site, for breaches the simulator never commits ----------------------------

MAY = (datetime(2024, 5, 1, tzinfo=UTC), datetime(2024, 6, 1, tzinfo=UTC))

Answer = tuple[int, dict[str, str], bytes]


def json_answer(body: object) -> Answer:
    return 200, {"Content-Type": "application/json"}, orjson.dumps(body)


class ScriptedSite:
    """A loopback HTTP site that plays ``answers`` in order, repeating the last one.

    Every answer carries ``X-Request-Id: req-<n>`` and comes ``delay`` seconds after its
    request. ``requests`` records each request's path, decoded query and lower-cased headers.
    """

    def __init__(self, answers: list[Answer], delay: float = 0.0) -> None:
        self.requests: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                parts = urlsplit(self.path)
                headers = {key.lower(): value for key, value in self.headers.items()}
                site.requests.append((parts.path, parse_qs(parts.query), headers))
                status, extra, body = answers[min(len(site.requests), len(answers)) - 1]
                time.sleep(delay)
                self.send_response(status)
                self.send_header("X-Request-Id", f"req-{len(site.requests)}")
                self.send_header("Content-Length", str(len(body)))
                for key, value in extra.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def client(self, **kwargs: Any) -> HermesClient:
        kwargs.setdefault("max_requests_per_second", None)
        kwargs.setdefault("sleep", FakeSleep())
        return HermesClient(self.url, TOKEN, token_env=TOKEN_ENV, **kwargs)

    def __enter__(self) -> ScriptedSite:
        threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        ).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_numbers_too_large_for_a_double_or_int64_are_kept_as_their_literal_text() -> None:
    body = (
        b'{"data": [{"id": "1", "updated_at": "2024-05-01T00:00:00Z", "custom_fields": '
        b'{"puntos": 1e400, "ref": 123456789012345678901234567890, "n": 7}}], "next_cursor": null}'
    )
    with (
        ScriptedSite([(200, {"Content-Type": "application/json"}, body)]) as site,
        site.client() as client,
    ):
        (page,) = read_window(client, *MAY)

    assert page.records[0]["custom_fields"] == {
        "puntos": "1e400",
        "ref": "123456789012345678901234567890",
        "n": 7,
    }
