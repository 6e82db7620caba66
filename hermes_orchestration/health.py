"""The integration card, computed from the Dagster instance: health, last sync, switch, last error.

Nothing here keeps books of its own: the card is read from what Dagster already records, in a
fixed number of batched reads whatever the number of integrations (one asset-records read for
every ``master_data`` key, one run-records read for the latest runs, one read of the switches
and one of the schedules), plus one event-log read per integration whose latest sync failed, to
quote its error. A read per asset would cost seconds at a thousand integrations.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

import dagster as dg
from dagster._core.execution.plan.objects import StepFailureData
from dagster._core.scheduler.instigation import InstigatorStatus, InstigatorType
from dagster._core.storage.event_log.base import AssetEntry

from hermes_orchestration.assets import MASTER_DATA, asset_key
from hermes_orchestration.config import Integration
from hermes_orchestration.schedules import schedule_name
from hermes_orchestration.switch import SwitchState, effective_switch, read_switches
from hermes_orchestration.tags import FAILURE_SUMMARY_TAG

INTEGRATION_TYPE = "hermes"
_RUN_IDS_PER_QUERY = 500
_SUMMARY_LENGTH = 600
_IN_PROGRESS = frozenset(
    {
        dg.DagsterRunStatus.QUEUED,
        dg.DagsterRunStatus.NOT_STARTED,
        dg.DagsterRunStatus.STARTING,
        dg.DagsterRunStatus.STARTED,
        dg.DagsterRunStatus.CANCELING,
    }
)


class Health(StrEnum):
    """The card's health."""

    OK = "ok"
    ERROR = "error"  # the latest sync failed
    PAUSED = "paused"
    NEVER_SYNCED = "never synced"


class Freshness(StrEnum):
    """How old the last successful sync is, against the integration's ``freshness`` limits."""

    FRESH = "fresh"
    WARN = "warn"  # older than warn_after: stale, a warning
    FAIL = "fail"  # older than fail_after: stale, a failure


@dataclass(frozen=True)
class IntegrationCard:
    """What a person sees of one integration.

    Times are epoch seconds (UTC); ``as_json`` renders them as ISO 8601. The master database's
    last update is the latest that any of the integrations feeding it recorded when it loaded.
    """

    name: str
    display_name: str
    health: Health
    switch: SwitchState
    master_database: str
    last_sync_at: float | None = None
    last_sync_run_id: str | None = None
    last_sync_storage_id: int | None = None
    freshness: Freshness | None = None
    master_data_updated_at: float | None = None
    last_error_run_id: str | None = None
    last_error_at: float | None = None
    last_error: str | None = None  # filled in when summaries are asked for
    running_run_id: str | None = None
    schedule_stopped: bool = False
    type: str = INTEGRATION_TYPE

    @property
    def stale(self) -> bool:
        """True when the last successful sync is older than ``warn_after``."""
        return self.freshness in (Freshness.WARN, Freshness.FAIL)

    def as_json(self, now: float) -> dict[str, Any]:
        """The card as JSON-ready values."""
        switch = self.switch
        return {
            "name": self.name,
            "display_name": self.display_name,
            "type": self.type,
            "health": self.health.value,
            "paused_reason": switch.reason if switch.paused else None,
            "switch": {
                "state": "paused" if switch.paused else "on",
                "paused_by": switch.by.value if switch.paused and switch.by else None,
                "reason": switch.reason or None,
                "since": iso(switch.changed_at) if switch.changed_at else None,
                "schedule_stopped_in_ui": self.schedule_stopped,
            },
            "last_successful_sync": (
                {
                    "at": iso(self.last_sync_at),
                    "age_seconds": round(now - self.last_sync_at),
                    "run_id": self.last_sync_run_id,
                }
                if self.last_sync_at is not None
                else None
            ),
            "freshness": self.freshness.value if self.freshness else None,
            "stale": self.stale,
            "master_database": self.master_database,
            "master_data_updated_at": iso(self.master_data_updated_at),
            "last_error": (
                {
                    "summary": self.last_error,
                    "run_id": self.last_error_run_id,
                    "at": iso(self.last_error_at),
                }
                if self.last_error_run_id
                else None
            ),
            "running_run_id": self.running_run_id,
        }


def iso(timestamp: float | None) -> str | None:
    """An epoch timestamp as ISO 8601 in UTC, to the second."""
    if timestamp is None:
        return None
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def freshness_of(
    integration: Integration, last_sync_at: float | None, now: float
) -> Freshness | None:
    """Fresh, warn or fail, from the age of the last successful sync (None if there is none)."""
    if last_sync_at is None:
        return None
    age = now - last_sync_at
    if age > integration.freshness.fail_after.total_seconds():
        return Freshness.FAIL
    if age > integration.freshness.warn_after.total_seconds():
        return Freshness.WARN
    return Freshness.FRESH


