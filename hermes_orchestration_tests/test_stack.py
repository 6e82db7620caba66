"""Production on one machine: the code server, webserver and daemon on PostgreSQL, for real.

The stack (``stack.py``) runs the project's ``dagster.yaml`` and ``deploy/workspace.yaml`` against
databases of its own in the local PostgreSQL, with the bundled simulator as the Hermes site. Runs
here are launched by the daemon from a schedule tick or through the webserver's GraphQL API, as
the UI does, and are executed by run workers that the code server starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from hermes_orchestration.simulator_data import ClientDataset
from hermes_orchestration_tests.stack import (
    DISABLED,
    INTEGRATIONS,
    LOCATION,
    MANUAL,
    MASTER_DATABASES,
    PARTITION_DAYS,
    REPOSITORY,
    ROOT,
    SCHEDULED,
    TOKEN,
    Stack,
    StackError,
)

pytest_plugins = ["hermes_orchestration_tests.stack"]  # the dagster_stack fixture
pytestmark = [pytest.mark.stack, pytest.mark.postgres]

ASSETS = ("raw_clients", "validated_clients", "master_data")

LAUNCH_RUN = """
mutation Launch($params: ExecutionParams!) {
  launchRun(executionParams: $params) {
    __typename
    ... on LaunchRunSuccess { run { runId status tags { key value } } }
    ... on PythonError { message }
    ... on InvalidSubsetError { message }
    ... on RunConfigValidationInvalid { errors { message } }
  }
}
"""

SCHEDULE_TICKS = """
query Ticks($selector: ScheduleSelector!) {
  scheduleOrError(scheduleSelector: $selector) {
    __typename
    ... on Schedule { scheduleState { status ticks(limit: 10) { status runIds } } }
  }
}
"""


def materialize_like_the_ui(stack: Stack, integration: str, partition: str) -> dict:
    """Launch what the UI's Materialize button launches: the assets and a partition, no tags."""
    params = {
        "selector": {
            "repositoryLocationName": LOCATION,
            "repositoryName": REPOSITORY,
            "jobName": "__ASSET_JOB",
            "assetSelection": [{"path": ["hermes", integration, name]} for name in ASSETS],
        },
        "runConfigData": {},
        "executionMetadata": {"tags": [{"key": "dagster/partition", "value": partition}]},
    }
    result = stack.graphql(LAUNCH_RUN, params=params)["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", stack.explain(f"launch failed: {result}")
    run = result["run"]
    return {**run, "tags": {tag["key"]: tag["value"] for tag in run["tags"]}}


def test_a_run_launched_like_the_materialize_button_is_queued_tagged_and_waits_its_turn(
    dagster_stack: Stack,
) -> None:
    stack = dagster_stack
    first = materialize_like_the_ui(stack, MANUAL, stack.partition_key(1))
    second = materialize_like_the_ui(stack, MANUAL, stack.partition_key(2))

    # The tags are there as the runs enter the queue, before any of their code has run.
    for run in (first, second):
        assert run["status"] == "QUEUED"
        assert run["tags"]["integration"] == MANUAL
        assert run["tags"]["master_database"] == MASTER_DATABASES[MANUAL]

    done = stack.wait_for_runs_to_finish([first["runId"], second["runId"]], timeout=120)
    assert [run["status"] for run in done] == ["SUCCESS", "SUCCESS"], stack.explain(str(done))
    # One run of an integration at a time (its pool's limit): the second waited for the first.
    earlier, later = sorted(done, key=lambda run: run["startTime"])
    assert earlier["endTime"] <= later["startTime"], stack.explain(f"runs overlapped: {done}")


def test_a_schedule_tick_launches_runs_through_the_daemon_that_load_the_master_data(
    dagster_stack: Stack,
) -> None:
    stack = dagster_stack
    schedule = f"hermes_{SCHEDULED}_schedule"
    yesterday, today = stack.partition_key(PARTITION_DAYS - 1), stack.partition_key(PARTITION_DAYS)

    def first_syncs() -> dict[str, dict] | None:
        # The first tick syncs today's partition and yesterday's, closed since its last sync.
        finished: dict[str, dict] = {}
        for run in reversed(stack.runs({"dagster/schedule_name": schedule})):
            partition = run["tags"].get("dagster/partition")
            if run["status"] == "FAILURE":
                raise StackError(stack.explain(f"a scheduled run failed: {run}"))
            if run["status"] == "SUCCESS":
                finished.setdefault(partition, run)
        return finished if {yesterday, today} <= finished.keys() else None

    runs = stack.wait_for("the first schedule tick's runs to succeed", first_syncs, timeout=180)
    for run in runs.values():
        assert run["tags"]["integration"] == SCHEDULED
        assert run["tags"]["master_database"] == MASTER_DATABASES[SCHEDULED]
        selected = sorted(tuple(key["path"]) for key in run["assetSelection"])
        assert selected == sorted(("hermes", SCHEDULED, name) for name in ASSETS)

    selector = {
        "repositoryLocationName": LOCATION,
        "repositoryName": REPOSITORY,
        "scheduleName": schedule,
    }
    state = stack.graphql(SCHEDULE_TICKS, selector=selector)["scheduleOrError"]["scheduleState"]
    assert state["status"] == "RUNNING"
    launched = {run_id for tick in state["ticks"] for run_id in tick["runIds"]}
    assert {run["runId"] for run in runs.values()} <= launched

    # The master data is in PostgreSQL: every client the site served for the two days is either
    # a source of a contact or a rejected row, and nothing else is there.
    served = _served_ids(stack, yesterday, today)
    sources = {
        row[0]
        for row in stack.masterdata(
            "SELECT hermes_id FROM contact_sources WHERE integration = :i AND master_database = :m",
            i=SCHEDULED,
            m=MASTER_DATABASES[SCHEDULED],
        )
    }
    rejected = {
        row[0]
        for row in stack.masterdata(
            "SELECT hermes_id FROM rejected_clients WHERE integration = :i AND partition_key IN "
            "(:yesterday, :today) AND hermes_id IS NOT NULL",
            i=SCHEDULED,
            yesterday=yesterday,
            today=today,
        )
    }
    assert len(served) > 50
    assert sources | rejected == served
    assert sources, "the valid clients were loaded"
    (contacts, emails) = stack.masterdata(
        "SELECT count(*), count(DISTINCT email) FROM master_contacts WHERE master_database = :m",
        m=MASTER_DATABASES[SCHEDULED],
    )[0]
    assert contacts == emails > 0
    # Dagster's own history is in PostgreSQL too, in the stack's database.
    assert _dagster_runs_in_postgres(stack) >= len(runs)


def test_status_reads_the_history_of_the_stack(dagster_stack: Stack) -> None:
    stack = dagster_stack
    synced_by = stack.wait_for_materialization(["hermes", SCHEDULED, "master_data"], timeout=180)

    completed = stack.cli("status", "--json")
    assert completed.returncode == 0, stack.explain(completed.stdout + completed.stderr)
    cards = {card["name"]: card for card in json.loads(completed.stdout)["integrations"]}
    assert cards.keys() == set(INTEGRATIONS)
    scheduled = cards[SCHEDULED]
    assert scheduled["health"] == "ok"
    assert scheduled["master_database"] == MASTER_DATABASES[SCHEDULED]
    # The latest sync it reports is one the stack ran (or a later tick's).
    assert scheduled["last_successful_sync"]["run_id"] in {
        run["runId"] for run in stack.runs({"integration": SCHEDULED})
    }
    assert synced_by in {run["runId"] for run in stack.runs({"integration": SCHEDULED})}
    assert cards[DISABLED]["health"] == "paused"

    table = stack.cli("status")
    assert table.returncode == 0, table.stderr
    for name in INTEGRATIONS:
        assert name in table.stdout


def test_no_secret_reaches_a_log_or_the_event_log(dagster_stack: Stack) -> None:
    stack = dagster_stack
    for log in sorted(stack.log_dir.glob("*.log")):
        assert TOKEN not in log.read_text(errors="replace"), f"the App Token is in {log}"
    for path in Path(stack.env["DAGSTER_HOME"]).rglob("*"):
        if path.is_file():
            assert TOKEN not in path.read_text(errors="replace"), f"the App Token is in {path}"
    engine = sa.create_engine(_dagster_db_url(stack))
    try:
        with engine.connect() as conn:
            leaks = conn.execute(
                sa.text("SELECT count(*) FROM event_logs WHERE event LIKE :token"),
                {"token": f"%{TOKEN}%"},
            ).scalar_one()
    finally:
        engine.dispose()
    assert leaks == 0


PARTITION_STATS = """
query Stats($path: [String!]!) {
  assetNodeOrError(assetKey: {path: $path}) {
    __typename
    ... on AssetNode { partitionStats { numMaterialized numFailed } }
  }
}
"""


def test_pruning_old_runs_deletes_superseded_runs_and_keeps_the_assets_state(
    dagster_stack: Stack,
) -> None:
    stack = dagster_stack
    partition = stack.partition_key(6)
    older = materialize_like_the_ui(stack, MANUAL, partition)["runId"]
    newer = materialize_like_the_ui(stack, MANUAL, partition)["runId"]
    done = stack.wait_for_runs_to_finish([older, newer], timeout=120)
    assert [run["status"] for run in done] == ["SUCCESS", "SUCCESS"], stack.explain(str(done))
    stats = {name: stack.graphql(PARTITION_STATS, path=["hermes", MANUAL, name]) for name in ASSETS}

    def prune(*args: str) -> str:
        script = ROOT / "deploy" / "prune_runs.py"
        completed = subprocess.run(
            [sys.executable, str(script), "--older-than-days", "0", *args],
            env=stack.env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert completed.returncode == 0, completed.stdout + completed.stderr
        return completed.stdout

    listed = prune("--dry-run")
    assert f"would delete run {older}" in listed
    assert newer not in listed
    assert stack.run(older)["status"] == "SUCCESS", "a dry run deletes nothing"

    deleted = prune()
    assert f"deleted run {older}" in deleted
    with pytest.raises(StackError, match="RunNotFoundError"):
        stack.run(older)
    assert stack.run(newer)["status"] == "SUCCESS"
    # What the assets show is unchanged: each partition's latest materialization was kept.
    for name, before in stats.items():
        assert stack.graphql(PARTITION_STATS, path=["hermes", MANUAL, name]) == before


def _served_ids(stack: Stack, first: str, last: str) -> set[str]:
    assert stack.simulator_config is not None
    dataset = ClientDataset(stack.simulator_config)
    since, until = stack.window(first)[0], stack.window(last)[1]
    return {
        record["id"].strip()
        for record in dataset.window(since, until)
        if isinstance(record, dict) and isinstance(record.get("id"), str) and record["id"].strip()
    }


def _dagster_db_url(stack: Stack) -> str:
    env = stack.env
    url = sa.URL.create(
        "postgresql+psycopg",
        username=env["DAGSTER_PG_USER"],
        password=env["DAGSTER_PG_PASSWORD"] or None,
        host=env["DAGSTER_PG_HOST"],
        port=int(env["DAGSTER_PG_PORT"]),
        database=env["DAGSTER_PG_DB"],
    )
    return url.render_as_string(hide_password=False)


def _dagster_runs_in_postgres(stack: Stack) -> int:
    engine = sa.create_engine(_dagster_db_url(stack))
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text("SELECT count(*) FROM runs")).scalar_one()
    finally:
        engine.dispose()
