"""Asset jobs shared by every integration with the same calendar.

One job per integration would make loading the code location grow with the square of the number
of integrations (each job resolves its selection against every asset); a job per calendar keeps it
flat. Schedules and sensors target a shared job with the asset selection and tags of one
integration. The in-process executor runs the three I/O-bound steps of a sync in one process
instead of re-loading the code location for every step.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import dagster as dg

from hermes_orchestration.assets import integration_asset_keys
from hermes_orchestration.config import Integration
from hermes_orchestration.health import record_failure_summary
from hermes_orchestration.partitions import calendar_name


def sync_job_name(integration: Integration) -> str:
    """The name of the shared job that syncs ``integration``."""
    return f"hermes_sync_{calendar_name(integration)}"


def build_sync_jobs(
    integrations: Sequence[Integration],
) -> dict[str, dg.UnresolvedAssetJobDefinition]:
    """One sync job per calendar, keyed by job name."""
    keys_by_job: dict[str, list[dg.AssetKey]] = defaultdict(list)
    for integration in integrations:
        name = sync_job_name(integration)
        keys_by_job[name].extend(integration_asset_keys(integration))
    return {
        name: dg.define_asset_job(
            name=name,
            selection=dg.AssetSelection.assets(*keys),
            executor_def=dg.in_process_executor,
            hooks={record_failure_summary},
            description=(
                "Syncs Hermes integrations that share this calendar; schedules and sensors "
                "launch it for one integration at a time."
            ),
        )
        for name, keys in keys_by_job.items()
    }
