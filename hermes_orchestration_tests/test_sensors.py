"""The guard sensor, evaluated against real Dagster instances with real run history.

Failed runs are real syncs that the session's simulator answered with 401 or 403; queued runs
are submitted the way the UI submits them (GraphQL, through the instance's run queue).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
from dagster._core.test_utils import in_process_test_workspace
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster_graphql.test.utils import materialize_assets

from hermes_orchestration.assets import integration_asset_keys, pool_name
from hermes_orchestration.schedules import schedule_name
from hermes_orchestration.sensors import (
    GUARD_SENSOR,
    MAX_HEALTH_REPORTS_PER_TICK,
    MAX_POOL_UPDATES_PER_TICK,
    REVERIFY_EVERY_SECONDS,
    TICK_SECONDS,
    build_guard_sensor,
)
from hermes_orchestration.switch import PausedBy, pause, read_switch
from hermes_orchestration.tags import FAILURE_TAG, HTTP_STATUS_TAG
from hermes_orchestration_tests.conftest import SCOPELESS_TOKEN, TOKEN
from hermes_orchestration_tests.operations_support import (
    WRONG_TOKEN,
    definitions,
    evaluate_guard,
    set_token,
    sync,
    write_integrations,
)

VERIFY_PATH = "/api/v1/verify"


class Clock:
    """The guard's notion of now, moved forward by the test."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def test_the_guard_runs_for_every_integration_from_the_start(
    tmp_path, monkeypatch, simulator
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_a": "", "tienda_b": ""})
    sensors = definitions(config).sensors
    assert [sensor.name for sensor in sensors] == [GUARD_SENSOR]  # one, not one per integration
    (guard,) = sensors
    assert guard.default_status == dg.DefaultSensorStatus.RUNNING
    assert guard.minimum_interval_seconds == TICK_SECONDS


def test_repeated_401s_pause_an_integration_until_its_token_verifies_again(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_rota": "auto_pause_after_failures: 2", "tienda_sana": ""},
        tokens={"tienda_rota": WRONG_TOKEN},
    )
    rota = config.get("tienda_rota")
    defs = definitions(config)
    clock = Clock()
    guard = build_guard_sensor(config, clock=clock)
    with dg.instance_for_test() as instance:
        first = sync(defs, rota, instance)
        assert not first.success
        tags = instance.get_run_by_id(first.run_id).tags
        assert tags[FAILURE_TAG] == "credentials" and tags[HTTP_STATUS_TAG] == "401"

        tick = evaluate_guard(instance, defs, sensor=guard)
        assert not read_switch(instance, "tienda_rota").paused  # one failure is not a pattern

        assert not sync(defs, rota, instance).success
        tick = evaluate_guard(instance, defs, sensor=guard, cursor=tick.cursor)
        state = read_switch(instance, "tienda_rota")
        assert state.paused and state.by == PausedBy.AUTO
        for advice in (
            "2 syncs in a row failed because the site refused the App Token (HTTP 401",
            "hermes-orchestration verify tienda_rota",
            "$HERMES_TOKEN_TIENDA_ROTA",
            "hermes-orchestration resume tienda_rota",
            "resumes by itself once verify passes",
        ):
            assert advice in state.reason
        assert tick.skip_message is not None
        assert tick.skip_message.startswith("paused tienda_rota automatically: 2 syncs in a row")
        assert not read_switch(instance, "tienda_sana").paused

        # Its schedule stops asking for runs, and says why.
        schedule = defs.resolve_schedule_def(schedule_name(rota))
        context = dg.build_schedule_context(
            instance=instance,
            scheduled_execution_time=datetime.now(UTC),
            repository_def=defs.get_repository_def(),
        )
        skipped = schedule.evaluate_tick(context)
        assert not skipped.run_requests
        assert skipped.skip_message is not None
        assert "paused automatically: 2 syncs in a row failed" in skipped.skip_message

        # Re-verified at most every 20 minutes: not on the next tick.
        verifications = simulator.stats.count(VERIFY_PATH)
        clock.now += TICK_SECONDS
        tick = evaluate_guard(instance, defs, sensor=guard, cursor=tick.cursor)
        assert simulator.stats.count(VERIFY_PATH) == verifications

        # 20 minutes on, the token is still refused: one verify call, and it stays paused.
        clock.now += REVERIFY_EVERY_SECONDS
        tick = evaluate_guard(instance, defs, sensor=guard, cursor=tick.cursor)
        assert simulator.stats.count(VERIFY_PATH) == verifications + 1
        assert tick.skip_message is not None
        assert "re-verified tienda_rota, still failing (AuthError)" in tick.skip_message
        state = read_switch(instance, "tienda_rota")
        assert state.paused and state.verified_at == clock.now
        assert state.last_verify is not None and "401" in state.last_verify

        # Someone fixes the token; the next re-verification switches the integration back on.
        set_token(monkeypatch, "tienda_rota", TOKEN)
        clock.now += REVERIFY_EVERY_SECONDS
        tick = evaluate_guard(instance, defs, sensor=guard, cursor=tick.cursor)
        assert tick.skip_message is not None
        assert tick.skip_message.startswith("resumed tienda_rota automatically: verify passed")
        assert not read_switch(instance, "tienda_rota").paused
        assert schedule.evaluate_tick(context).run_requests

        # The old failures do not count against it again.
        tick = evaluate_guard(instance, defs, sensor=guard, cursor=tick.cursor)
        assert not read_switch(instance, "tienda_rota").paused


