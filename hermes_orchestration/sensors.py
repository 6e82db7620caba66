"""The guard sensor: one sensor that keeps every integration's switch in force.

On each tick, for all integrations at once and in a few batched reads of the instance, it

1. pauses an integration whose last N syncs in a row failed on its credentials (401/403; N is
   ``auto_pause_after_failures``), so that it stops hammering the site;
2. re-verifies each integration it paused, at most every 20 minutes, and switches it back on
   once verify passes (one paused by hand or by the YAML stays paused until a person acts);
3. cancels the queued runs of paused integrations, saying why in each run's log;
4. gives each integration's pool its ``max_concurrent_runs`` as limit;
5. reports each integration's health check on ``master_data`` when the health changes or master
   data is loaded again.

Everything it does is logged and summed up in the tick's skip reason, so the sensor's tick
history says what happened and why. It never requests runs.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import dagster as dg

from hermes_orchestration.assets import pool_name
from hermes_orchestration.checks import GUARD_SENSOR_NAME, health_evaluation
from hermes_orchestration.config import Integration, IntegrationsConfig
from hermes_orchestration.health import IntegrationCard, failure_summary, integration_cards
from hermes_orchestration.operations import OPERATION_JOBS
from hermes_orchestration.switch import (
    PausedBy,
    SwitchState,
    effective_switch,
    pause,
    pause_message,
    read_switch,
    read_switches,
    record_verification,
    resume,
)
from hermes_orchestration.tags import CREDENTIALS_FAILURE, FAILURE_TAG, HTTP_STATUS_TAG

if TYPE_CHECKING:
    from hermes_orchestration.verification import VerifyOutcome

GUARD_SENSOR = GUARD_SENSOR_NAME
TICK_SECONDS = 45
REVERIFY_EVERY_SECONDS = 20 * 60
# Verifications are network calls: a few per tick keep the tick well inside its time limit.
MAX_VERIFICATIONS_PER_TICK = 3
# The retry policy of those verifications (hermes_client.RetryPolicy).
SENSOR_VERIFY_RETRY = {
    "max_attempts": 2,
    "base_delay": 0.5,
    "max_total_seconds": 8.0,
    "timeout": 5.0,
}
MAX_POOL_UPDATES_PER_TICK = 100
MAX_HEALTH_REPORTS_PER_TICK = 200
QUEUED_RUNS_PER_TICK = 1000
FAILED_RUNS_PER_TICK = 1000
# How far back the first tick looks for credential failures, and how much consecutive ticks
# overlap (re-reading a failure is harmless: the decision is made from run history).
FIRST_LOOKBACK_SECONDS = 24 * 3600
OVERLAP_SECONDS = 300
_SUMMARY_ACTIONS = 12

Verify = Callable[[Integration], "VerifyOutcome"]


def _verify(integration: Integration) -> VerifyOutcome:
    # The HTTP client is imported by the first tick that verifies, not by every process that
    # loads the definitions.
    from hermes_orchestration.hermes_client import RetryPolicy
    from hermes_orchestration.verification import verify_integration

    return verify_integration(integration, retry=RetryPolicy(**SENSOR_VERIFY_RETRY))


@dataclass
class GuardCursor:
    """What the guard remembers between ticks."""

    failures_after: float | None = None  # update time of the newest credential failure seen
    health: dict[str, str] = field(default_factory=dict)  # last reported health, per integration

    def to_json(self) -> str:
        """The sensor cursor."""
        return json.dumps(
            {"failures_after": self.failures_after, "health": self.health}, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str | None) -> GuardCursor:
        """Read a cursor; a missing or unreadable one starts afresh (nothing is lost)."""
        if not text:
            return cls()
        try:
            data = json.loads(text)
            failures_after = data.get("failures_after")
            return cls(
                failures_after=float(failures_after) if failures_after is not None else None,
                health={str(key): str(value) for key, value in dict(data["health"]).items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return cls()


@dataclass(frozen=True)
class GuardTick:
    """The outcome of one tick."""

    actions: list[str]
    evaluations: list[dg.AssetCheckEvaluation]
    cursor: GuardCursor
    summary: str


class _Guard:
    """One tick's work; the switches are read once and kept up to date as they change."""

    def __init__(
        self,
        instance: dg.DagsterInstance,
        integrations: Sequence[Integration],
        now: float,
        log: logging.Logger | dg.DagsterLogManager,
        verify: Verify,
    ) -> None:
        self.instance = instance
        self.integrations = {integration.name: integration for integration in integrations}
        self.now = now
        self.log = log
        self.verify = verify
        self.switches = read_switches(instance, self.integrations)
        self.actions: list[str] = []

    def act(self, message: str) -> None:
        self.log.info(message)
        self.actions.append(message)

    def unchanged(self, name: str) -> bool:
        # A person may have flipped the switch since the tick began: never overwrite that.
        return read_switch(self.instance, name) == self.switches[name]

    # 1. Auto-pause --------------------------------------------------------------------------

    def pause_failing(self, failures_after: float) -> float:
        since = datetime.fromtimestamp(failures_after - OVERLAP_SECONDS, UTC)
        failed = self.instance.get_run_records(
            dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.FAILURE],
                tags={FAILURE_TAG: CREDENTIALS_FAILURE},
                updated_after=since,
            ),
            limit=FAILED_RUNS_PER_TICK,
        )
        newest = max((r.update_timestamp.timestamp() for r in failed), default=failures_after)
        suspects = {record.dagster_run.tags.get("integration") for record in failed}
        for name in sorted(name for name in suspects if name in self.integrations):
            integration = self.integrations[name]
            state = self.switches[name]
            if state.paused or not integration.enabled:
                continue
            streak = credential_failures(self.instance, integration, since=state.changed_at)
            if len(streak) < integration.auto_pause_after_failures or not self.unchanged(name):
                continue
            change = pause(
                self.instance,
                integration,
                by=PausedBy.AUTO,
                reason=auto_pause_reason(integration, streak),
                now=self.now,
            )
            self.switches[name] = change.state
            self.act(f"paused {name} automatically: {change.state.reason}")
        return max(newest, failures_after)

    # 2. Re-verify what was paused automatically -------------------------------------------

    def reverify(self) -> None:
        due = []
        for name, state in self.switches.items():
            last = state.verified_at or state.changed_at
            if (
                state.paused
                and state.by == PausedBy.AUTO
                and self.integrations[name].enabled
                and last + REVERIFY_EVERY_SECONDS <= self.now
            ):
                due.append((last, name))
        for _, name in sorted(due)[:MAX_VERIFICATIONS_PER_TICK]:
            integration = self.integrations[name]
            outcome = self.verify(integration)
            if not self.unchanged(name):
                continue
            if outcome.ok:
                change = resume(
                    self.instance,
                    integration,
                    by=PausedBy.AUTO,
                    verify=lambda _integration, outcome=outcome: outcome,
                    now=self.now,
                )
                self.switches[name] = change.state
                self.act(f"resumed {name} automatically: verify passed ({outcome.message})")
            else:
                self.switches[name] = record_verification(
                    self.instance, name, self.switches[name], outcome.message, self.now
                )
                minutes = REVERIFY_EVERY_SECONDS // 60
                self.act(
                    f"re-verified {name}, still failing ({outcome.error}); it stays paused and "
                    f"is verified again in {minutes} minutes"
                )

    # 3. Cancel queued runs of paused integrations -----------------------------------------

    def cancel_queued(self) -> None:
        queued = self.instance.get_run_records(
            dg.RunsFilter(statuses=[dg.DagsterRunStatus.QUEUED]), limit=QUEUED_RUNS_PER_TICK
        )
        for record in queued:
            run = record.dagster_run
            name = integration_of(run)
            if name is None or name not in self.integrations or run.job_name in OPERATION_JOBS:
                continue
            state = effective_switch(self.integrations[name], self.switches[name])
            if not state.paused:
                continue
            message = (
                f"Canceled by the {GUARD_SENSOR} sensor: {pause_message(name, state)}. "
                f"Runs of a paused integration do not start; "
                f"{_how_to_switch_on(name, state)}"
            )
            self.instance.report_run_canceling(run, message=message)
            self.instance.report_run_canceled(run, message=message)
            self.act(f"canceled queued run {run.run_id} of {name} ({state.label})")

    # 4. Pool limits -------------------------------------------------------------------------

    def set_pool_limits(self) -> None:
        storage = self.instance.event_log_storage
        if not storage.supports_global_concurrency_limits:
            return
        limits = {limit.name: limit for limit in storage.get_pool_limits()}
        stale = []
        for integration in self.integrations.values():
            pool, wanted = pool_name(integration), integration.max_concurrent_runs
            current = limits.get(pool)
            if current is None or current.limit != wanted or current.from_default:
                stale.append((pool, wanted))
        if not stale:
            return
        # Each write is a transaction: a first tick over a thousand integrations spreads them.
        for pool, wanted in stale[:MAX_POOL_UPDATES_PER_TICK]:
            storage.set_concurrency_slots(pool, wanted)
        done = [f"{pool}={wanted}" for pool, wanted in stale[:MAX_POOL_UPDATES_PER_TICK]]
        shown = ", ".join(done[:_SUMMARY_ACTIONS])
        more = f" and {len(done) - _SUMMARY_ACTIONS} more" if len(done) > _SUMMARY_ACTIONS else ""
        left = len(stale) - len(done)
        later = f" ({left} more on the next ticks)" if left else ""
        self.act(f"set pool limits from max_concurrent_runs: {shown}{more}{later}")

    # 5. Health ----------------------------------------------------------------------------------

    def report_health(
        self, reported: dict[str, str]
    ) -> tuple[list[dg.AssetCheckEvaluation], dict[str, str]]:
        integrations = list(self.integrations.values())
        cards = integration_cards(
            self.instance, integrations, now=self.now, switches=self.switches, summaries=False
        )
        evaluations = []
        signatures = {}
        for card, integration in zip(cards, integrations, strict=True):
            signature = health_signature(card)
            if reported.get(card.name) == signature:
                signatures[card.name] = signature
                continue
            if len(evaluations) == MAX_HEALTH_REPORTS_PER_TICK:
                # The daemon stores each evaluation: the rest waits for the next ticks.
                if card.name in reported:
                    signatures[card.name] = reported[card.name]
                continue
            signatures[card.name] = signature
            if card.last_error_run_id:
                card = replace(
                    card, last_error=failure_summary(self.instance, card.last_error_run_id)
                )
            evaluations.append(health_evaluation(card, integration, self.now))
        return evaluations, signatures


