#!/usr/bin/env python
"""Delete old runs and their event logs, keeping every run that holds an asset's latest state.

Dagster keeps each run and its event log forever. Run this daily (cron, a Kubernetes CronJob)
with the environment of the instance (``DAGSTER_HOME`` and the ``DAGSTER_PG_*`` variables):

    python deploy/prune_runs.py --older-than-days 90            # delete
    python deploy/prune_runs.py --older-than-days 90 --dry-run  # only list what would go

A run is deleted when it ended more than N days ago, none of its materializations is the latest
one of its asset partition, and it is no asset's latest run: asset pages, partition status,
freshness, the schedules' look-ups and ``hermes-orchestration status`` read the same afterwards.
Queued and running runs are never touched.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import dagster as dg

log = logging.getLogger("prune_runs")

FINISHED = [dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED]
PAGE_SIZE = 200


def holds_latest_materialization(instance: dg.DagsterInstance, run_id: str) -> bool:
    """Whether a materialization of ``run_id`` is still the latest of its asset partition."""
    records = instance.get_records_for_run(
        run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION, limit=10_000
    ).records
    for record in records:
        event = record.event_log_entry.dagster_event
        if event is None or event.asset_key is None:
            continue
        partitions = [event.partition] if event.partition else None
        latest = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=event.asset_key, asset_partitions=partitions), limit=1
        ).records
        if latest and latest[0].run_id == run_id:
            return True
    return False


def prunable_runs(instance: dg.DagsterInstance, ended_before: datetime) -> list[str]:
    """Ids of the finished runs last updated before ``ended_before`` that hold no latest state."""
    # An asset's latest run (failed, say) is what the health view reports: it stays.
    latest_runs = {
        record.asset_entry.last_run_id
        for record in instance.get_asset_records()
        if record.asset_entry.last_run_id
    }
    found: list[str] = []
    cursor: str | None = None
    while True:
        # Collected first and deleted afterwards: a deleted run cannot serve as a page cursor.
        records = instance.get_run_records(
            dg.RunsFilter(statuses=FINISHED, updated_before=ended_before),
            limit=PAGE_SIZE,
            cursor=cursor,
            ascending=True,
        )
        if not records:
            return found
        for record in records:
            run_id = record.dagster_run.run_id
            if run_id not in latest_runs and not holds_latest_materialization(instance, run_id):
                found.append(run_id)
        cursor = records[-1].dagster_run.run_id


def prune(instance: dg.DagsterInstance, older_than: timedelta, *, dry_run: bool) -> list[str]:
    """Delete (or, with ``dry_run``, only list) the prunable runs older than ``older_than``."""
    run_ids = prunable_runs(instance, datetime.now(UTC) - older_than)
    for run_id in run_ids:
        if dry_run:
            log.info("would delete run %s", run_id)
        else:
            instance.delete_run(run_id)
            log.info("deleted run %s", run_id)
    verb = "would delete" if dry_run else "deleted"
    log.info("%s %d runs that ended more than %s ago", verb, len(run_ids), older_than)
    return run_ids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--older-than-days",
        type=float,
        required=True,
        help="delete runs that ended more than this many days ago (e.g. 90)",
    )
    parser.add_argument("--dry-run", action="store_true", help="list the runs, delete nothing")
    args = parser.parse_args(argv)
    if args.older_than_days < 0:
        parser.error("--older-than-days must be 0 or more")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    with dg.DagsterInstance.get() as instance:
        prune(instance, timedelta(days=args.older_than_days), dry_run=args.dry_run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