def test_403s_count_and_other_failures_break_the_streak(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_sin_scope": "auto_pause_after_failures: 2"},
        tokens={"tienda_sin_scope": SCOPELESS_TOKEN},
    )
    integration = config.get("tienda_sin_scope")
    defs = definitions(config)
    with dg.instance_for_test() as instance:
        scope = sync(defs, integration, instance)
        assert instance.get_run_by_id(scope.run_id).tags[HTTP_STATUS_TAG] == "403"
        set_token(monkeypatch, "tienda_sin_scope", None)  # the variable goes missing: not a 401/403
        missing = sync(defs, integration, instance)
        assert instance.get_run_by_id(missing.run_id).tags[FAILURE_TAG] == "missing_token"
        set_token(monkeypatch, "tienda_sin_scope", SCOPELESS_TOKEN)
        assert not sync(defs, integration, instance).success

        tick = evaluate_guard(instance, defs)
        assert not read_switch(instance, "tienda_sin_scope").paused

        assert not sync(defs, integration, instance).success
        evaluate_guard(instance, defs, cursor=tick.cursor)
        state = read_switch(instance, "tienda_sin_scope")
        assert state.paused and "HTTP 403" in state.reason


def test_integrations_paused_by_hand_or_by_the_yaml_stay_paused(
    tmp_path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path, monkeypatch, simulator, {"tienda_manual": "", "tienda_apagada": "enabled: false"}
    )
    clock = Clock()
    guard = build_guard_sensor(config, clock=clock)
    verifications = simulator.stats.count(VERIFY_PATH)
    with dg.instance_for_test() as instance:
        pause(instance, config.get("tienda_manual"), reason="contract under review")
        cursor = None
        for _ in range(3):
            clock.now += REVERIFY_EVERY_SECONDS + 60
            tick = evaluate_guard(instance, sensor=guard, cursor=cursor)
            cursor = tick.cursor
        assert read_switch(instance, "tienda_manual").by == PausedBy.HAND
        assert tick.skip_message is not None
        assert "paused: tienda_apagada (by integrations.yaml), tienda_manual (by hand)" in (
            tick.skip_message
        )
    assert simulator.stats.count(VERIFY_PATH) == verifications  # nobody asked the site


def _code_location(tmp_path: Path) -> LoadableTargetOrigin:
    module = tmp_path / "code_location.py"
    module.write_text(
        "from hermes_orchestration.config import load_integrations\n"
        "from hermes_orchestration.definitions import build_definitions\n\n"
        "defs = build_definitions(load_integrations())\n",
        encoding="utf-8",
    )
    return LoadableTargetOrigin(python_file=str(module))


