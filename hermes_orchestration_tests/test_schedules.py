"""Each integration's schedule, evaluated against a real Dagster instance with real run history.

A tick syncs the current partition and the previous one until a sync of it has run after its
window closed; a paused integration's tick requests nothing and says why.
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import dagster as dg

from hermes_orchestration.assets import integration_asset_keys
from hermes_orchestration.checks import health_check_key
from hermes_orchestration.schedules import schedule_name, sync_check_keys
from hermes_orchestration.switch import pause, resume
from hermes_orchestration_tests.operations_support import definitions, sync, write_integrations

SANTIAGO = ZoneInfo("America/Santiago")
# A tick in the middle of the simulator's data: the current partition is 2026-11-05.
TICK_AT = datetime(2026, 11, 5, 10, 30, tzinfo=SANTIAGO)


def tick(
    defs: dg.Definitions, name: str, instance: dg.DagsterInstance, at: datetime = TICK_AT
) -> tuple[list[dg.RunRequest], str | None]:
    schedule = defs.resolve_schedule_def(schedule_name_of(name))
    context = dg.build_schedule_context(
        instance=instance, scheduled_execution_time=at, repository_def=defs.get_repository_def()
    )
    data = schedule.evaluate_tick(context)
    return list(data.run_requests or []), data.skip_message


def schedule_name_of(name: str) -> str:
    return f"hermes_{name}_schedule"


def test_the_schedule_follows_the_yaml_cron_and_time_zone(tmp_path, monkeypatch, simulator) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_norte": 'schedule: "*/30 * * * *"\n', "tienda_apagada": "enabled: false\n"},
    )
    defs = definitions(config)
    norte = defs.resolve_schedule_def(schedule_name(config.get("tienda_norte")))
    assert norte.cron_schedule == "*/30 * * * *"
    assert norte.execution_timezone == "America/Santiago"
    assert norte.default_status == dg.DefaultScheduleStatus.RUNNING
    apagada = defs.resolve_schedule_def(schedule_name(config.get("tienda_apagada")))
    assert apagada.default_status == dg.DefaultScheduleStatus.STOPPED


def test_a_tick_syncs_the_current_and_previous_partition_until_the_previous_closed_synced(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    defs = definitions(config)
    with dg.instance_for_test() as instance:
        requests, skipped = tick(defs, "tienda_norte", instance)
        assert skipped is None
        assert [request.partition_key for request in requests] == ["2026-11-04", "2026-11-05"]
        for request in requests:
            assert request.tags["integration"] == "tienda_norte"
            assert request.tags["master_database"] == "clientes_test"
            assert set(request.asset_selection or []) == set(integration_asset_keys(integration))
            # The validation checks run with the sync; the health check is the sensor's to report.
            assert request.asset_check_keys == sync_check_keys(integration)
            assert health_check_key(integration) not in request.asset_check_keys

        # A sync of 2026-11-04 that ran after the day closed: the next tick leaves it alone.
        assert sync(defs, integration, instance, "2026-11-04").success
        requests, _ = tick(defs, "tienda_norte", instance, TICK_AT + timedelta(minutes=30))
        assert [request.partition_key for request in requests] == ["2026-11-05"]


def test_the_previous_hour_is_synced_again_when_its_last_sync_ran_before_it_closed(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_horaria": "partitions: {granularity: hourly, start: 2026-11-01 00:00}\n"},
    )
    integration = config.get("tienda_horaria")
    defs = definitions(config)
    if 3600 - time.time() % 3600 < 60:
        time.sleep(61)  # the sync below must run inside the current hour
    hour = datetime.fromtimestamp(time.time() // 3600 * 3600, SANTIAGO)
    key = hour.strftime("%Y-%m-%d-%H:%M")
    with dg.instance_for_test() as instance:
        # The current hour is still open: this sync runs before it closes.
        assert sync(defs, integration, instance, key).success
        requests, _ = tick(defs, "tienda_horaria", instance, hour + timedelta(minutes=65))
        assert [request.partition_key for request in requests] == [
            key,
            (hour + timedelta(hours=1)).strftime("%Y-%m-%d-%H:%M"),
        ]


def test_a_paused_integration_ticks_without_a_run_and_says_why(
    tmp_path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path, monkeypatch, simulator, {"tienda_norte": "", "tienda_apagada": "enabled: false\n"}
    )
    defs = definitions(config)
    norte = config.get("tienda_norte")
    with dg.instance_for_test() as instance:
        pause(instance, norte, reason="the site is being migrated")
        requests, skipped = tick(defs, "tienda_norte", instance)
        assert requests == []
        assert skipped is not None
        assert "paused by hand: the site is being migrated" in skipped
        assert "hermes-orchestration resume tienda_norte" in skipped

        assert resume(instance, norte, force=True).ok
        requests, skipped = tick(defs, "tienda_norte", instance)
        assert skipped is None and len(requests) == 2

        # Started from the UI anyway, a schedule disabled in the YAML still requests nothing.
        requests, skipped = tick(defs, "tienda_apagada", instance)
        assert requests == []
        assert skipped is not None and "enabled: false" in skipped
