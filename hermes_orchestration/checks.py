"""The health check of an integration: its card's health, shown on ``master_data`` in the UI.

Open-source Dagster has no asset health view, so each integration's health (ok, stale, error,
paused, never synced) is an asset check on its ``master_data``. The guard sensor keeps it current
by reporting an evaluation whenever the health changes or master data is loaded again; scheduled
syncs leave it out. A run launched from the UI or the CLI that materializes ``master_data``
evaluates it too (Dagster selects every check of the selected assets); it then reads the same
card from the instance, and never fails the run.
"""

# No `from __future__ import annotations`: Dagster inspects the context annotations at runtime.

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import (
    AssetCheckEvaluationTargetMaterializationData,
)

from hermes_orchestration.assets import MASTER_DATA, asset_key
from hermes_orchestration.config import Integration
from hermes_orchestration.health import Freshness, Health, IntegrationCard, integration_cards

logger = logging.getLogger(__name__)

HEALTH_CHECK = "health"
GUARD_SENSOR_NAME = "hermes_guard"  # sensors.py reports these checks


def health_check_key(integration: Integration) -> dg.AssetCheckKey:
    """The key of the health check of ``integration``."""
    return dg.AssetCheckKey(asset_key(integration, MASTER_DATA), HEALTH_CHECK)


@dataclass(frozen=True)
class Verdict:
    """A card's health as an asset check outcome."""

    passed: bool
    severity: dg.AssetCheckSeverity
    description: str
    metadata: dict[str, Any]


def _age(seconds: float) -> str:
    minutes = max(0, round(seconds / 60))
    if minutes < 60:
        return f"{minutes} min"
    hours = minutes / 60
    return f"{hours:.1f} h" if hours < 48 else f"{hours / 24:.1f} days"


def _window(duration: timedelta) -> str:
    minutes = round(duration.total_seconds() / 60)
    return f"{minutes // 60}h" if minutes % 60 == 0 else f"{minutes}m"


def health_verdict(card: IntegrationCard, integration: Integration, now: float) -> Verdict:
    """Passed when ok and fresh; a warning when stale or paused; an error when failing."""
    warn = dg.AssetCheckSeverity.WARN
    error = dg.AssetCheckSeverity.ERROR
    metadata: dict[str, Any] = {
        "health": card.health.value,
        "switch": card.switch.label,
        "freshness": card.freshness.value if card.freshness else "none",
    }
    if card.last_sync_at is not None:
        metadata["last_successful_sync"] = dg.MetadataValue.timestamp(card.last_sync_at)
    if card.last_sync_run_id:
        metadata["last_successful_run_id"] = card.last_sync_run_id
    if card.last_error_run_id:
        metadata["last_error_run_id"] = card.last_error_run_id
    since = (
        f"last successful sync {_age(now - card.last_sync_at)} ago"
        if card.last_sync_at is not None
        else "never synced"
    )
    if card.health == Health.PAUSED:
        description = f"{card.switch.label}: {card.switch.reason} ({since})"
        return Verdict(False, warn, description, metadata)
    if card.health == Health.ERROR:
        error_text = card.last_error or "see the run's logs"
        description = f"error: run {card.last_error_run_id} failed: {error_text} ({since})"
        return Verdict(False, error, description, metadata)
    if card.health == Health.NEVER_SYNCED:
        running = f"; run {card.running_run_id} is syncing it now" if card.running_run_id else ""
        return Verdict(
            False, warn, f"never synced: no run has loaded master data yet{running}", metadata
        )
    limits = integration.freshness
    if card.freshness == Freshness.FAIL:
        description = f"stale: {since}, past fail_after ({_window(limits.fail_after)})"
        return Verdict(False, error, description, metadata)
    if card.freshness == Freshness.WARN:
        description = f"stale: {since}, past warn_after ({_window(limits.warn_after)})"
        return Verdict(False, warn, description, metadata)
    return Verdict(True, warn, f"ok: {since} (run {card.last_sync_run_id})", metadata)


def health_evaluation(
    card: IntegrationCard, integration: Integration, now: float
) -> dg.AssetCheckEvaluation:
    """The verdict as an evaluation reported outside any run (by the guard sensor)."""
    verdict = health_verdict(card, integration, now)
    target = None
    if card.last_sync_storage_id is not None and card.last_sync_run_id and card.last_sync_at:
        # Tied to the latest materialization: the UI shows a check evaluated against older data
        # as not evaluated at all.
        target = AssetCheckEvaluationTargetMaterializationData(
            storage_id=card.last_sync_storage_id,
            run_id=card.last_sync_run_id,
            timestamp=card.last_sync_at,
        )
    return dg.AssetCheckEvaluation(
        asset_key=asset_key(integration, MASTER_DATA),
        check_name=HEALTH_CHECK,
        passed=verdict.passed,
        severity=verdict.severity,
        description=verdict.description,
        metadata=verdict.metadata,
        target_materialization_data=target,
    )


def build_health_checks(integrations: Sequence[Integration]) -> dg.AssetChecksDefinition:
    """The health checks of all integrations, one on each ``master_data``.

    One definition for all (subsettable): a thousand checks as a thousand ops would make loading
    the code location a fifth slower.
    """
    by_key = {health_check_key(integration): integration for integration in integrations}

    @dg.multi_asset_check(
        name="hermes_health",
        specs=[
            dg.AssetCheckSpec(
                HEALTH_CHECK,
                asset=key.asset_key,
                blocking=False,
                description=_description(integration),
            )
            for key, integration in by_key.items()
        ],
        can_subset=True,
    )
    def hermes_health(context: dg.AssetCheckExecutionContext) -> Iterator[dg.AssetCheckResult]:
        selected = [by_key[key] for key in by_key if key in context.selected_asset_check_keys]
        now = time.time()
        try:
            cards = integration_cards(context.instance, selected, now=now)
        except Exception as err:
            logger.warning("health could not be computed: %s", err)
            for integration in selected:
                yield dg.AssetCheckResult(
                    asset_key=health_check_key(integration).asset_key,
                    check_name=HEALTH_CHECK,
                    passed=False,
                    severity=dg.AssetCheckSeverity.WARN,
                    description=f"health could not be computed here ({type(err).__name__}); "
                    f"the {GUARD_SENSOR_NAME} sensor reports it on its next tick",
                )
            return
        for card, integration in zip(cards, selected, strict=True):
            verdict = health_verdict(card, integration, now)
            yield dg.AssetCheckResult(
                asset_key=health_check_key(integration).asset_key,
                check_name=HEALTH_CHECK,
                passed=verdict.passed,
                severity=verdict.severity,
                description=verdict.description,
                metadata=verdict.metadata,
            )

    return hermes_health


def _description(integration: Integration) -> str:
    limits = integration.freshness
    return (
        f"Health of {integration.display_name}: ok; stale (a warning after "
        f"{_window(limits.warn_after)} without a successful sync, an error after "
        f"{_window(limits.fail_after)}); error (the latest sync failed); paused; or never synced. "
        f"Kept current by the {GUARD_SENSOR_NAME} sensor."
    )