def guard_tick(
    instance: dg.DagsterInstance,
    integrations: Sequence[Integration],
    cursor: GuardCursor,
    *,
    now: float | None = None,
    log: logging.Logger | dg.DagsterLogManager | None = None,
    verify: Verify | None = None,
) -> GuardTick:
    """One evaluation of the guard sensor (see the module's docstring)."""
    now = time.time() if now is None else now
    guard = _Guard(
        instance,
        integrations,
        now,
        log or logging.getLogger(__name__),
        verify or _verify,
    )
    failures_after = guard.pause_failing(
        cursor.failures_after if cursor.failures_after is not None else now - FIRST_LOOKBACK_SECONDS
    )
    guard.reverify()
    guard.cancel_queued()
    guard.set_pool_limits()
    evaluations, health = guard.report_health(cursor.health)
    if evaluations:
        guard.log.info(f"reported the health of {len(evaluations)} integration(s)")
    return GuardTick(
        actions=guard.actions,
        evaluations=evaluations,
        cursor=GuardCursor(failures_after=failures_after, health=health),
        summary=_summary(guard, len(evaluations)),
    )


def _summary(guard: _Guard, reported: int) -> str:
    parts = guard.actions[:_SUMMARY_ACTIONS]
    if len(guard.actions) > _SUMMARY_ACTIONS:
        parts.append(f"and {len(guard.actions) - _SUMMARY_ACTIONS} more (see the tick's logs)")
    if reported:
        parts.append(f"health reported for {reported} integration(s)")
    switches = {
        name: effective_switch(guard.integrations[name], state)
        for name, state in guard.switches.items()
    }
    paused = sorted(
        f"{name} ({state.by_label})" for name, state in switches.items() if state.paused
    )
    if not parts:
        parts.append(f"nothing to do for {len(guard.integrations)} integration(s)")
    if paused:
        shown = ", ".join(paused[:_SUMMARY_ACTIONS])
        more = (
            f" and {len(paused) - _SUMMARY_ACTIONS} more" if len(paused) > _SUMMARY_ACTIONS else ""
        )
        parts.append(f"paused: {shown}{more}")
    return "; ".join(parts)