def integration_cards(
    instance: dg.DagsterInstance,
    integrations: Sequence[Integration],
    *,
    now: float | None = None,
    switches: Mapping[str, SwitchState] | None = None,
    summaries: bool = True,
) -> list[IntegrationCard]:
    """The card of every integration, in the given order.

    Args:
        instance: the Dagster instance whose history is read.
        integrations: the integrations to describe.
        now: the time the cards are computed for (default: now).
        switches: the stored switches, when the caller has just read them.
        summaries: quote the error of each failed latest sync (one event-log read each).
    """
    now = time.time() if now is None else now
    if switches is None:
        switches = read_switches(instance, (integration.name for integration in integrations))
    keys = [asset_key(integration, MASTER_DATA) for integration in integrations]
    entries = {
        record.asset_entry.asset_key: record.asset_entry
        for record in instance.get_asset_records(keys)
    }
    # The latest run that targeted master_data, when it is not the one that last materialized it:
    # running, failed or canceled.
    other_runs = {
        entry.last_run_id
        for entry in entries.values()
        if entry.last_run_id
        and (
            entry.last_materialization_record is None
            or entry.last_materialization_record.run_id != entry.last_run_id
        )
    }
    runs = _run_records(instance, other_runs)
    stopped = _stopped_schedules(instance)
    cards = []
    for integration, key in zip(integrations, keys, strict=True):
        card = _card(
            integration,
            entries.get(key),
            runs,
            effective_switch(integration, switches.get(integration.name, SwitchState())),
            schedule_name(integration) in stopped,
            now,
        )
        if summaries and card.last_error_run_id and card.last_error is None:
            card = replace(card, last_error=failure_summary(instance, card.last_error_run_id))
        cards.append(card)
    return _with_database_updates(cards)


def _with_database_updates(cards: list[IntegrationCard]) -> list[IntegrationCard]:
    """Give each card the latest update of its master database by any integration feeding it."""
    latest: dict[str, float] = {}
    for card in cards:
        if card.master_data_updated_at is not None:
            current = latest.get(card.master_database, card.master_data_updated_at)
            latest[card.master_database] = max(current, card.master_data_updated_at)
    return [
        replace(card, master_data_updated_at=latest[card.master_database])
        if card.master_database in latest
        else card
        for card in cards
    ]


def _run_records(instance: dg.DagsterInstance, run_ids: Iterable[str]) -> dict[str, dg.RunRecord]:
    wanted = sorted(run_ids)
    records: dict[str, dg.RunRecord] = {}
    for start in range(0, len(wanted), _RUN_IDS_PER_QUERY):
        chunk = wanted[start : start + _RUN_IDS_PER_QUERY]
        for record in instance.get_run_records(dg.RunsFilter(run_ids=chunk)):
            records[record.dagster_run.run_id] = record
    return records


def _stopped_schedules(instance: dg.DagsterInstance) -> set[str]:
    """Schedules someone stopped in the UI (their toggle is a switch too)."""
    states = instance.all_instigator_state(
        instigator_type=InstigatorType.SCHEDULE, instigator_statuses={InstigatorStatus.STOPPED}
    )
    return {state.name for state in states}


def _card(
    integration: Integration,
    entry: AssetEntry | None,
    runs: Mapping[str, dg.RunRecord],
    switch: SwitchState,
    schedule_stopped: bool,
    now: float,
) -> IntegrationCard:
    materialization = entry.last_materialization_record if entry else None
    last_sync_at = materialization.timestamp if materialization else None
    latest = runs.get(entry.last_run_id) if entry and entry.last_run_id else None
    status = latest.dagster_run.status if latest else None
    failed = status == dg.DagsterRunStatus.FAILURE
    if switch.paused:
        health = Health.PAUSED
    elif failed:
        health = Health.ERROR
    elif materialization is not None:
        health = Health.OK
    else:
        health = Health.NEVER_SYNCED
    updated_at = None
    if materialization is not None:
        value = materialization.asset_materialization.metadata.get("master_database_updated_at")
        updated_at = value.value if isinstance(value, dg.TimestampMetadataValue) else None
    return IntegrationCard(
        name=integration.name,
        display_name=integration.display_name,
        health=health,
        switch=switch,
        master_database=integration.master_database,
        last_sync_at=last_sync_at,
        last_sync_run_id=materialization.run_id if materialization else None,
        last_sync_storage_id=materialization.storage_id if materialization else None,
        freshness=freshness_of(integration, last_sync_at, now),
        master_data_updated_at=updated_at,
        last_error_run_id=latest.dagster_run.run_id if failed and latest else None,
        last_error=latest.dagster_run.tags.get(FAILURE_SUMMARY_TAG) if failed and latest else None,
        last_error_at=(latest.end_time or latest.update_timestamp.timestamp())
        if failed and latest
        else None,
        running_run_id=latest.dagster_run.run_id if latest and status in _IN_PROGRESS else None,
        schedule_stopped=schedule_stopped,
    )


@dg.failure_hook(name="hermes_failure_summary")
def record_failure_summary(context: dg.HookContext) -> None:
    """Write what made a step fail on its run (tag ``hermes/failure_summary``, first failure).

    The health view reads it with the run record; the step failure itself is in the run's event
    log, which on SQLite storage is a database of its own per run, costly to open by the hundred.
    """
    if context.op_exception is None:
        return
    run = context.instance.get_run_by_id(context.run_id)
    if run is None or FAILURE_SUMMARY_TAG in run.tags:
        return
    summary = _shorten(_exception_text(context.op_exception))
    context.instance.add_run_tags(context.run_id, {FAILURE_SUMMARY_TAG: summary})


