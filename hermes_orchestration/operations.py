"""Jobs a person launches from the Dagster UI to operate an integration.

- ``hermes_verify``: the "Verificar" step, with the messages of ``hermes-orchestration verify``.
- ``hermes_switch``: pause or resume an integration, as ``hermes-orchestration pause/resume``.

One job each for all integrations, chosen in the launchpad's config (a list of the integration
names), so that a thousand integrations do not make two thousand jobs. A failed verify or a
refused resume fails the run, with the message that says what to do.
"""

# No `from __future__ import annotations`: Dagster inspects the context annotations at runtime.

import hashlib

import dagster as dg

from hermes_orchestration.config import IntegrationsConfig
from hermes_orchestration.switch import pause, resume

SWITCH_JOB = "hermes_switch"
VERIFY_JOB = "hermes_verify"
OPERATION_JOBS = frozenset({SWITCH_JOB, VERIFY_JOB})
OPERATION_TAG = "hermes/operation"


def _integration_field(config: IntegrationsConfig) -> dg.Field:
    if not config.integrations:
        return dg.Field(str, description="Integration name (integrations.yaml has none yet).")
    # Dagster caches config shapes by the names of their types: a type name of its own per list
    # of integrations keeps two code locations (or a reload) in one process apart.
    digest = hashlib.sha1("\n".join(config.names).encode()).hexdigest()[:10]
    names = dg.Enum(f"HermesIntegration_{digest}", [dg.EnumValue(name) for name in config.names])
    return dg.Field(names, description="The integration, by its name in integrations.yaml.")


def _tag(context: dg.OpExecutionContext, name: str, operation: str) -> None:
    # Launched from the launchpad, the run has no tags yet: these let the UI's run list show
    # who paused, resumed or verified an integration, next to its syncs.
    context.instance.add_run_tags(
        context.run.run_id, {"integration": name, OPERATION_TAG: operation}
    )


def build_operation_jobs(config: IntegrationsConfig) -> list[dg.JobDefinition]:
    """The ``hermes_verify`` and ``hermes_switch`` jobs."""
    # One config type for both: Dagster refuses two different types of the same name.
    integration_field = _integration_field(config)
    return [_verify_job(config, integration_field), _switch_job(config, integration_field)]


def _verify_job(config: IntegrationsConfig, integration_field: dg.Field) -> dg.JobDefinition:
    @dg.op(
        name="verify_credentials",
        config_schema={"integration": integration_field},
        description="Calls the site's /verify with the integration's App Token (Verificar).",
    )
    def verify_credentials(context: dg.OpExecutionContext) -> None:
        integration = config.get(context.op_config["integration"])
        _tag(context, integration.name, "verify")
        from hermes_orchestration.verification import verify_integration  # the HTTP client

        outcome = verify_integration(integration)
        if not outcome.ok:
            raise dg.Failure(
                description=outcome.message,
                metadata={"error": outcome.error or "", "hint": outcome.hint or ""},
            )
        context.log.info(outcome.message)

    @dg.job(
        name=VERIFY_JOB,
        description=(
            "Verificar: checks an integration's App Token against its site and says what to do "
            "when it does not work. Pick the integration in the launchpad's config."
        ),
        executor_def=dg.in_process_executor,
    )
    def hermes_verify() -> None:
        verify_credentials()

    return hermes_verify


def _switch_job(config: IntegrationsConfig, integration_field: dg.Field) -> dg.JobDefinition:
    @dg.op(
        name="flip_switch",
        config_schema={
            "integration": integration_field,
            "action": dg.Field(
                dg.Enum("HermesSwitchAction", [dg.EnumValue("pause"), dg.EnumValue("resume")]),
                description="pause: stop syncing; resume: switch back on once verify passes.",
            ),
            "reason": dg.Field(str, default_value="", description="Why (shown on the card)."),
            "force": dg.Field(
                bool, default_value=False, description="Resume even while verify fails."
            ),
        },
        description="Pauses or resumes an integration; the state survives restarts.",
    )
    def flip_switch(context: dg.OpExecutionContext) -> None:
        settings = context.op_config
        integration = config.get(settings["integration"])
        _tag(context, integration.name, settings["action"])
        if settings["action"] == "pause":
            change = pause(context.instance, integration, reason=settings["reason"])
        else:
            change = resume(context.instance, integration, force=settings["force"])
        if not change.ok:
            raise dg.Failure(description=change.message)
        context.log.info(change.message)

    @dg.job(
        name=SWITCH_JOB,
        description=(
            "The on/off switch of an integration: pause it, or resume it once verify passes "
            "(force: resume anyway). Pick the integration and the action in the launchpad."
        ),
        executor_def=dg.in_process_executor,
    )
    def hermes_switch() -> None:
        flip_switch()

    return hermes_switch
