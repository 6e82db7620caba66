"""The integration card and its health check, computed from real run history.

The history is made of real syncs against the session's simulator: one that succeeds, one whose
token the site refuses, one paused by hand after a sync, one never synced and one disabled in the
YAML. The card must read all of it from the Dagster instance, in batched reads.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import pytest
import sqlalchemy as sa

from hermes_orchestration.checks import HEALTH_CHECK
from hermes_orchestration.config import IntegrationsConfig, parse_integrations
from hermes_orchestration.health import (
    Freshness,
    Health,
    IntegrationCard,
    failure_summary,
    integration_cards,
)
from hermes_orchestration.sensors import GuardCursor, guard_tick
from hermes_orchestration.switch import PausedBy, pause
from hermes_orchestration.tags import FAILURE_SUMMARY_TAG
from hermes_orchestration_tests.conftest import TOKEN
from hermes_orchestration_tests.operations_support import (
    WRONG_TOKEN,
    definitions,
    evaluate_guard,
    latest_health,
    sync,
    write_integrations,
)

HOUR = 3600.0


@dataclass
class History:
    config: IntegrationsConfig
    instance: dg.DagsterInstance
    ok_run: str
    failed_run: str
    paused_run: str
    masterdata_url: str


@pytest.fixture(scope="module")
def history(tmp_path_factory, simulator) -> Iterator[History]:
    """One history for the whole module: the tests only read it, or add to the health checks."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        yield from _history(tmp_path_factory.mktemp("history"), monkeypatch, simulator)


def _history(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, simulator) -> Iterator[History]:
    state_dir = tmp_path / "state"
    monkeypatch.setenv("HERMES_STATE_DIR", str(state_dir))
    monkeypatch.delenv("HERMES_MASTERDATA_URL", raising=False)
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {
            "tienda_ok": "",
            "tienda_rota": "",
            "tienda_pausada": "",
            "tienda_nueva": "",
            "tienda_apagada": "enabled: false",
        },
        tokens={"tienda_rota": WRONG_TOKEN},
    )
    defs = definitions(config)
    with dg.instance_for_test() as instance:
        ok = sync(defs, config.get("tienda_ok"), instance)
        failed = sync(defs, config.get("tienda_rota"), instance)
        paused = sync(defs, config.get("tienda_pausada"), instance)
        assert ok.success and not failed.success and paused.success
        pause(instance, config.get("tienda_pausada"), reason="store closed for inventory")
        yield History(
            config,
            instance,
            ok.run_id,
            failed.run_id,
            paused.run_id,
            f"sqlite:///{state_dir / 'masterdata.sqlite'}",
        )


def cards_by_name(history: History, now: float | None = None) -> dict[str, IntegrationCard]:
    cards = integration_cards(history.instance, history.config.integrations, now=now)
    return {card.name: card for card in cards}


def test_the_card_tells_ok_error_paused_and_never_synced_from_run_history(
    history: History,
) -> None:
    cards = cards_by_name(history)
    assert {name: card.health for name, card in cards.items()} == {
        "tienda_ok": Health.OK,
        "tienda_rota": Health.ERROR,
        "tienda_pausada": Health.PAUSED,
        "tienda_nueva": Health.NEVER_SYNCED,
        "tienda_apagada": Health.PAUSED,
    }

    ok = cards["tienda_ok"]
    assert ok.type == "hermes" and ok.display_name == "Integración tienda_ok"
    assert ok.last_sync_run_id == history.ok_run
    assert ok.freshness == Freshness.FRESH and not ok.stale
    assert ok.master_database == "clientes_test"
    assert ok.switch.label == "on"
    assert ok.last_error_run_id is None
    # "Last updated" of the master database: what the master database itself records.
    engine = sa.create_engine(history.masterdata_url)
    with engine.connect() as conn:
        updated = conn.execute(
            sa.text("SELECT updated_at FROM master_databases WHERE name = 'clientes_test'")
        ).scalar_one()
    engine.dispose()
    assert ok.master_data_updated_at is not None
    assert abs(ok.master_data_updated_at - sa_timestamp(updated)) < 1

    rota = cards["tienda_rota"]
    assert rota.last_error_run_id == history.failed_run
    assert rota.last_sync_at is None
    assert rota.last_error is not None
    assert "HTTP 401" in rota.last_error
    assert "What to do: Issue a new App Token" in rota.last_error
    assert WRONG_TOKEN not in rota.last_error and TOKEN not in rota.last_error

    # The failing step wrote its failure on the run; the run's event log says the same.
    failed = history.instance.get_run_by_id(history.failed_run)
    assert failed.tags[FAILURE_SUMMARY_TAG] == rota.last_error
    assert failure_summary(history.instance, history.failed_run) == rota.last_error

    pausada = cards["tienda_pausada"]
    assert pausada.switch.by == PausedBy.HAND
    assert pausada.switch.reason == "store closed for inventory"
    assert pausada.last_sync_run_id == history.paused_run  # its data and history stay visible

    assert cards["tienda_nueva"].last_sync_at is None
    assert cards["tienda_apagada"].switch.by == PausedBy.YAML


