"""One schedule per integration, from its cron in its time zone, targeting the shared sync job.

A tick of a paused integration requests nothing and says why in the schedule's tick history:
stopping a schedule from code is not public Dagster API, so the pause is enforced where runs
are requested.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime

import dagster as dg

from hermes_orchestration.assets import (
    MASTER_DATA,
    REJECT_RATIO_CHECK,
    REQUIRED_FIELDS_CHECK,
    UNIQUE_IDS_CHECK,
    VALIDATED_CLIENTS,
    asset_key,
    integration_asset_keys,
    run_tags,
)
from hermes_orchestration.config import Integration
from hermes_orchestration.partitions import partitions_def_for
from hermes_orchestration.switch import effective_switch, pause_message, read_switch


def schedule_name(integration: Integration) -> str:
    """``hermes_<name>_schedule``."""
    return f"hermes_{integration.name}_schedule"


def partitions_to_sync(
    instance: dg.DagsterInstance, integration: Integration, now: float
) -> list[str]:
    """The current partition, and the previous one until a sync of it ran after it closed.

    Clients changed late in a window are only complete once the window has closed, so the
    previous partition is synced once more by the first tick after its end.
    """
    partitions_def = partitions_def_for(integration)
    keys = partitions_def.get_partition_keys(current_time=datetime.fromtimestamp(now, tz=UTC))
    if not keys:
        return []
    current, previous = keys[-1], keys[-2] if len(keys) > 1 else None
    wanted = [current]
    if previous is not None and not _synced_after_close(instance, integration, previous):
        wanted.insert(0, previous)
    return wanted


def _synced_after_close(
    instance: dg.DagsterInstance, integration: Integration, partition_key: str
) -> bool:
    window = partitions_def_for(integration).time_window_for_partition_key(partition_key)
    result = instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=asset_key(integration, MASTER_DATA), asset_partitions=[partition_key]
        ),
        limit=1,
    )
    if not result.records:
        return False
    run = instance.get_run_record_by_id(result.records[0].run_id)
    started = run.start_time if run and run.start_time else result.records[0].timestamp
    return started >= window.end.timestamp()


def sync_check_keys(integration: Integration) -> list[dg.AssetCheckKey]:
    """The checks a scheduled sync runs: the validation checks, not the health check.

    The health check is the guard sensor's to report; left to Dagster's default, every check of
    the selected assets would run in each sync.
    """
    validated = asset_key(integration, VALIDATED_CLIENTS)
    return [
        dg.AssetCheckKey(validated, name)
        for name in (REJECT_RATIO_CHECK, UNIQUE_IDS_CHECK, REQUIRED_FIELDS_CHECK)
    ]


def build_schedule(
    integration: Integration, job: dg.UnresolvedAssetJobDefinition
) -> dg.ScheduleDefinition:
    """The schedule of ``integration``: stopped from the start when the YAML disables it."""
    selection = integration_asset_keys(integration)
    checks = sync_check_keys(integration)
    tags = run_tags(integration)

    @dg.schedule(
        name=schedule_name(integration),
        job=job,
        cron_schedule=integration.schedule,
        execution_timezone=integration.timezone,
        default_status=(
            dg.DefaultScheduleStatus.RUNNING
            if integration.enabled
            else dg.DefaultScheduleStatus.STOPPED
        ),
        description=(
            f"Syncs {integration.display_name} ({integration.schedule}, {integration.timezone})."
        ),
        tags=tags,
    )
    def _schedule(context: dg.ScheduleEvaluationContext) -> Iterator[dg.RunRequest | dg.SkipReason]:
        if not integration.enabled:
            yield dg.SkipReason(
                f"integration '{integration.name}' is disabled in integrations.yaml "
                "(enabled: false); set it to true in a pull request to resume"
            )
            return
        switch = effective_switch(integration, read_switch(context.instance, integration.name))
        if switch.paused:
            yield dg.SkipReason(
                f"{pause_message(integration.name, switch)}. Nothing is synced until "
                f"`hermes-orchestration resume {integration.name}` (or the hermes_switch job)"
            )
            return
        now = context.scheduled_execution_time.timestamp()
        for key in partitions_to_sync(context.instance, integration, now):
            yield dg.RunRequest(
                run_key=f"{integration.name}:{key}:{int(now)}",
                partition_key=key,
                asset_selection=selection,
                asset_check_keys=checks,
                tags=tags,
            )

    return _schedule