def test_queued_runs_of_paused_integrations_are_canceled_saying_why(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_activa": "", "tienda_pausada": "", "tienda_apagada": "enabled: false"},
    )
    defs = definitions(config)
    queue = {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"}
    with dg.instance_for_test(overrides={"run_coordinator": queue}) as instance:
        pause(instance, config.get("tienda_pausada"), reason="contract under review")
        runs = {}
        with in_process_test_workspace(instance, _code_location(tmp_path)) as workspace:
            for integration in config.integrations:
                # What the UI's Materialize button sends: the assets and a partition, no tags.
                (launched,) = materialize_assets(
                    workspace, integration_asset_keys(integration), partition_keys=["2026-11-03"]
                )
                run = launched.data["launchPipelineExecution"]["run"]
                assert run["status"] == "QUEUED", launched.data
                runs[integration.name] = run["runId"]

        tick = evaluate_guard(instance, defs)

        status = {name: instance.get_run_by_id(run_id).status for name, run_id in runs.items()}
        assert status == {
            "tienda_activa": dg.DagsterRunStatus.QUEUED,
            "tienda_pausada": dg.DagsterRunStatus.CANCELED,
            "tienda_apagada": dg.DagsterRunStatus.CANCELED,
        }
        assert tick.skip_message is not None
        assert (
            f"canceled queued run {runs['tienda_pausada']} of tienda_pausada" in tick.skip_message
        )

        def canceled_message(name: str) -> str:
            (record,) = instance.get_records_for_run(
                runs[name], of_type=dg.DagsterEventType.RUN_CANCELED
            ).records
            return record.event_log_entry.dagster_event.message

        assert canceled_message("tienda_pausada").startswith(
            "Canceled by the hermes_guard sensor: integration 'tienda_pausada' is paused by "
            "hand: contract under review."
        )
        assert "hermes-orchestration resume tienda_pausada" in canceled_message("tienda_pausada")
        assert "set enabled: true in integrations.yaml" in canceled_message("tienda_apagada")


def test_each_pool_gets_the_integrations_max_concurrent_runs_once(
    tmp_path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path, monkeypatch, simulator, {"tienda_a": "max_concurrent_runs: 3", "tienda_b": ""}
    )
    defs = definitions(config)
    # The pool the guard sets is the one the assets claim.
    graph = defs.resolve_asset_graph()
    for integration in config.integrations:
        for key in integration_asset_keys(integration):
            assert graph.get(key).pools == {pool_name(integration)}
    with dg.instance_for_test() as instance:
        first = evaluate_guard(instance, defs)
        limits = {limit.name: limit.limit for limit in instance.event_log_storage.get_pool_limits()}
        assert limits == {"hermes_tienda_a": 3, "hermes_tienda_b": 1}
        assert first.skip_message is not None
        assert "set pool limits from max_concurrent_runs" in first.skip_message
        second = evaluate_guard(instance, defs, cursor=first.cursor)
        assert second.skip_message is not None
        assert "pool" not in second.skip_message


def test_the_health_check_is_reported_when_it_changes(
    tmp_path, monkeypatch, simulator, state_dir
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    integration = config.get("tienda_norte")
    defs = definitions(config)
    with dg.instance_for_test() as instance:
        first = evaluate_guard(instance, defs)
        assert [event.description for event in first.asset_events] == [
            "never synced: no run has loaded master data yet"
        ]
        quiet = evaluate_guard(instance, defs, cursor=first.cursor)
        assert quiet.asset_events == []
        assert quiet.skip_message == "nothing to do for 1 integration(s)"

        # A scheduled sync leaves the check out; the next tick reports it, tied to the new data.
        assert sync(defs, integration, instance).success
        after_sync = evaluate_guard(instance, defs, cursor=quiet.cursor)
        (evaluation,) = after_sync.asset_events
        assert evaluation.passed
        assert evaluation.description.startswith("ok: last successful sync 0 min ago")
        latest = instance.get_asset_records([evaluation.asset_key])[0].asset_entry
        assert evaluation.target_materialization_data is not None
        assert evaluation.target_materialization_data.storage_id == (
            latest.last_materialization_storage_id
        )


def test_a_tick_does_a_bounded_amount_of_work_however_many_integrations_there_are(
    tmp_path, monkeypatch, simulator
) -> None:
    names = [f"tienda_{index:03d}" for index in range(MAX_HEALTH_REPORTS_PER_TICK + 10)]
    config = write_integrations(tmp_path, monkeypatch, simulator, dict.fromkeys(names, ""))
    guard = build_guard_sensor(config)
    with dg.instance_for_test() as instance:
        cursor, reported, pools = None, [], []
        for _ in range(3):
            tick = evaluate_guard(instance, sensor=guard, cursor=cursor)
            cursor = tick.cursor
            reported.append(len(tick.asset_events))
            pools.append(len(instance.event_log_storage.get_pool_limits()))
    assert reported == [MAX_HEALTH_REPORTS_PER_TICK, 10, 0]
    assert pools == [MAX_POOL_UPDATES_PER_TICK, 2 * MAX_POOL_UPDATES_PER_TICK, len(names)]
