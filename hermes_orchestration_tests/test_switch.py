"""The on/off switch: kept in the Dagster instance, YAML first, resume only once verify passes.

Verification is real: the integrations point at the session's simulator, with a good or a
refused App Token in their environment variable.
"""

from __future__ import annotations

import re
from pathlib import Path

import dagster as dg
import pytest

from hermes_orchestration.operations import OPERATION_TAG, SWITCH_JOB, VERIFY_JOB
from hermes_orchestration.switch import (
    ON,
    PausedBy,
    effective_switch,
    pause,
    read_switch,
    resume,
    switch_key,
)
from hermes_orchestration.verification import verify_integration
from hermes_orchestration_tests.conftest import TOKEN
from hermes_orchestration_tests.operations_support import (
    WRONG_TOKEN,
    definitions,
    set_token,
    write_integrations,
)


def test_a_pause_survives_restarts_of_everything_that_reads_the_instance(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.from_config(str(home)) as instance:
        change = pause(instance, config.get("tienda_norte"), reason="  the site  is migrating ")
    assert change.ok
    assert change.message.startswith("PAUSED tienda_norte (by hand): the site is migrating.")
    assert "hermes-orchestration resume tienda_norte" in change.message

    # A new process (webserver, daemon, CLI) opening the same instance sees the same switch.
    with dg.DagsterInstance.from_config(str(home)) as instance:
        state = read_switch(instance, "tienda_norte")
    assert state.paused and state.by == PausedBy.HAND
    assert state.reason == "the site is migrating"
    assert state.label == "paused by hand"
    assert state.changed_at > 0


def test_enabled_false_in_the_yaml_wins_and_resume_cannot_override_it(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path, monkeypatch, simulator, {"tienda_apagada": "enabled: false"}
    )
    integration = config.get("tienda_apagada")
    with dg.instance_for_test() as instance:
        assert read_switch(instance, "tienda_apagada") == ON
        state = effective_switch(integration, read_switch(instance, "tienda_apagada"))
        assert state.paused and state.by == PausedBy.YAML
        assert "enabled: false" in state.reason

        change = resume(instance, integration, force=True)
        assert not change.ok
        assert "enabled: false" in change.message and "pull request" in change.message


def test_resume_refuses_while_verify_fails_and_says_what_to_do(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path, monkeypatch, simulator, {"tienda_rota": ""}, tokens={"tienda_rota": WRONG_TOKEN}
    )
    integration = config.get("tienda_rota")
    with dg.instance_for_test() as instance:
        pause(instance, integration, reason="token revoked")

        refused = resume(instance, integration)
        assert not refused.ok
        assert refused.message.startswith(
            "NOT RESUMED tienda_rota (was paused by hand: token revoked)"
        )
        assert "401" in refused.message
        assert "HERMES_TOKEN_TIENDA_ROTA" in refused.message  # where the token goes
        assert "hermes-orchestration resume tienda_rota --force" in refused.message
        assert WRONG_TOKEN not in refused.message
        assert read_switch(instance, "tienda_rota").paused

        set_token(monkeypatch, "tienda_rota", TOKEN)
        resumed = resume(instance, integration)
        assert resumed.ok
        assert resumed.message.startswith("RESUMED tienda_rota after verify passed")
        state = read_switch(instance, "tienda_rota")
        assert not state.paused and state.label == "on"

        assert resume(instance, integration).message == "tienda_rota is already on; nothing to do."


def test_resume_with_force_switches_on_without_verifying(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path, monkeypatch, simulator, {"tienda_rota": ""}, tokens={"tienda_rota": WRONG_TOKEN}
    )
    integration = config.get("tienda_rota")
    verifications_before = simulator.stats.count("/api/v1/verify")
    with dg.instance_for_test() as instance:
        pause(instance, integration)
        change = resume(instance, integration, force=True)
        assert change.ok
        assert "without verifying its credentials (forced)" in change.message
        assert not read_switch(instance, "tienda_rota").paused
    assert simulator.stats.count("/api/v1/verify") == verifications_before


def test_an_unreadable_stored_switch_keeps_the_integration_paused_until_resumed(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(tmp_path, monkeypatch, simulator, {"tienda_norte": ""})
    with dg.instance_for_test() as instance:
        instance.run_storage.set_cursor_values({switch_key("tienda_norte"): "{not json"})
        state = read_switch(instance, "tienda_norte")
        assert state.paused
        assert "unreadable" in state.reason and "resume tienda_norte" in state.reason
        assert resume(instance, config.get("tienda_norte")).ok
        assert not read_switch(instance, "tienda_norte").paused


def _launch(
    defs: dg.Definitions, job: str, instance: dg.DagsterInstance, **op_config: object
) -> dg.ExecuteInProcessResult:
    op = "flip_switch" if job == SWITCH_JOB else "verify_credentials"
    return defs.resolve_job_def(job).execute_in_process(
        run_config={"ops": {op: {"config": op_config}}}, instance=instance, raise_on_error=False
    )


def test_the_hermes_switch_job_pauses_and_resumes_from_the_ui(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_norte": "", "tienda_rota": ""},
        tokens={"tienda_rota": WRONG_TOKEN},
    )
    defs = definitions(config)
    with dg.instance_for_test() as instance:
        paused = _launch(
            defs, SWITCH_JOB, instance, integration="tienda_rota", action="pause", reason="audit"
        )
        assert paused.success
        state = read_switch(instance, "tienda_rota")
        assert state.paused and state.reason == "audit"
        run = instance.get_run_by_id(paused.run_id)
        assert run.tags["integration"] == "tienda_rota"  # the UI's run list filters on it
        assert run.tags[OPERATION_TAG] == "pause"

        # Verify fails: the run fails with the same advice as the command line.
        refused = _launch(defs, SWITCH_JOB, instance, integration="tienda_rota", action="resume")
        assert not refused.success
        failure = next(event for event in refused.all_events if event.is_step_failure)
        description = failure.step_failure_data.user_failure_data.description
        assert description.startswith("NOT RESUMED tienda_rota")
        assert "--force" in description
        assert read_switch(instance, "tienda_rota").paused

        forced = _launch(
            defs, SWITCH_JOB, instance, integration="tienda_rota", action="resume", force=True
        )
        assert forced.success
        assert not read_switch(instance, "tienda_rota").paused

        # The launchpad offers the integrations of the file, and refuses any other name.
        with pytest.raises(dg.DagsterInvalidConfigError, match="otra"):
            _launch(defs, SWITCH_JOB, instance, integration="otra", action="pause")


def test_the_hermes_verify_job_says_what_the_verify_command_says(
    tmp_path: Path, monkeypatch, simulator
) -> None:
    config = write_integrations(
        tmp_path,
        monkeypatch,
        simulator,
        {"tienda_norte": "", "tienda_rota": ""},
        tokens={"tienda_rota": WRONG_TOKEN},
    )
    defs = definitions(config)
    with dg.instance_for_test() as instance:
        good = _launch(defs, VERIFY_JOB, instance, integration="tienda_norte")
        assert good.success
        logged = [
            record.user_message
            for record in instance.all_logs(good.run_id)
            if record.step_key == "verify_credentials"
        ]
        assert verify_integration(config.get("tienda_norte")).message in logged

        bad = _launch(defs, VERIFY_JOB, instance, integration="tienda_rota")
        assert not bad.success
        failure = next(event for event in bad.all_events if event.is_step_failure)
        expected = verify_integration(config.get("tienda_rota")).message
        # Same words as `hermes-orchestration verify`, request id aside (each call has its own).
        assert _without_request_id(failure.step_failure_data.user_failure_data.description) == (
            _without_request_id(expected)
        )
        assert instance.get_run_by_id(bad.run_id).tags["integration"] == "tienda_rota"


def _without_request_id(text: str) -> str:
    return re.sub(r"request id [0-9a-f]+", "request id …", text)
