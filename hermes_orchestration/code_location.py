"""How integrations.yaml becomes Dagster definitions, without loading any file.

Per integration: its three assets and their checks, and its schedule. Shared by all: the sync
jobs (one per calendar), the health checks (one definition), the guard sensor, and the
hermes_verify and hermes_switch jobs that people launch from the UI. Callers that already hold a
parsed configuration (the CLI, tests, benchmarks) build from it here, so importing this module
does not build the shipped file's definitions a second time.
"""

from __future__ import annotations

import warnings

import dagster as dg

from hermes_orchestration.assets import build_integration_assets
from hermes_orchestration.checks import build_health_checks
from hermes_orchestration.collection import collection_paused
from hermes_orchestration.config import IntegrationsConfig
from hermes_orchestration.jobs import build_sync_jobs, sync_job_name
from hermes_orchestration.operations import build_operation_jobs
from hermes_orchestration.resources import HermesApiResource, MasterDataResource, StagingResource
from hermes_orchestration.schedules import build_schedule
from hermes_orchestration.sensors import build_guard_sensor


def build_definitions(config: IntegrationsConfig) -> dg.Definitions:
    """All integrations' assets, checks and schedules, the shared jobs and sensor, the resources."""
    # The single-run backfill policy is beta: one warning per asset would flood every load.
    with collection_paused(), warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        warnings.simplefilter("ignore", category=dg.PreviewWarning)
        jobs = build_sync_jobs(config.integrations)
        per_integration = [
            dg.Definitions(
                assets=build_integration_assets(integration),
                schedules=[build_schedule(integration, jobs[sync_job_name(integration)])],
            )
            for integration in config.integrations
        ]
        return dg.Definitions.merge(
            *per_integration,
            dg.Definitions(
                asset_checks=[build_health_checks(config.integrations)]
                if config.integrations
                else [],
                jobs=[*jobs.values(), *build_operation_jobs(config)],
                sensors=[build_guard_sensor(config)],
                resources={
                    "hermes_api": HermesApiResource(),
                    "masterdata": MasterDataResource(),
                    "staging": StagingResource(),
                },
                executor=dg.in_process_executor,
            ),
        )
