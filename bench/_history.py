"""Run history for the health-view benchmark, made fast from real runs.

Executing 10,000 real syncs would take hours, so two real runs serve as templates: a successful
sync and a failed one (an App Token the site refuses), executed for real against the simulator.
Every Dagster event of a template (run start and end, step events, asset materializations and
their planned events, asset check evaluations, failures with their error) is copied into new
runs for other integrations and partitions: the serialized run and events get the new run id,
integration name and partition key, and their times are shifted so that every integration has a
history spread over days. The copies go through the instance's own ``add_run`` and
``handle_new_event``, so run records, asset records, check records and every index are what real
runs leave. Plain log messages (not Dagster events) are not copied.

Speed-ups that leave the stored result unchanged: worker processes working in parallel, each
copying a chunk of the runs (a chunk whose process is interrupted is resumed, not duplicated:
``--resume``); on PostgreSQL, pooled connections (the instance's
``optimize_for_webserver``, as the webserver does) instead of one new connection per event; on
SQLite, each run's event database copied from an initialized empty one instead of being created
(tables and alembic stamp) on its first event.

    python bench/_history.py --home H --success-run ID --failure-run ID ...   (run by health_view)
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import dagster as dg
from dagster._core.events.log import EventLogEntry
from dagster._core.storage.event_log.sqlite.sqlite_event_log import SqliteEventLogStorage
from dagster_shared.serdes import deserialize_value, serialize_value

RUN_SPACING_SECONDS = 6 * 3600  # between two runs of one integration


@dataclass(frozen=True)
class Template:
    """A real run to copy: its serialized run and events, and the names they mention."""

    run_id: str
    integration: str
    partition: str
    run_json: str
    events_json: list[str]
    timestamps: list[float]  # of the events, in order
    failed: bool

    @classmethod
    def read(
        cls, instance: dg.DagsterInstance, run_id: str, integration: str, partition: str
    ) -> Template:
        """Read a finished run and its Dagster events from the instance."""
        run = instance.get_run_by_id(run_id)
        if run is None:
            raise ValueError(f"template run {run_id} is not in the instance")
        entries = [entry for entry in instance.all_logs(run_id) if entry.is_dagster_event]
        return cls(
            run_id=run_id,
            integration=integration,
            partition=partition,
            run_json=serialize_value(run),
            events_json=[serialize_value(entry) for entry in entries],
            timestamps=[entry.timestamp for entry in entries],
            failed=run.status == dg.DagsterRunStatus.FAILURE,
        )

    def copy_text(self, text: str, run_id: str, integration: str, partition: str) -> str:
        """``text`` with the template's run id, integration and partition replaced."""
        return (
            text.replace(self.run_id, run_id)
            .replace(self.integration, integration)
            .replace(self.partition, partition)
        )


def add_copy(
    instance: dg.DagsterInstance,
    template: Template,
    *,
    integration: str,
    partition: str,
    ends_at: float,
) -> str:
    """Store one run copied from ``template`` for ``integration`` and ``partition``, ending at
    ``ends_at`` (epoch seconds); returns its run id."""
    run_id = str(uuid.uuid4())
    _prepare_sqlite_shard(instance, run_id)
    run = deserialize_value(
        template.copy_text(template.run_json, run_id, integration, partition), dg.DagsterRun
    )
    # The run starts out not started; its copied lifecycle events set its status and times.
    instance.add_run(run.with_status(dg.DagsterRunStatus.NOT_STARTED))
    shift = ends_at - template.timestamps[-1]
    for text, timestamp in zip(template.events_json, template.timestamps, strict=True):
        entry = deserialize_value(
            template.copy_text(text, run_id, integration, partition), EventLogEntry
        )
        instance.handle_new_event(entry._replace(timestamp=timestamp + shift))
    return run_id


_EMPTY_SHARDS: dict[int, Path] = {}


def _prepare_sqlite_shard(instance: dg.DagsterInstance, run_id: str) -> None:
    """On SQLite storage, give a new run its event database as a copy of an initialized one."""
    storage = instance.event_log_storage
    if not isinstance(storage, SqliteEventLogStorage):
        return
    empty = _EMPTY_SHARDS.get(id(storage))
    if empty is None:
        # Next to the instance's folder (not in it: a database there would look like a run's),
        # so that it goes away with the folder that holds the instance.
        folder = Path(instance.root_directory).parent / f"empty_shard_{uuid.uuid4().hex[:8]}"
        with SqliteEventLogStorage(str(folder))._connect("empty"):
            pass
        empty = _EMPTY_SHARDS[id(storage)] = folder / "empty.db"
    shutil.copyfile(empty, storage.path_for_shard(run_id))
    storage._initialized_dbs.add(run_id)


