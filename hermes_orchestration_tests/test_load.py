"""Twenty integrations backfill 90 days into two master databases at once on PostgreSQL.

Four worker processes run the backfills at the same time, one single-run backfill of 90 daily
partitions per integration, so that loads of integrations sharing a master database (and, for
those reading the same site, the very same contacts) overlap all the time. No deadlock or
serialization failure may escape: every run succeeds. The result must equal a sequential load of
the same partitions, one after another, which a fifth process performs beside the runs.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from hermes_orchestration.simulator import HermesSimulator, SimulatorConfig
from hermes_orchestration_tests.conftest import TOKEN
from hermes_orchestration_tests.faults_support import (
    RunRequest,
    fresh_postgres,
    load_sequentially,
    master_data_dump,
    run_requests,
    write_integrations,
)

SANTIAGO = ZoneInfo("America/Santiago")
FIRST_DAY = date(2026, 8, 1)
DAYS = 90
CLIENTS_PER_DAY = 20
INTEGRATIONS = 20
WORKERS = 4
KEYS = [(FIRST_DAY + timedelta(days=n)).isoformat() for n in range(DAYS)]


def midnight(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=SANTIAGO).astimezone(UTC)


@pytest.fixture(scope="module")
def sites() -> Iterator[list[HermesSimulator]]:
    """Two sites, each with 90 days of clients."""
    configs = [
        SimulatorConfig(
            clients=CLIENTS_PER_DAY * DAYS,
            seed=seed,
            start=midnight(FIRST_DAY),
            end=midnight(FIRST_DAY + timedelta(days=DAYS)),
            dirty_share=0.1,
            tokens={TOKEN: ("clients:read",)},
        )
        for seed in (1001, 2002)
    ]
    with HermesSimulator(configs[0]) as north, HermesSimulator(configs[1]) as south:
        yield [north, south]


def test_twenty_integrations_backfilling_at_once_equal_a_sequential_load(
    sites: list[HermesSimulator], tmp_path: Path
) -> None:
    # Integrations alternate between the two sites and, in pairs, between the two master
    # databases: each master database holds five integrations of each site, and any four runs in
    # a row load both master databases, two of them each.
    names = [f"tienda_{n:02d}" for n in range(INTEGRATIONS)]
    number = {name: n for n, name in enumerate(names)}
    config = write_integrations(
        tmp_path / "integrations.yaml",
        site_url=lambda name: sites[number[name] % 2].url,
        names=names,
        master_database=lambda name: "clientes_norte" if number[name] % 4 < 2 else "clientes_sur",
        page_size=1000,
        start=FIRST_DAY.isoformat(),
    )
    staging = tmp_path / "staging"
    with fresh_postgres(durable=False) as concurrent_url:
        requests = [
            RunRequest(
                integrations_file=str(config.path),
                integration=name,
                first=KEYS[0],
                last=KEYS[-1],
                staging=str(staging),
                masterdata_url=concurrent_url,
                token=TOKEN,
            )
            for name in names
        ]
        sequential_url = f"sqlite:///{tmp_path / 'sequential.sqlite'}"
        plan = [(i.name, i.master_database, KEYS) for i in config.integrations]
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=WORKERS + 1, mp_context=context) as pool:
            sequential = pool.submit(load_sequentially, sequential_url, str(staging), plan)
            batches = [pool.submit(run_requests, requests[w::WORKERS]) for w in range(WORKERS)]
            outcomes = [outcome for batch in batches for outcome in batch.result()]
            loaded = sequential.result()
        concurrent = master_data_dump(concurrent_url)

    assert len(outcomes) == INTEGRATIONS
    failed = {o.request.integration: o.failures for o in outcomes if not o.success}
    assert failed == {}
    assert loaded == INTEGRATIONS * DAYS

    sequential_dump = master_data_dump(sequential_url)
    assert {name: len(rows) for name, rows in concurrent.items()} == {
        name: len(rows) for name, rows in sequential_dump.items()
    }
    assert concurrent == sequential_dump
    assert {row["name"] for row in concurrent["master_databases"]} == {
        "clientes_norte",
        "clientes_sur",
    }
    feeding = {
        (row["integration"], row["master_database"]) for row in concurrent["contact_sources"]
    }
    assert len(feeding) == INTEGRATIONS
    assert len(concurrent["master_contacts"]) > CLIENTS_PER_DAY * DAYS  # both sites, both databases