def health_signature(card: IntegrationCard) -> str:
    """What, when it changes, calls for a new health evaluation."""
    return "|".join(
        str(part)
        for part in (
            card.health.value,
            card.freshness.value if card.freshness else "",
            card.switch.label,
            card.switch.changed_at,
            card.last_sync_storage_id or "",
            card.last_error_run_id or "",
        )
    )


def integration_of(run: dg.DagsterRun) -> str | None:
    """The integration a run syncs: its tag, or (before it runs) its selected asset keys."""
    tagged = run.tags.get("integration")
    if tagged:
        return tagged
    keys = [
        *(run.asset_selection or ()),
        *(key.asset_key for key in run.asset_check_selection or ()),
    ]
    names = {key.path[1] for key in keys if len(key.path) == 3 and key.path[0] == "hermes"}
    return names.pop() if len(names) == 1 else None


def credential_failures(
    instance: dg.DagsterInstance, integration: Integration, *, since: float = 0.0
) -> list[dg.RunRecord]:
    """The latest syncs of ``integration`` that failed on credentials in a row, newest first.

    Only runs created after ``since`` (the last pause or resume) count, so that a resumed
    integration gets N fresh attempts.
    """
    created_after = datetime.fromtimestamp(since, UTC) if since else None
    records = instance.get_run_records(
        dg.RunsFilter(
            tags={"integration": integration.name},
            statuses=[dg.DagsterRunStatus.SUCCESS, dg.DagsterRunStatus.FAILURE],
            created_after=created_after,
        ),
        limit=integration.auto_pause_after_failures + 20,
    )
    streak = []
    for record in records:
        run = record.dagster_run
        if run.job_name in OPERATION_JOBS:
            continue  # verify and switch runs are not syncs
        if (
            run.status != dg.DagsterRunStatus.FAILURE
            or run.tags.get(FAILURE_TAG) != CREDENTIALS_FAILURE
        ):
            break
        streak.append(record)
    return streak


