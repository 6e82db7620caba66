"""An integration of integrations.yaml becomes a working, partitioned asset chain.

Runs are real: Dagster executes the shared sync job against a temporary instance, the assets
fetch from the bundled simulator over HTTP, and the master data lands in SQLite or PostgreSQL.
"""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import dagster as dg
import pytest
import sqlalchemy as sa

from hermes_orchestration.assets import MASTER_DATA, RAW_CLIENTS, VALIDATED_CLIENTS
from hermes_orchestration.code_location import build_definitions
from hermes_orchestration.config import load_integrations
from hermes_orchestration.launch import sync_now
from hermes_orchestration.simulator import HermesSimulator
from hermes_orchestration_tests.conftest import SIM_PARTITIONS, TOKEN

SANTIAGO = ZoneInfo("America/Santiago")


def served(simulator: HermesSimulator, partition_key: str) -> list[dict]:
    """What the simulator serves for a daily partition in America/Santiago."""
    day = datetime.fromisoformat(partition_key).replace(tzinfo=SANTIAGO)
    return simulator.dataset.window(day, day + timedelta(days=1))


def served_ids(records: list[dict]) -> set[str]:
    return {
        record["id"].strip()
        for record in records
        if isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"].strip()
    }


def metadata_of(result: dg.ExecuteInProcessResult, key: dg.AssetKey) -> dict:
    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key == key:
            return {name: value.value for name, value in materialization.metadata.items()}
    raise AssertionError(f"{key.to_user_string()} was not materialized")


def table_rows(url: str, query: str, **params: object) -> list[tuple]:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [tuple(row) for row in conn.execute(sa.text(query), params)]
    finally:
        engine.dispose()


def test_definitions_give_each_integration_its_assets_checks_schedule_and_shared_job(
    integrations_file,
) -> None:
    integrations_file("tienda_norte", "tienda_sur")
    defs = build_definitions(load_integrations())
    graph = defs.resolve_asset_graph()
    for name in ("tienda_norte", "tienda_sur"):
        keys = {asset_key_str.to_user_string() for asset_key_str in graph.get_all_asset_keys()}
        for asset in (RAW_CLIENTS, VALIDATED_CLIENTS, MASTER_DATA):
            assert f"hermes/{name}/{asset}" in keys
        schedule = defs.resolve_schedule_def(f"hermes_{name}_schedule")
        assert schedule.execution_timezone == "America/Santiago"
        checks = {
            check.name
            for check in graph.asset_check_keys
            if check.asset_key == asset_key_for(name, VALIDATED_CLIENTS)
        }
        assert checks == {
            "reject_ratio_within_limit",
            "no_duplicate_ids",
            "required_fields_present",
        }
    # Both integrations share one calendar, hence one job.
    job_names = [
        job.name for job in defs.resolve_all_job_defs() if job.name.startswith("hermes_sync")
    ]
    assert len(job_names) == 1


def asset_key_for(name: str, asset: str) -> dg.AssetKey:
    return dg.AssetKey(["hermes", name, asset])


def run_partition(partition_key: str, *, instance: dg.DagsterInstance) -> dg.ExecuteInProcessResult:
    config = load_integrations()
    integration = config.integrations[0]
    return sync_now(build_definitions(config), integration, instance, first=partition_key)


@pytest.mark.parametrize("database", ["sqlite", "postgresql"])
def test_a_partition_lands_whole_and_every_served_client_is_accounted_for(
    database: str,
    request: pytest.FixtureRequest,
    integrations_file,
    state_dir,
    simulator,
    monkeypatch,
) -> None:
    integrations_file("tienda_test")
    if database == "postgresql":
        url = request.getfixturevalue("postgres_url")
        monkeypatch.setenv("HERMES_MASTERDATA_URL", url)
    else:
        url = f"sqlite:///{state_dir / 'masterdata.sqlite'}"
    partition = SIM_PARTITIONS[1]
    records = served(simulator, partition)
    assert len(records) > 500

    with dg.instance_for_test() as instance:
        result = run_partition(partition, instance=instance)
        assert result.success
        raw = metadata_of(result, asset_key_for("tienda_test", RAW_CLIENTS))
        validated = metadata_of(result, asset_key_for("tienda_test", VALIDATED_CLIENTS))
        loaded = metadata_of(result, asset_key_for("tienda_test", MASTER_DATA))
        run = instance.get_run_by_id(result.run_id)
        assert run.tags["integration"] == "tienda_test"
        assert run.tags["master_database"] == "clientes_test"

    assert raw["rows_fetched"] == len(records)
    assert validated["rows_valid"] + validated["rows_rejected"] + validated[
        "duplicates_dropped"
    ] == len(records)
    assert validated["rows_rejected"] > 0, "the dirty share should produce rejects"
    assert loaded["master_database"] == "clientes_test"

    sources = {
        row[0]
        for row in table_rows(
            url,
            "SELECT hermes_id FROM contact_sources WHERE integration = :i AND master_database = :m",
            i="tienda_test",
            m="clientes_test",
        )
    }
    rejected = {
        row[0]
        for row in table_rows(
            url,
            "SELECT hermes_id FROM rejected_clients WHERE integration = :i AND partition_key = :p",
            i="tienda_test",
            p=partition,
        )
        if row[0] is not None
    }
    assert sources | rejected == served_ids(records)
    assert not sources & rejected
    assert len(sources) == validated["rows_valid"]

    contacts = table_rows(
        url,
        "SELECT count(*), count(DISTINCT email) FROM master_contacts WHERE master_database = :m",
        m="clientes_test",
    )[0]
    assert contacts[0] == contacts[1] > 0
    (databases,) = table_rows(
        url, "SELECT count(*) FROM master_databases WHERE name = 'clientes_test'"
    )
    assert databases == (1,)


