"""Loading the code location: what the processes that only read the definitions pay for."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
import sqlalchemy as sa
from dagster_postgres.event_log import PostgresEventLogStorage

from hermes_orchestration import code_location, config
from hermes_orchestration.assets import MASTER_DATA, asset_key, integration_asset_keys
from hermes_orchestration.jobs import sync_job_name
from hermes_orchestration_tests.conftest import SIM_PARTITIONS
from hermes_orchestration_tests.operations_support import (
    definitions,
    sync,
    write_integrations,
)

DATA_PATH = ["pyarrow", "pandas", "psycopg", "httpx", "email_validator"]

PROBE = f"""
import json, sys
import hermes_orchestration.definitions
import hermes_orchestration.cli
print(json.dumps([name for name in {DATA_PATH!r} if name in sys.modules]))
"""


def test_the_definitions_load_without_arrow_the_database_drivers_or_the_http_client(
    integrations_file,
) -> None:
    # The code server, the daemon, sensors and `status` load them again and again; a run
    # imports what its steps use when they start.
    integrations_file("tienda_norte", "tienda_sur")
    probe = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=120
    )
    assert json.loads(probe.stdout.strip().splitlines()[-1]) == []


CONSOLE_SCRIPT = Path(sys.executable).parent / "hermes-orchestration"


def test_the_garbage_collector_rests_while_integrations_are_read_and_built(
    integrations_file, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thousand integrations' objects live as long as the process: collecting garbage among
    # them as they pile up took a fifth of the build. The collector resumes afterwards, also
    # when the file is invalid.
    collecting: list[tuple[str, bool]] = []

    def noting(what: str, function: Any) -> Any:
        def call(*args: Any) -> Any:
            collecting.append((what, gc.isenabled()))
            return function(*args)

        return call

    monkeypatch.setattr(config._Parser, "parse", noting("read", config._Parser.parse))
    monkeypatch.setattr(
        code_location,
        "build_integration_assets",
        noting("built", code_location.build_integration_assets),
    )
    code_location.build_definitions(config.load_integrations(integrations_file("tienda_a")))
    assert collecting == [("read", False), ("built", False)]
    assert gc.isenabled()

    with pytest.raises(config.IntegrationsFileError):
        config.parse_integrations("integrations:\n  - name: Not A Name\n")
    assert gc.isenabled()


def test_the_console_script_says_everything_and_keeps_its_exit_status(
    tmp_path, monkeypatch
) -> None:
    # The command exits without tearing the interpreter down: what it printed must all be out,
    # including what its buffered output still held.
    monkeypatch.delenv("PYTHONUNBUFFERED", raising=False)
    schema = subprocess.run(
        [CONSOLE_SCRIPT, "schema"], capture_output=True, text=True, timeout=120, check=False
    )
    assert schema.returncode == 0, schema.stderr
    assert json.loads(schema.stdout)["title"]
    assert schema.stdout.endswith("}\n")  # the last piece, still buffered when the command ended
    broken = tmp_path / "integrations.yaml"
    broken.write_text("integrations:\n  - name: Tienda Mala\n", encoding="utf-8")
    check = subprocess.run(
        [CONSOLE_SCRIPT, "validate", str(broken)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert check.returncode == 1
    assert "Tienda Mala" in check.stdout + check.stderr


def test_a_range_run_on_postgresql_stores_each_steps_materializations_in_one_batch(
    tmp_path, monkeypatch, simulator, state_dir, postgres_url
) -> None:
    # One event write per partition and asset costs about 10 ms: 11 s for a year of partitions.
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    batches: list[list[str]] = []
    store_event_batch = PostgresEventLogStorage.store_event_batch

    def recording(storage: PostgresEventLogStorage, events: Sequence[Any]) -> None:
        batches.append([event.dagster_event.event_type_value for event in events])
        store_event_batch(storage, events)

    monkeypatch.setattr(PostgresEventLogStorage, "store_event_batch", recording)
    storage = {
        "storage": {"postgres": {"postgres_url": postgres_url.replace("+psycopg:", "+psycopg2:")}}
    }
    with dg.instance_for_test(overrides=storage) as instance:
        result = sync(
            definitions(config), integration, instance, SIM_PARTITIONS[0], SIM_PARTITIONS[-1]
        )
        assert result.success
        stored = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=asset_key(integration, MASTER_DATA)),
            limit=100,
        ).records
    materializations = [batch for batch in batches if "ASSET_MATERIALIZATION" in batch]
    assert [len(batch) for batch in materializations] == [len(SIM_PARTITIONS)] * 3
    assert sorted(record.partition_key for record in stored) == sorted(SIM_PARTITIONS)


@contextmanager
def dagster_connections_opened() -> Iterator[list[float]]:
    """When Dagster (psycopg2; the master data uses psycopg 3) opens a connection meanwhile."""
    opened: list[float] = []

    def count(dbapi_connection: Any, _record: Any) -> None:
        if type(dbapi_connection).__module__.startswith("psycopg2"):
            opened.append(time.time())

    sa.event.listen(sa.pool.Pool, "connect", count)
    try:
        yield opened
    finally:
        sa.event.remove(sa.pool.Pool, "connect", count)


def test_a_sync_on_postgresql_storage_keeps_its_connections_to_dagsters_database(
    tmp_path, monkeypatch, simulator, state_dir, postgres_url
) -> None:
    # Dagster's PostgreSQL storage opens a connection per event it stores unless told otherwise:
    # a range run records one per partition and asset before it starts.
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    with dg.instance_for_test(overrides=postgres_storage(postgres_url)) as instance:
        with dagster_connections_opened() as opened:
            result = sync(
                definitions(config), integration, instance, SIM_PARTITIONS[0], SIM_PARTITIONS[-1]
            )
        assert result.success
        stored = len(instance.all_logs(result.run_id))
    # A few connections, one per storage and some spare, not one or two per event (151 here).
    assert stored > 50
    assert 0 < len(opened) <= 10


def test_a_run_launched_by_the_daemon_keeps_its_connections_once_its_steps_start(
    tmp_path, monkeypatch, simulator, state_dir, postgres_url
) -> None:
    # As a run worker executes a run the daemon launched: the job itself, not through sync_now.
    # Only the events recorded before the first step are stored one connection each.
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    job = definitions(config).resolve_job_def(sync_job_name(integration))
    with dg.instance_for_test(overrides=postgres_storage(postgres_url)) as instance:
        with dagster_connections_opened() as opened:
            result = job.execute_in_process(
                instance=instance,
                asset_selection=integration_asset_keys(integration),
                partition_key=SIM_PARTITIONS[0],
            )
        assert result.success
        events = instance.all_logs(result.run_id)
    started = next(
        event.timestamp
        for event in events
        if event.dagster_event and event.dagster_event.event_type_value == "STEP_START"
    )
    # From the first step on: a few connections (one per storage, some spare), not one or two
    # per event (about 95 here otherwise).
    assert len([event for event in events if event.timestamp > started]) > 20
    assert 0 < len([moment for moment in opened if moment > started]) <= 10


def postgres_storage(postgres_url: str) -> dict[str, Any]:
    """Instance settings for Dagster's storage in the test database (through psycopg2)."""
    return {
        "storage": {"postgres": {"postgres_url": postgres_url.replace("+psycopg:", "+psycopg2:")}}
    }