def _exception_text(error: BaseException) -> str:
    # The same sentence as _step_failure_text gives from the stored event.
    if isinstance(error, dg.Failure) and error.description:
        return error.description
    while error.__cause__ is not None:
        error = error.__cause__
    return f"{type(error).__name__}: {error}"


def failure_summary(instance: dg.DagsterInstance, run_id: str) -> str:
    """What went wrong in a failed run, in a few lines: its first step failure's message.

    Runs whose failure the hook recorded carry it in a tag; for the others (a run that failed
    before any step, or made before the hook existed) the run's event log says it.
    """
    records = instance.get_records_for_run(
        run_id,
        of_type={dg.DagsterEventType.STEP_FAILURE, dg.DagsterEventType.RUN_FAILURE},
        limit=10,
    ).records
    events = [record.event_log_entry.dagster_event for record in records]
    for event in events:
        if event is not None and event.is_step_failure:
            return _shorten(_step_failure_text(event.step_failure_data))
    for event in events:
        if event is not None and event.message:
            return _shorten(event.message)
    return "the run failed before any step ran; see its logs in the Dagster UI"


def _step_failure_text(data: StepFailureData) -> str:
    # A dg.Failure carries the sentence meant for people; any other error is wrapped by Dagster,
    # and its innermost cause says what happened.
    if data.user_failure_data is not None and data.user_failure_data.description:
        return data.user_failure_data.description
    error = data.error
    if error is None:
        return "a step failed; see the run's logs in the Dagster UI"
    while error.cause is not None:
        error = error.cause
    head, colon, rest = error.message.strip().partition(": ")
    if colon and " " not in head:
        head = head.rsplit(".", 1)[-1]  # sqlalchemy.exc.OperationalError -> OperationalError
    return f"{head}{colon}{rest}"


def _shorten(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _SUMMARY_LENGTH else text[: _SUMMARY_LENGTH - 3] + "..."


# --- The human view --------------------------------------------------------------------------

_STALE_MARK = {Freshness.WARN: "⚠ stale", Freshness.FAIL: "✖ stale"}
_COLUMNS = (
    "INTEGRATION",
    "DISPLAY NAME",
    "TYPE",
    "HEALTH",
    "LAST SUCCESSFUL SYNC",
    "MASTER DATABASE",
    "MASTER DATA UPDATED",
    "SWITCH",
)
_DISPLAY_NAME_WIDTH = 30


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{round(seconds)}s"
    if seconds < 90 * 60:
        return f"{round(seconds / 60)}m"
    if seconds < 48 * 3600:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _when(timestamp: float | None, now: float) -> str:
    if timestamp is None:
        return "-"
    moment = datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%MZ")
    return f"{moment} ({_ago(now - timestamp)} ago)"


def _row(card: IntegrationCard, now: float) -> tuple[str, ...]:
    display = card.display_name
    if len(display) > _DISPLAY_NAME_WIDTH:
        display = display[: _DISPLAY_NAME_WIDTH - 3] + "..."
    last_sync = _when(card.last_sync_at, now)
    if card.freshness in _STALE_MARK:
        last_sync += " " + _STALE_MARK[card.freshness]
    health = card.health.value + (" (syncing)" if card.running_run_id else "")
    switch = card.switch.label + (", schedule stopped" if card.schedule_stopped else "")
    updated = (
        datetime.fromtimestamp(card.master_data_updated_at, UTC).strftime("%Y-%m-%d %H:%MZ")
        if card.master_data_updated_at is not None
        else "-"
    )
    return (
        card.name,
        display,
        card.type,
        health,
        last_sync,
        card.master_database,
        updated,
        switch,
    )


def _notes(card: IntegrationCard, now: float) -> list[str]:
    notes = []
    if card.switch.paused:
        since = f" since {_when(card.switch.changed_at, now)}" if card.switch.changed_at else ""
        notes.append(f"{card.switch.label}{since}: {card.switch.reason}")
    if card.last_error_run_id:
        notes.append(
            f"last error in run {card.last_error_run_id}, {_when(card.last_error_at, now)}: "
            f"{card.last_error or 'see the run in the Dagster UI'}"
        )
    if card.schedule_stopped:
        notes.append("its schedule was stopped in the Dagster UI; start it there to sync again")
    return notes


def render_cards(cards: Sequence[IntegrationCard], now: float) -> str:
    """The cards as a table, then what needs attention: pause reasons and last errors."""
    if not cards:
        return "No integrations in integrations.yaml."
    rows = [_COLUMNS, *(_row(card, now) for card in cards)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(_COLUMNS))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    for card in cards:
        for note in _notes(card, now):
            first, *rest = note.splitlines() or [""]
            lines.append("")
            lines.append(f"{card.name}: {first}")
            lines.extend(f"    {line}" for line in rest)
    return "\n".join(lines)
