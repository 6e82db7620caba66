"""Helpers of the tests of operating integrations: schedules, the guard sensor, switch, health.

Each integration written here reads its App Token from a variable of its own, so that one test
can hold a working integration next to one whose token the site refuses.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.sensor_definition import SensorExecutionData

from hermes_orchestration.assets import MASTER_DATA, asset_key
from hermes_orchestration.checks import HEALTH_CHECK
from hermes_orchestration.code_location import build_definitions
from hermes_orchestration.config import Integration, IntegrationsConfig, load_integrations
from hermes_orchestration.launch import sync_now
from hermes_orchestration.sensors import GUARD_SENSOR
from hermes_orchestration.simulator import HermesSimulator
from hermes_orchestration_tests.conftest import SIM_PARTITIONS, TOKEN

WRONG_TOKEN = "hrm_live_revoked_0000000000000"


def token_env(name: str) -> str:
    """The environment variable that holds the App Token of integration ``name``."""
    return f"HERMES_TOKEN_{name.upper()}"


def write_integrations(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    simulator: HermesSimulator,
    entries: Mapping[str, str],
    *,
    tokens: Mapping[str, str | None] | None = None,
) -> IntegrationsConfig:
    """Write integrations.yaml with ``entries`` (name -> "key: value" lines) and load it.

    Every integration points at ``simulator`` with the good token unless ``tokens`` says
    otherwise (None: the variable is unset).
    """
    blocks = []
    for name, extra in entries.items():
        fields = {
            "display_name": f"Integración {name}",
            "site_url": simulator.url,
            "app_token_env": token_env(name),
            "master_database": "clientes_test",
            "partitions": "{granularity: daily, start: 2026-11-01}",
            "page_size": "500",
            "max_requests_per_second": "500",
            "max_reject_ratio": "0.5",
        }
        for line in textwrap.dedent(extra).splitlines():  # one "key: value" per line
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
        lines = [f"  - name: {name}\n", *(f"    {key}: {value}\n" for key, value in fields.items())]
        blocks.append("".join(lines))
    path = tmp_path / "integrations.yaml"
    text = "defaults:\n  timezone: America/Santiago\nintegrations:\n" + "".join(blocks)
    path.write_text(text, encoding="utf-8")
    monkeypatch.setenv("HERMES_INTEGRATIONS_FILE", str(path))
    for name in entries:
        set_token(monkeypatch, name, (tokens or {}).get(name, TOKEN))
    return load_integrations(path)


def set_token(monkeypatch: pytest.MonkeyPatch, name: str, token: str | None) -> None:
    """Put ``token`` in the App Token variable of integration ``name`` (None unsets it)."""
    if token is None:
        monkeypatch.delenv(token_env(name), raising=False)
    else:
        monkeypatch.setenv(token_env(name), token)


def sync(
    defs: dg.Definitions,
    integration: Integration,
    instance: dg.DagsterInstance,
    partition: str = SIM_PARTITIONS[1],
    last: str | None = None,
) -> dg.ExecuteInProcessResult:
    """One real sync run of ``partition`` (to ``last``, for a range), as
    ``hermes-orchestration sync`` makes it."""
    return sync_now(defs, integration, instance, first=partition, last=last)


def evaluate_guard(
    instance: dg.DagsterInstance,
    defs: dg.Definitions | None = None,
    *,
    sensor: dg.SensorDefinition | None = None,
    cursor: str | None = None,
) -> SensorExecutionData:
    """One tick of the guard sensor, its asset events stored as the daemon stores them."""
    if sensor is None:
        assert defs is not None
        sensor = defs.resolve_sensor_def(GUARD_SENSOR)
    context = dg.build_sensor_context(instance=instance, cursor=cursor, definitions=defs)
    data = sensor.evaluate_tick(context)
    for event in data.asset_events:
        instance.report_runless_asset_event(event)
    return data


def latest_health(
    instance: dg.DagsterInstance, integration: Integration
) -> dg.AssetCheckEvaluation:
    """The latest evaluation of the health check of ``integration``."""
    key = dg.AssetCheckKey(asset_key(integration, MASTER_DATA), HEALTH_CHECK)
    records = instance.event_log_storage.get_asset_check_execution_history(key, limit=1)
    assert records, f"the health of {integration.name} was never reported"
    evaluation = records[0].evaluation
    assert evaluation is not None
    return evaluation


def definitions(config: IntegrationsConfig) -> dg.Definitions:
    """The code location's definitions for ``config``."""
    return build_definitions(config)
