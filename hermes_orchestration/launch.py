"""Run a sync of one integration now, in this process, recorded in the Dagster instance.

Used by ``hermes-orchestration sync``: the run lands in the instance that ``DAGSTER_HOME`` names,
so it shows in the UI's run history like any other, with the integration's tags.
"""

from __future__ import annotations

from datetime import UTC, datetime
from importlib import import_module

import dagster as dg

from hermes_orchestration import storage_connections
from hermes_orchestration.assets import integration_asset_keys
from hermes_orchestration.config import Integration
from hermes_orchestration.jobs import sync_job_name
from hermes_orchestration.partitions import partitions_def_for
from hermes_orchestration.tags import FULL_SYNC_TAG, run_tags


def current_partition_key(integration: Integration, now: datetime | None = None) -> str:
    """The partition that holds ``now`` (the open one), in the integration's calendar."""
    keys = partitions_def_for(integration).get_partition_keys(current_time=now or datetime.now(UTC))
    if not keys:
        raise ValueError(
            f"integration '{integration.name}' has no partition yet: its partitions start "
            f"{integration.partitions.start}"
        )
    return keys[-1]


def sync_now(
    defs: dg.Definitions,
    integration: Integration,
    instance: dg.DagsterInstance,
    *,
    first: str | None = None,
    last: str | None = None,
    full: bool = False,
) -> dg.ExecuteInProcessResult:
    """Sync partitions ``first``..``last`` (default: the current one) as one run.

    ``full`` validates and loads every partition even where nothing changed since its last sync.
    """
    first = first or current_partition_key(integration)
    last = last or first
    tags = dict(run_tags(integration))
    if full:
        tags[FULL_SYNC_TAG] = "true"
    if first == last:
        tags["dagster/partition"] = first
    else:
        tags["dagster/asset_partition_range_start"] = first
        tags["dagster/asset_partition_range_end"] = last
    job = defs.resolve_job_def(sync_job_name(integration))
    storage_connections.keep_connections(instance)  # before the run records its plan
    # What the steps run on (Arrow, the validators, the drivers; imported lazily so that the
    # processes that only read the definitions do without them): this process runs the steps
    # itself, so it imports them before the run starts, and the run's time is the sync's.
    import_module("hermes_orchestration.sync")
    return job.execute_in_process(
        instance=instance,
        asset_selection=integration_asset_keys(integration),
        tags=tags,
        raise_on_error=False,
    )