def auto_pause_reason(integration: Integration, streak: Sequence[dg.RunRecord]) -> str:
    """Why the guard paused ``integration``, and what a person should do."""
    name = integration.name
    statuses = sorted(
        {record.dagster_run.tags.get(HTTP_STATUS_TAG, "401/403") for record in streak}
    )
    latest = streak[0].dagster_run.run_id
    minutes = REVERIFY_EVERY_SECONDS // 60
    return (
        f"{len(streak)} syncs in a row failed because the site refused the App Token "
        f"(HTTP {', '.join(statuses)}; latest run {latest}). What to do: run "
        f"`hermes-orchestration verify {name}` (or the hermes_verify job), put a valid App Token "
        f"in ${integration.app_token_env}, then `hermes-orchestration resume {name}`. It is "
        f"re-verified every {minutes} minutes and resumes by itself once verify passes"
    )


def _how_to_switch_on(name: str, state: SwitchState) -> str:
    if state.by == PausedBy.YAML:
        return "set enabled: true in integrations.yaml to switch it back on."
    return f"run `hermes-orchestration resume {name}` (or the hermes_switch job) to switch it on."


def build_guard_sensor(
    config: IntegrationsConfig,
    *,
    clock: Callable[[], float] = time.time,
    verify: Verify | None = None,
) -> dg.SensorDefinition:
    """The guard sensor of every integration in ``config``."""

    @dg.sensor(
        name=GUARD_SENSOR,
        minimum_interval_seconds=TICK_SECONDS,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description=(
            "Keeps every Hermes integration's switch in force: pauses integrations whose syncs "
            "keep failing on their credentials, re-verifies them and resumes them once verify "
            "passes, cancels queued runs of paused integrations, sets each integration's pool "
            "limit and keeps its health check current. Each tick says what it did and why."
        ),
    )
    def hermes_guard(context: dg.SensorEvaluationContext) -> dg.SensorResult:
        tick = guard_tick(
            context.instance,
            config.integrations,
            GuardCursor.from_json(context.cursor),
            now=clock(),
            log=context.log,
            verify=verify,
        )
        return dg.SensorResult(
            asset_events=tick.evaluations,
            cursor=tick.cursor.to_json(),
            skip_reason=tick.summary,
        )

    return hermes_guard