def fails(integration_index: int, run_index: int) -> bool:
    """One run in ten fails; for one integration in ten the latest run is a failure."""
    return (integration_index * 7 + run_index) % 10 == 0


def plan(integrations: int, runs: int) -> list[tuple[int, int]]:
    """``(integration index, run index)`` of every run to copy: ``runs`` spread evenly."""
    per_integration = -(-runs // integrations)
    slots = [(i, k) for k in range(per_integration) for i in range(integrations)]
    return slots[:runs]


def copy_runs(
    instance: dg.DagsterInstance,
    *,
    success: Template,
    failure: Template,
    integrations: Sequence[str],
    slots: Sequence[tuple[int, int]],
    runs_per_integration: int,
    first_partition: date,
    now: float,
    resume: bool = False,
) -> tuple[int, int]:
    """Copy the runs of ``slots``; (runs copied, failed runs among the slots).

    Run ``k`` of an integration syncs ``first_partition + k`` and ends ``RUN_SPACING_SECONDS``
    times its distance from the latest run before ``now``. With ``resume``, slots whose run is
    already stored and finished are skipped, and a run left unfinished by an interrupted copy is
    deleted and copied again.
    """
    done = _finished_copies(instance, slots, first_partition) if resume else set()
    copied = failed = 0
    for integration_index, run_index in slots:
        template = failure if fails(integration_index, run_index) else success
        failed += template.failed
        partition = (first_partition + timedelta(days=run_index)).isoformat()
        if (integrations[integration_index], partition) in done:
            continue
        add_copy(
            instance,
            template,
            integration=integrations[integration_index],
            partition=partition,
            ends_at=now
            - (runs_per_integration - run_index) * RUN_SPACING_SECONDS
            + integration_index,
        )
        copied += 1
    return copied, failed


_FINISHED = frozenset({dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE})


def _finished_copies(
    instance: dg.DagsterInstance, slots: Sequence[tuple[int, int]], first_partition: date
) -> set[tuple[str, str]]:
    """(integration, partition) of the slots' runs already stored; deletes unfinished ones."""
    done: set[tuple[str, str]] = set()
    for run_index in sorted({run_index for _, run_index in slots}):
        partition = (first_partition + timedelta(days=run_index)).isoformat()
        for run in instance.get_runs(dg.RunsFilter(tags={"dagster/partition": partition})):
            if run.status in _FINISHED:
                done.add((run.tags.get("integration", ""), partition))
            else:
                instance.delete_run(run.run_id)
    return done


def worker(args: argparse.Namespace) -> dict[str, int | float]:
    """Copy the runs of slots ``args.first_slot`` .. ``args.last_slot`` (excluded)."""
    instance = dg.DagsterInstance.from_config(args.home)
    try:
        # Pooled connections, as the webserver holds them (only PostgreSQL storage uses this).
        instance.optimize_for_webserver(statement_timeout=0, pool_recycle=3600, max_overflow=2)
        success = Template.read(instance, args.success_run, args.success_name, args.partition)
        failure = Template.read(instance, args.failure_run, args.failure_name, args.partition)
        names = [f"{args.prefix}{index:04d}" for index in range(args.integrations)]
        slots = plan(args.integrations, args.runs)[args.first_slot : args.last_slot]
        started = time.perf_counter()
        copied, failed = copy_runs(
            instance,
            success=success,
            failure=failure,
            integrations=names,
            slots=slots,
            runs_per_integration=-(-args.runs // args.integrations),
            first_partition=date.fromisoformat(args.first_partition),
            now=args.now,
            resume=args.resume,
        )
        return {
            "runs": len(slots),
            "copied": copied,
            "failed_runs": failed,
            "events_per_success_run": len(success.events_json),
            "events_per_failed_run": len(failure.events_json),
            "seconds": round(time.perf_counter() - started, 1),
        }
    finally:
        instance.dispose()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", required=True, help="DAGSTER_HOME holding the template runs")
    parser.add_argument("--success-run", required=True)
    parser.add_argument("--success-name", required=True)
    parser.add_argument("--failure-run", required=True)
    parser.add_argument("--failure-name", required=True)
    parser.add_argument("--partition", required=True, help="the templates' partition key")
    parser.add_argument("--prefix", default="tienda_", help="integration names: <prefix>0000..")
    parser.add_argument("--integrations", type=int, required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--first-partition", required=True)
    parser.add_argument("--now", type=float, required=True)
    parser.add_argument("--first-slot", type=int, default=0, help="first run of plan() to copy")
    parser.add_argument("--last-slot", type=int, default=None, help="end of the slots (excluded)")
    parser.add_argument(
        "--resume", action="store_true", help="skip runs already copied (after an interruption)"
    )
    json.dump(worker(parser.parse_args()), sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
