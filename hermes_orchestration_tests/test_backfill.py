"""Backfills from the UI, and what every run leaves behind: its tags and its logs.

A range of partitions backfilled from the UI is one run (single-run backfill policy) that gives
exactly the master data of partition-by-partition runs. The UI path is the real one: the GraphQL
mutation the UI sends, the backfill daemon's iteration, and the run launched in process.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import dagster as dg
import sqlalchemy as sa
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster_graphql.client.query import LAUNCH_PARTITION_BACKFILL_MUTATION
from dagster_graphql.test.utils import execute_dagster_graphql, materialize_assets

from hermes_orchestration.assets import integration_asset_keys
from hermes_orchestration.simulator import Faults, HermesSimulator, SimulatorConfig
from hermes_orchestration_tests.conftest import SIM_END, SIM_PARTITIONS, SIM_START, TOKEN
from hermes_orchestration_tests.faults_support import fresh_postgres
from hermes_orchestration_tests.operations_support import definitions, sync, write_integrations

IN_PROCESS_LAUNCHES = {
    "run_coordinator": {
        "module": "dagster._core.run_coordinator",
        "class": "DefaultRunCoordinator",
    },
    "run_launcher": {
        "module": "dagster._core.launcher.sync_in_memory_run_launcher",
        "class": "SyncInMemoryRunLauncher",
    },
}
# Columns that record when a row was written, not what it holds.
LOAD_TIME_COLUMNS = {"id", "contact_id", "loaded_at", "rejected_at"}


@contextmanager
def ui_workspace(tmp_path: Path, instance: dg.DagsterInstance) -> Iterator[WorkspaceProcessContext]:
    """The code location as the webserver and daemon load it, in this process."""
    module = tmp_path / "code_location.py"
    module.write_text(
        "from hermes_orchestration.config import load_integrations\n"
        "from hermes_orchestration.definitions import build_definitions\n\n"
        "defs = build_definitions(load_integrations())\n",
        encoding="utf-8",
    )
    origin = InProcessCodeLocationOrigin(LoadableTargetOrigin(python_file=str(module)))
    with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget([origin])) as context:
        yield context


def master_data(url: str) -> dict[str, list[tuple]]:
    """Every table of a master database, rows sorted, load times left out."""
    engine = sa.create_engine(url)
    try:
        metadata = sa.MetaData()
        metadata.reflect(engine)
        tables = {}
        with engine.connect() as conn:
            for name, table in sorted(metadata.tables.items()):
                if name == "master_databases":
                    continue  # only when each database was created and last loaded
                columns = [
                    column for column in table.columns if column.name not in LOAD_TIME_COLUMNS
                ]
                rows = conn.execute(sa.select(*columns)).all()
                tables[name] = sorted((tuple(row) for row in rows), key=repr)
        return tables
    finally:
        engine.dispose()


def test_a_range_backfilled_from_the_ui_is_one_run_equal_to_partition_by_partition_runs(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    by_range = f"sqlite:///{tmp_path / 'by_range.sqlite'}"
    one_by_one = f"sqlite:///{tmp_path / 'one_by_one.sqlite'}"

    with dg.instance_for_test(overrides=IN_PROCESS_LAUNCHES) as instance:
        monkeypatch.setenv("HERMES_MASTERDATA_URL", by_range)
        with ui_workspace(tmp_path, instance) as workspace:
            launched = execute_dagster_graphql(
                workspace.create_request_context(),
                LAUNCH_PARTITION_BACKFILL_MUTATION,
                variables={
                    "backfillParams": {
                        "assetSelection": [
                            key.to_graphql_input() for key in integration_asset_keys(integration)
                        ],
                        "partitionNames": SIM_PARTITIONS,
                    }
                },
            )
            result = launched.data["launchPartitionBackfill"]
            assert result["__typename"] == "LaunchBackfillSuccess", result
            for _ in range(3):  # the daemon's iterations: plan, submit, complete
                errors = [
                    error
                    for error in execute_backfill_iteration(
                        workspace, logging.getLogger("backfill")
                    )
                    if error is not None
                ]
                assert errors == []
        (run,) = instance.get_runs()  # a year of partitions would still be one run
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["dagster/asset_partition_range_start"] == SIM_PARTITIONS[0]
        assert run.tags["dagster/asset_partition_range_end"] == SIM_PARTITIONS[-1]
        assert run.tags["integration"] == "tienda_norte"
        assert run.tags["master_database"] == "clientes_test"

        monkeypatch.setenv("HERMES_MASTERDATA_URL", one_by_one)
        defs = definitions(config)
        for partition in SIM_PARTITIONS:
            assert sync(defs, integration, instance, partition).success

    ranged, partitioned = master_data(by_range), master_data(one_by_one)
    assert ranged.keys() >= {"master_contacts", "contact_sources", "rejected_clients"}
    assert ranged["master_contacts"] and ranged["rejected_clients"]
    assert ranged == partitioned


def test_a_run_launched_from_the_ui_carries_the_integration_tags(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    with dg.instance_for_test(overrides=IN_PROCESS_LAUNCHES) as instance:
        with ui_workspace(tmp_path, instance) as workspace:
            # What the Materialize button sends: assets and a partition; asset tags are not
            # run tags, so the run is launched without them.
            (launched,) = materialize_assets(
                workspace.create_request_context(),
                integration_asset_keys(integration),
                partition_keys=[SIM_PARTITIONS[2]],
            )
        run_id = launched.data["launchPipelineExecution"]["run"]["runId"]
        run = instance.get_run_by_id(run_id)
        assert run.status == dg.DagsterRunStatus.SUCCESS
        assert run.tags["integration"] == "tienda_norte"
        assert run.tags["master_database"] == "clientes_test"
        tagged = instance.get_run_records(dg.RunsFilter(tags={"integration": "tienda_norte"}))
        assert [record.dagster_run.run_id for record in tagged] == [run_id]


def test_a_sync_run_logs_pages_retries_and_rejects(tmp_path, monkeypatch, state_dir) -> None:
    flaky = SimulatorConfig(
        clients=400,
        seed=11,
        start=SIM_START,
        end=SIM_END,
        dirty_share=0.2,
        tokens={TOKEN: ("clients:read",)},
        faults=Faults(error_rate=0.35),
    )
    with HermesSimulator(flaky) as site:
        site.start()
        config = write_integrations(
            tmp_path, monkeypatch, site, {"tienda_inestable": "page_size: 25"}
        )
        defs = definitions(config)
        with dg.instance_for_test() as instance:
            result = sync(defs, config.get("tienda_inestable"), instance, SIM_PARTITIONS[1])
            assert result.success
            messages = [record.user_message for record in instance.all_logs(result.run_id)]
        served = site.dataset.count(
            datetime.fromisoformat("2026-11-03T00:00:00-03:00"),
            datetime.fromisoformat("2026-11-04T00:00:00-03:00"),
        )
    # Progress: the first page, then at most a line every few seconds, and the whole at the end.
    progress = [message for message in messages if message.startswith("page ")]
    window = "of window [2026-11-03T00:00:00-03:00, 2026-11-04T00:00:00-03:00)"
    assert progress[0].startswith(f"page 1: 25 clients so far {window} (request id ")
    last = re.match(
        rf"page (\d+): (\d+) clients in all {re.escape(window)} \(request id ", progress[-1]
    )
    assert last, progress[-1]
    pages, clients = int(last[1]), int(last[2])
    assert clients == served and pages == -(-clients // 25)
    assert len(progress) < pages, "one log line per page costs as much as decoding the page"
    retries = [message for message in messages if "retrying in" in message]
    assert retries, "the flaky site should have made the client retry"
    assert all("attempt " in message and " s." in message for message in retries)
    assert any(message.startswith("rejected rows by reason: {") for message in messages)
    assert not any(TOKEN in message for message in messages)


def test_a_range_run_has_postgresql_measure_the_growing_tables_between_partitions(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    # Statistics of empty tables make the planner join a grown table by nested loops; a range
    # run refreshes them once the loaded rows pass a threshold (here: right after the first
    # merge, of one partition).
    monkeypatch.setattr("hermes_orchestration.sync.REFRESH_STATISTICS_ROWS", 1)
    monkeypatch.setattr("hermes_orchestration.sync.LOAD_GROUP_ROWS", 1)
    with fresh_postgres() as url:
        monkeypatch.setenv("HERMES_MASTERDATA_URL", url)
        config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_rango": ""})
        integration = config.get("tienda_rango")
        with dg.instance_for_test() as instance:
            result = sync(
                definitions(config), integration, instance, SIM_PARTITIONS[0], SIM_PARTITIONS[-1]
            )
        assert result.success
        engine = sa.create_engine(url)
        with engine.connect() as conn:
            stored = conn.scalar(sa.text("SELECT count(*) FROM contact_sources"))
            measured = conn.scalar(
                sa.text("SELECT reltuples FROM pg_class WHERE relname = 'contact_sources'")
            )
        engine.dispose()
    # Measured during the run, before its last partition: more than nothing, less than all.
    assert 0 < measured < stored