def test_running_a_partition_again_changes_nothing(integrations_file, state_dir) -> None:
    integrations_file("tienda_test")
    url = f"sqlite:///{state_dir / 'masterdata.sqlite'}"
    query = (
        "SELECT email, first_name, last_name, phone, updated_at, deleted_at, loaded_at "
        "FROM master_contacts ORDER BY email"
    )
    with dg.instance_for_test() as instance:
        first = run_partition(SIM_PARTITIONS[2], instance=instance)
        before = table_rows(url, query)
        second = run_partition(SIM_PARTITIONS[2], instance=instance)
    assert first.success and second.success
    again = metadata_of(second, asset_key_for("tienda_test", MASTER_DATA))
    assert again["contacts_inserted"] == again["contacts_updated"] == 0
    assert again["sources_inserted"] == again["sources_updated"] == 0
    assert table_rows(url, query) == before


def test_dagster_asset_materialize_from_the_command_line(
    integrations_file, state_dir, tmp_path: Path
) -> None:
    integrations_file("tienda_cli")
    home = tmp_path / "dagster_home"
    home.mkdir()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    completed = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "asset",
            "materialize",
            "-m",
            "hermes_orchestration.definitions",
            "--select",
            "hermes/tienda_cli/raw_clients,hermes/tienda_cli/validated_clients,hermes/tienda_cli/master_data",
            "--partition",
            SIM_PARTITIONS[0],
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert TOKEN not in completed.stdout + completed.stderr

    with dg.DagsterInstance.from_config(str(home)) as instance:
        records = instance.fetch_materializations(
            asset_key_for("tienda_cli", MASTER_DATA), limit=1
        ).records
        assert records and records[0].partition_key == SIM_PARTITIONS[0]
        run = instance.get_run_by_id(records[0].run_id)
        # Launched from the CLI with no tags: the run tags itself.
        assert run.tags["integration"] == "tienda_cli"
        metadata = records[0].asset_materialization.metadata
        assert metadata["master_database"].value == "clientes_test"
    contacts = table_rows(
        f"sqlite:///{state_dir / 'masterdata.sqlite'}", "SELECT count(*) FROM master_contacts"
    )
    assert contacts[0][0] > 0


def test_master_data_metadata_counts_rejected_rows_by_reason(integrations_file, state_dir) -> None:
    integrations_file("tienda_test")
    with dg.instance_for_test() as instance:
        result = run_partition(SIM_PARTITIONS[3], instance=instance)
    assert result.success
    validated = metadata_of(result, asset_key_for("tienda_test", VALIDATED_CLIENTS))
    loaded = metadata_of(result, asset_key_for("tienda_test", MASTER_DATA))
    assert loaded["rejected_by_reason"] == validated["rejected_by_reason"]
    assert sum(loaded["rejected_by_reason"].values()) >= loaded["rejected"] > 0
    assert loaded["contacts_deleted"] >= 0 and loaded["contacts_revived"] == 0


def test_too_many_rejects_stop_the_load_and_fail_the_run_naming_the_top_reasons(
    integrations_file, state_dir
) -> None:
    integrations_file("tienda_test", max_reject_ratio=0.001)
    with dg.instance_for_test() as instance:
        result = run_partition(SIM_PARTITIONS[0], instance=instance)
        assert not result.success
        checks = [
            event.event_specific_data
            for event in result.all_events
            if event.event_type_value == "ASSET_CHECK_EVALUATION"
            and event.event_specific_data.check_name == "reject_ratio_within_limit"
        ]
        assert len(checks) == 1 and not checks[0].passed
        assert "Top reasons:" in checks[0].description
        assert "invalid_email" in checks[0].description or "missing_email" in checks[0].description
        materialized = {
            event.event_specific_data.materialization.asset_key
            for event in result.get_asset_materialization_events()
        }
    assert asset_key_for("tienda_test", MASTER_DATA) not in materialized
    assert not (state_dir / "masterdata.sqlite").exists() or not table_rows(
        f"sqlite:///{state_dir / 'masterdata.sqlite'}",
        "SELECT 1 FROM contact_sources LIMIT 1",
    )
