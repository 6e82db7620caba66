"""A sync broken on purpose recovers to exactly the master data of a fault-free run.

Every scenario runs real syncs (Dagster runs over loopback HTTP into SQLite or PostgreSQL) of a
simulated site with faults switched on, and compares the whole master data with the reference:
the same partitions synced from the same site with no fault at all. Faults the simulator cannot
time on its own (an answer slower than the client's timeout, a cursor held until it expires, a
site that goes down mid-window) come from ``FaultProxy`` in front of it; broken database
connections and killed processes from ``LoadBlocker``, which stops a load at its last write.
Counts are exact: each fault the site or the proxy injected is one retry the run's log explains.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from hermes_orchestration.assets import build_integration_assets, integration_asset_keys
from hermes_orchestration.config import Integration, IntegrationsConfig
from hermes_orchestration.simulator import Faults, HermesSimulator, SimulatorConfig
from hermes_orchestration.staging import RAW, PartitionStaging
from hermes_orchestration.tags import FAILURE_TAG
from hermes_orchestration_tests.conftest import TOKEN, TOKEN_ENV
from hermes_orchestration_tests.faults_support import (
    Drop,
    FaultProxy,
    Forward,
    Hang,
    LoadBlocker,
    Respond,
    Rewrite,
    RunRequest,
    Truncate,
    always,
    definitions,
    fast_api,
    fresh_postgres,
    from_request,
    log_messages,
    master_data_dump,
    materialized,
    memory_instance,
    merged,
    renamed,
    run_in_processes,
    step_failures,
    sync,
    write_integrations,
)

# The site holds two days of clients: the daily partitions P1 and P2 in America/Santiago.
SITE_START = datetime(2026, 11, 2, 3, 0, tzinfo=UTC)
SITE_END = datetime(2026, 11, 4, 3, 0, tzinfo=UTC)
P1, P2 = "2026-11-02", "2026-11-03"
PAGE_SIZE = 50
DATABASE = "clientes_fallas"
CLIENTS_PATH = "/api/v1/clients"
SERVER_ERRORS = (500, 502, 503, 504)
RETRY_WAIT = re.compile(r"retrying in (\d+\.\d+) s")

Dump = dict[str, list[dict[str, Any]]]


@pytest.fixture(scope="module")
def site() -> Iterator[HermesSimulator]:
    """A site of this module's own, so that its faults disturb no other test."""
    config = SimulatorConfig(
        clients=1500,
        seed=424242,
        start=SITE_START,
        end=SITE_END,
        dirty_share=0.15,
        tokens={TOKEN: ("clients:read",)},
    )
    with HermesSimulator(config) as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def calm_site(site: HermesSimulator, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv(TOKEN_ENV, TOKEN)
    site.set_faults(Faults())
    site.stats.reset()
    yield
    site.set_faults(Faults())


@dataclass
class Bench:
    """A test's own integrations file, staging folder and master database."""

    root: Path
    url: str
    env: str

    def config(
        self, site_url: str, names: tuple[str, ...] = ("tienda_a",), **kwargs: Any
    ) -> IntegrationsConfig:
        return write_integrations(
            self.root / "integrations.yaml",
            site_url=site_url,
            names=names,
            master_database=kwargs.pop("master_database", DATABASE),
            page_size=kwargs.pop("page_size", PAGE_SIZE),
            **kwargs,
        )

    @property
    def staging(self) -> Path:
        return self.root / "state" / "staging"

    def defs(self, config: IntegrationsConfig, **api: Any) -> dg.Definitions:
        return definitions(
            config, staging=self.staging, masterdata_url_env=self.env, hermes_api=fast_api(**api)
        )

    def dump(self) -> Dump:
        return master_data_dump(self.url)

    def staged(self, integration: str, partition_key: str) -> bool:
        return PartitionStaging(self.staging, integration).exists(RAW, partition_key)


def make_bench(root: Path, url: str, monkeypatch: pytest.MonkeyPatch) -> Bench:
    env = "HERMES_TEST_MASTERDATA_URL"
    monkeypatch.setenv(env, url)
    return Bench(root=root, url=url, env=env)


@pytest.fixture
def bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Bench:
    return make_bench(tmp_path, f"sqlite:///{tmp_path / 'masterdata.sqlite'}", monkeypatch)


@pytest.fixture
def pg_bench(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Bench]:
    with fresh_postgres() as url:
        yield make_bench(tmp_path, url, monkeypatch)


@pytest.fixture(scope="module")
def reference(site: HermesSimulator, tmp_path_factory: pytest.TempPathFactory) -> Dump:
    """The master data of P1..P2 synced with no fault at all: what every scenario must give."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv(TOKEN_ENV, TOKEN)
        root = tmp_path_factory.mktemp("reference")
        bench = make_bench(root, f"sqlite:///{root / 'masterdata.sqlite'}", monkeypatch)
        config = bench.config(site.url)
        with memory_instance() as instance:
            result = sync(bench.defs(config), config.integrations[0], instance, P1, P2)
        assert result.success, step_failures(result)
        dump = bench.dump()
    assert dump["contact_sources"] and dump["rejected_clients"], "the reference must hold data"
    return dump


def only(config: IntegrationsConfig) -> Integration:
    (integration,) = config.integrations
    return integration


def retry_warnings(messages: list[str], cause: str) -> list[str]:
    return [m for m in messages if "retrying in" in m and re.search(cause, m)]


# --- Transient faults of the site ----------------------------------------------------------


def test_server_errors_dropped_slow_and_malformed_answers_are_retried_to_the_same_data(
    site: HermesSimulator, bench: Bench, reference: Dump
) -> None:
    # The site answers 20% of requests with 500/502/503/504 (JSON, HTML or empty bodies). In
    # front of it, some requests get a proxy's HTML 502 or an empty 504, some connections are
    # dropped unanswered, some requests are held past the client's 1 s timeout, and some pages
    # arrive truncated or as well-framed non-JSON.
    site.set_faults(Faults(error_rate=0.2))

    def rule(number: int, target: str) -> Any:
        if number % 17 == 0:
            return Respond(502, b"<html><h1>502 Bad Gateway</h1></html>", "text/html")
        if number % 19 == 0:
            return Respond(504, b"", None)
        if number % 11 == 0:
            return Drop()
        if number % 13 == 0:
            return Hang(seconds=2.0)
        if number % 7 == 0:
            return Truncate()
        if number % 9 == 0:
            return Rewrite({b'"data":[': b'"data":[,'})
        return Forward()

    with FaultProxy(site.url, rule) as proxy, memory_instance() as instance:
        config = bench.config(proxy.url)
        result = sync(bench.defs(config, timeout_seconds=1.0), only(config), instance, P1, P2)
        messages = log_messages(instance, result.run_id)

    assert result.success, step_failures(result)
    assert bench.dump() == reference

    # Exactly one logged retry per injected fault, each with its cause and its wait.
    from_site = sum(site.stats.count(CLIENTS_PATH, status) for status in SERVER_ERRORS)
    from_proxy = proxy.count(Respond)
    server_errors = from_site + from_proxy
    errors_logged = retry_warnings(messages, r"failed: HTTP 50[0234]")
    assert from_site >= 3 and from_proxy >= 2
    assert len(errors_logged) == server_errors
    assert all("(request id " in message for message in errors_logged)
    # Error bodies that are not JSON (HTML, empty) are retried all the same.
    not_json = [m for m in errors_logged if not re.search(r"HTTP 50\d \(unavailable - ", m)]
    assert len(not_json) >= from_proxy
    assert len(retry_warnings(messages, "connection dropped")) == proxy.count(Drop) > 0
    timed_out = retry_warnings(messages, r"timed out \(ReadTimeout, limit 1 s\)")
    assert len(timed_out) == proxy.count(Hang) > 0
    malformed = retry_warnings(messages, "malformed or truncated JSON in a 200 answer")
    broken = proxy.count(Truncate) + proxy.count(Rewrite)
    assert len(malformed) == broken > 0
    assert all("(request id " in message for message in malformed)
    retries = retry_warnings(messages, "")
    assert len(retries) == server_errors + proxy.count(Drop) + proxy.count(Hang) + broken
    assert all(RETRY_WAIT.search(message) for message in retries)


def test_a_page_that_stays_malformed_fails_the_run_red_and_stages_nothing(
    site: HermesSimulator, bench: Bench
) -> None:
    with FaultProxy(site.url, from_request(3, Truncate())) as proxy, memory_instance() as instance:
        config = bench.config(proxy.url)
        result = sync(bench.defs(config, max_attempts=3), only(config), instance, P1, P2)
        run = instance.get_run_by_id(result.run_id)

    assert not result.success
    message = step_failures(result)["hermes__tienda_a__raw_clients"]
    assert "GET /clients page 3 kept answering malformed JSON after 3 attempts" in message
    assert "What to do: Report this to Hermes with request id " in message
    assert run.tags[FAILURE_TAG] == "protocol"
    # The two good pages were never published: no partition has a half-read window.
    assert not bench.staged("tienda_a", P1) and not bench.staged("tienda_a", P2)
    assert not any(bench.dump().values())


def test_a_cursor_that_expires_mid_window_restarts_the_window_from_its_first_page(
    site: HermesSimulator, bench: Bench, reference: Dump
) -> None:
    site.set_faults(Faults(cursor_ttl_seconds=2.0))
    # The 4th request carries the cursor of page 4; holding it 2.6 s (within the client's 5 s
    # timeout) lets that cursor expire before the site sees it.
    held = from_request(4, Forward(delay=2.6), until=4)
    with FaultProxy(site.url, held) as proxy, memory_instance() as instance:
        config = bench.config(proxy.url)
        result = sync(bench.defs(config, timeout_seconds=5.0), only(config), instance, P1, P2)
        messages = log_messages(instance, result.run_id)

    assert result.success, step_failures(result)
    assert "cursor=" in proxy.seen[3].target
    assert site.stats.count(CLIENTS_PATH, 400) == 1
    restarts = [m for m in messages if "cursor expired" in m]
    assert len(restarts) == 1
    assert "on page 4; restarting the window from its first page (attempt 2 of 3)" in restarts[0]
    assert "request id " in restarts[0]
    # The three pages read before the restart are not kept: every row is fetched once.
    fetched = materialized(result)["raw_clients"]
    served = site.dataset.count(SITE_START, SITE_END)
    assert fetched["rows_fetched"] == served
    assert fetched["pages"] == -(-served // PAGE_SIZE)
    assert bench.dump() == reference


def test_integrations_of_one_site_running_at_once_under_its_rate_limit_get_the_same_data(
    site: HermesSimulator, bench: Bench, reference: Dump
) -> None:
    # Three integrations of the same site (one App Token) run at once in three processes, each
    # allowed 20 requests per second, against a site that allows 10 per second for the token.
    site.set_faults(Faults(rate_limit_per_second=10, retry_after_seconds=1))
    names = ("tienda_a", "tienda_b", "tienda_c")
    config = bench.config(
        site.url,
        names=names,
        master_database=lambda name: "clientes_" + name.removeprefix("tienda_"),
        page_size=100,
        max_requests_per_second=20,
    )
    outcomes = run_in_processes(
        [
            [
                RunRequest(
                    integrations_file=str(config.path),
                    integration=name,
                    first=P1,
                    last=P2,
                    staging=str(bench.staging),
                    masterdata_url=bench.url,
                    token=TOKEN,
                    api=(("max_attempts", 20),),
                )
            ]
            for name in names
        ]
    )

    assert all(outcome.success for outcome in outcomes), [o.failures for o in outcomes]
    # Each master database holds exactly what the reference holds, under its own names.
    expected = merged(
        *(
            renamed(reference, integration=i.name, master_database=i.master_database)
            for i in config.integrations
        )
    )
    assert bench.dump() == expected

    limited = site.stats.count(CLIENTS_PATH, 429)
    logged = retry_warnings(
        [m for outcome in outcomes for m in outcome.warnings],
        r"rate limited \(HTTP 429, rate_limited - ",
    )
    assert len(logged) == limited > 0
    # Every wait honours Retry-After (1 s) and the answer's request id is logged with it.
    assert all(float(RETRY_WAIT.search(m).group(1)) >= 1.0 for m in logged)  # type: ignore[union-attr]
    assert all("(request id " in m for m in logged)


# --- The site down for longer than the retry budget -----------------------------------------


def test_a_site_down_past_the_retry_budget_fails_red_writes_nothing_and_the_next_run_converges(
    site: HermesSimulator, bench: Bench, reference: Dump
) -> None:
    # The site answers three pages, then only 503 (as a load balancer with no server behind).
    with (
        FaultProxy(site.url, from_request(4, Respond(503))) as proxy,
        memory_instance() as instance,
    ):
        config = bench.config(proxy.url)
        defs = bench.defs(config, max_attempts=4)
        failed = sync(defs, only(config), instance, P1, P2)
        run = instance.get_run_by_id(failed.run_id)
        messages = log_messages(instance, failed.run_id)

        assert not failed.success
        message = step_failures(failed)["hermes__tienda_a__raw_clients"]
        assert "GET /clients page 4 failed after 4 attempts; last cause: HTTP 503" in message
        assert f"What to do: The site {proxy.url} is failing or slow (HTTP 503" in message
        assert "If it persists, report it to Hermes with request id " in message
        assert run.tags[FAILURE_TAG] == "transient_exhausted"
        assert run.tags["hermes/http_status"] == "503"
        assert len(retry_warnings(messages, "failed: HTTP 503")) == 3
        assert not bench.staged("tienda_a", P1) and not bench.staged("tienda_a", P2)
        assert not any(bench.dump().values())

        proxy.rule = always(Forward())  # the site is back
        recovered = sync(defs, only(config), instance, P1, P2)

    assert recovered.success, step_failures(recovered)
    assert bench.dump() == reference


@pytest.mark.parametrize("outage", ["silent", "refusing"])
def test_a_site_that_stops_answering_or_refuses_connections_fails_red_with_the_right_hint(
    outage: str, site: HermesSimulator, bench: Bench
) -> None:
    # Silent: after three pages no answer comes within the 0.5 s timeout, for longer than the
    # 2 s budget of a request. Refusing: nothing listens on the site's port any more.
    with (
        FaultProxy(site.url, from_request(4, Hang(seconds=1.0))) as proxy,
        memory_instance() as instance,
    ):
        if outage == "refusing":
            proxy.close()
        config = bench.config(proxy.url)
        defs = bench.defs(config, timeout_seconds=0.5, max_total_seconds=2.0, max_attempts=50)
        result = sync(defs, only(config), instance, P1, P2)
        run = instance.get_run_by_id(result.run_id)

    assert not result.success
    message = step_failures(result)["hermes__tienda_a__raw_clients"]
    if outage == "silent":
        assert "GET /clients page 4 failed after " in message
        assert "would pass the 2 s budget; last cause: timed out" in message
        assert f"What to do: The site {proxy.url} is failing or slow (timed out" in message
        assert run.tags[FAILURE_TAG] == "transient_exhausted"
    else:
        assert "GET /clients page 1: the connection was refused" in message
        assert f"What to do: Check site_url ({proxy.url})" in message
        assert run.tags[FAILURE_TAG] == "unreachable"
    assert not bench.staged("tienda_a", P1) and not bench.staged("tienda_a", P2)
    assert not any(bench.dump().values())


# --- The master database and the run process failing mid-load -------------------------------


def test_a_master_database_connection_dropped_mid_load_leaves_the_partition_unwritten(
    site: HermesSimulator, pg_bench: Bench, reference: Dump
) -> None:
    config = pg_bench.config(site.url)
    defs = pg_bench.defs(config)
    with memory_instance() as instance:
        assert sync(defs, only(config), instance, P1).success
        after_first = pg_bench.dump()

        # P2's load is cut off at its last write, with everything else written but uncommitted.
        blocker = LoadBlocker(pg_bench.url, DATABASE)
        saboteur = blocker.break_next_load_in_background()
        broken = sync(defs, only(config), instance, P2)
        saboteur.join()
        assert not broken.success
        message = step_failures(broken)["hermes__tienda_a__master_data"]
        assert f"loading partition '{P2}' of integration 'tienda_a'" in message
        assert "failed and was rolled back, nothing of it was written" in message
        assert "terminating connection due to administrator command" in message
        assert pg_bench.dump() == after_first

        again = sync(defs, only(config), instance, P2)
    assert again.success, step_failures(again)
    assert pg_bench.dump() == reference


def test_a_run_killed_mid_load_leaves_the_partition_unwritten_and_the_next_run_converges(
    site: HermesSimulator, pg_bench: Bench, reference: Dump, tmp_path: Path
) -> None:
    config = pg_bench.config(site.url)
    defs = pg_bench.defs(config)
    with memory_instance() as instance:
        assert sync(defs, only(config), instance, P1).success
    after_first = pg_bench.dump()

    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "HERMES_INTEGRATIONS_FILE": str(config.path),
        "HERMES_MASTERDATA_URL": pg_bench.url,
        "HERMES_STATE_DIR": str(pg_bench.staging.parent),
        TOKEN_ENV: TOKEN,
    }
    command = [
        str(Path(sys.executable).parent / "hermes-orchestration"),
        *("sync", "tienda_a", "--partition", P2),
    ]
    blocker = LoadBlocker(pg_bench.url, DATABASE)
    blocker.hold()
    with (tmp_path / "sync.log").open("wb") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
        try:
            backend = blocker.blocked_load(timeout=180)
            os.killpg(process.pid, signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            blocker.release()
    blocker.wait_gone(backend)
    assert pg_bench.dump() == after_first

    with memory_instance() as instance:
        again = sync(defs, only(config), instance, P2)
    assert again.success, step_failures(again)
    assert pg_bench.dump() == reference


def test_steps_retried_by_a_dagster_retry_policy_load_nothing_twice(
    site: HermesSimulator, pg_bench: Bench, reference: Dump
) -> None:
    # Both steps that talk to the outside fail on their first attempt: the fetch because the
    # site answers 503 to three requests in a row after page 1, the load because its database
    # connection is dropped at its last write. The policy retries each step once.
    with FaultProxy(site.url, from_request(2, Respond(503), until=4)) as proxy:
        config = pg_bench.config(proxy.url)
        integration = only(config)
        retrying = dg.define_asset_job(
            "hermes_sync_with_retries",
            selection=dg.AssetSelection.assets(*integration_asset_keys(integration)),
            op_retry_policy=dg.RetryPolicy(max_retries=1),
            executor_def=dg.in_process_executor,
        )
        base = pg_bench.defs(config, max_attempts=3)
        defs = dg.Definitions(
            assets=build_integration_assets(integration), jobs=[retrying], resources=base.resources
        )
        blocker = LoadBlocker(pg_bench.url, DATABASE)
        blocker.ensure_row()
        saboteur = blocker.break_next_load_in_background()
        with memory_instance() as instance:
            result = defs.resolve_job_def(retrying.name).execute_in_process(
                instance=instance,
                tags={
                    "dagster/asset_partition_range_start": P1,
                    "dagster/asset_partition_range_end": P2,
                },
                raise_on_error=False,
            )
        saboteur.join()

    assert result.success, step_failures(result)
    retried = sorted(
        event.step_key
        for event in result.all_events
        if event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    )
    assert retried == ["hermes__tienda_a__master_data", "hermes__tienda_a__raw_clients"]
    fetched = materialized(result)["raw_clients"]
    assert fetched["rows_fetched"] == site.dataset.count(SITE_START, SITE_END)
    assert pg_bench.dump() == reference