def sa_timestamp(value: object) -> float:
    from datetime import UTC, datetime

    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def test_a_sync_older_than_warn_after_is_stale_and_older_than_fail_after_fails(
    history: History,
) -> None:
    now = time.time()
    assert cards_by_name(history, now + 3 * HOUR)["tienda_ok"].freshness == Freshness.WARN
    later = cards_by_name(history, now + 7 * HOUR)["tienda_ok"]
    assert later.freshness == Freshness.FAIL and later.stale
    assert later.health == Health.OK  # stale is a mark on the last sync, not another health
    document = later.as_json(now + 7 * HOUR)
    assert document["stale"] is True and document["freshness"] == "fail"
    assert 7 * HOUR - 60 < document["last_successful_sync"]["age_seconds"] <= 7 * HOUR + 60


def test_the_health_check_shows_each_card_on_master_data(history: History) -> None:
    config, instance = history.config, history.instance
    evaluate_guard(instance, definitions(config))
    verdicts = {
        integration.name: latest_health(instance, integration)
        for integration in config.integrations
    }
    assert verdicts["tienda_ok"].passed
    assert verdicts["tienda_ok"].description.startswith("ok: last successful sync")

    rota = verdicts["tienda_rota"]
    assert not rota.passed and rota.severity == dg.AssetCheckSeverity.ERROR
    assert rota.description.startswith(f"error: run {history.failed_run} failed:")
    assert "HTTP 401" in rota.description

    pausada = verdicts["tienda_pausada"]
    assert not pausada.passed and pausada.severity == dg.AssetCheckSeverity.WARN
    assert pausada.description.startswith("paused by hand: store closed for inventory")

    assert verdicts["tienda_nueva"].severity == dg.AssetCheckSeverity.WARN
    assert verdicts["tienda_nueva"].description.startswith("never synced")
    assert verdicts["tienda_apagada"].description.startswith("paused by integrations.yaml")

    # Hours later, with no sync since, the guard reports the staleness.
    stale = guard_tick(instance, config.integrations, GuardCursor(), now=time.time() + 3 * HOUR)
    (ok,) = [event for event in stale.evaluations if event.asset_key.path[1] == "tienda_ok"]
    assert not ok.passed and ok.severity == dg.AssetCheckSeverity.WARN
    assert ok.description.startswith("stale: last successful sync 3.0 h ago, past warn_after (2h)")


def test_a_sync_launched_by_hand_evaluates_the_health_check_in_its_own_run(
    history: History,
) -> None:
    run = history.instance.get_run_by_id(history.ok_run)
    evaluations = [
        record.event_log_entry.dagster_event.event_specific_data
        for record in history.instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ).records
    ]
    health = [evaluation for evaluation in evaluations if evaluation.check_name == HEALTH_CHECK]
    assert [evaluation.passed for evaluation in health] == [True]


class CountingInstance:
    """Counts the instance reads that the cards make."""

    READS = ("get_asset_records", "get_run_records", "get_records_for_run", "all_instigator_state")

    def __init__(self, instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: Counter[str] = Counter()
        for name in self.READS:
            monkeypatch.setattr(instance, name, self._counted(name, getattr(instance, name)))
        storage = instance.run_storage
        monkeypatch.setattr(
            storage,
            "get_cursor_values",
            self._counted("get_cursor_values", storage.get_cursor_values),
        )

    def _counted(self, name: str, method):
        def counted(*args, **kwargs):
            self.calls[name] += 1
            return method(*args, **kwargs)

        return counted


def test_the_cards_read_the_instance_in_batches_whatever_the_number_of_integrations(
    history: History, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The five real integrations, then four hundred more that share the same instance.
    many = "".join(f"  - name: tienda_extra_{index:03d}\n" for index in range(400))
    extra = parse_integrations(
        "defaults:\n  site_url: https://tienda.example.cl\n  app_token_env: HERMES_TOKEN_X\n"
        "  master_database: clientes_test\n  partitions: {granularity: daily, start: 2026-11-01}\n"
        "integrations:\n" + many
    )
    everything = [*history.config.integrations, *extra.integrations]

    small = CountingInstance(history.instance, monkeypatch)
    integration_cards(history.instance, history.config.integrations)
    few = dict(small.calls)
    small.calls.clear()
    started = time.perf_counter()
    cards = integration_cards(history.instance, everything)
    elapsed = time.perf_counter() - started
    assert dict(small.calls) == few  # no read per integration...
    # ...not even to quote a failed latest sync: the run carries its failure in a tag.
    assert "get_records_for_run" not in few
    assert few["get_asset_records"] == 1
    assert len(cards) == 405
    assert elapsed < 5, f"{elapsed:.1f} s for 405 cards"
