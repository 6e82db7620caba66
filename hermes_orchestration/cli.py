"""The ``hermes-orchestration`` command: validate the YAML, verify credentials, sync, operate.

``pause``, ``resume`` and ``status`` work on the Dagster instance that ``DAGSTER_HOME`` names.
Exit status: 0 success, 1 a failure the output explains, 2 a usage error.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from typing import TYPE_CHECKING, NoReturn

from hermes_orchestration.config import (
    Integration,
    IntegrationsConfig,
    IntegrationsFileError,
    json_schema,
    load_integrations,
)

if TYPE_CHECKING:
    import dagster as dg

log = logging.getLogger("hermes_orchestration")


class _CommandError(Exception):
    """A failure the message explains: printed on stderr, exit status 1."""


class _NoInstanceError(_CommandError):
    """DAGSTER_HOME does not name a usable Dagster instance."""


@contextmanager
def _instance() -> Iterator[dg.DagsterInstance]:
    """The instance named by DAGSTER_HOME, or a message saying how to name one."""
    import dagster as dg
    from dagster._core.errors import DagsterHomeNotSetError, DagsterInvariantViolationError

    try:
        instance = dg.DagsterInstance.get()
    except DagsterHomeNotSetError:
        raise _NoInstanceError(
            "DAGSTER_HOME is not set: point it at the folder of the Dagster instance "
            "(the one the webserver and daemon use; scripts/demo uses .state/dagster_home)"
        ) from None
    except DagsterInvariantViolationError as err:
        raise _NoInstanceError(
            f"DAGSTER_HOME does not name a usable Dagster instance: {err}"
        ) from None
    with instance:
        yield instance


def _load(path: str | None) -> IntegrationsConfig:
    try:
        return load_integrations(path)
    except IntegrationsFileError as err:
        raise _CommandError(str(err)) from None


def _integration(args: argparse.Namespace) -> tuple[IntegrationsConfig, Integration]:
    """The integrations file and the integration that ``args.name`` names."""
    config = _load(args.file)
    try:
        return config, config.get(args.name)
    except KeyError as err:
        raise _CommandError(err.args[0]) from None


def cmd_validate(args: argparse.Namespace) -> int:
    """Report every problem of the integrations file at once; exit 1 if there is any."""
    config = _load(args.file)
    count = len(config.integrations)
    print(f"{config.path}: OK, {count} integration{'s' if count != 1 else ''}")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of integrations.yaml."""
    print(json.dumps(json_schema(), indent=2, ensure_ascii=False))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """The "Verificar" step: check an integration's App Token against its site."""
    from hermes_orchestration.verification import verify_integration

    _, integration = _integration(args)
    outcome = verify_integration(integration)
    stream = sys.stdout if outcome.ok else sys.stderr
    print(outcome.message, file=stream)
    return 0 if outcome.ok else 1


def cmd_simulate(args: argparse.Namespace) -> int:
    """Serve the bundled Hermes simulator until interrupted."""
    from hermes_orchestration.simulator import HermesSimulator, config_from_args

    config, host, port = config_from_args(args)
    simulator = HermesSimulator(config, host=host, port=port)
    print(
        f"Hermes simulator: {len(simulator.dataset)} client versions at {simulator.url} "
        "(API under /api/v1); Ctrl-C stops it",
        flush=True,
    )
    simulator.serve_forever()
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Sync one integration now, as a run recorded in the Dagster instance ($DAGSTER_HOME)."""
    from hermes_orchestration.code_location import build_definitions
    from hermes_orchestration.launch import sync_now

    config, integration = _integration(args)
    with _instance() as instance:
        result = sync_now(
            build_definitions(config.only(integration.name)),
            integration,
            instance,
            first=args.partition,
            last=args.to,
            full=args.full,
        )
    if result.success:
        summary = _summary(result, integration)
        print(f"OK {integration.name}: run {result.run_id} succeeded; {summary}")
        return 0
    reason = _failure_reason(result) or "see the run's logs in the Dagster UI"
    print(f"FAILED {integration.name}: run {result.run_id}: {reason}", file=sys.stderr)
    return 1


def _failure_reason(result: dg.ExecuteInProcessResult) -> str | None:
    """What made a run fail: its first failed step's error, else any error (a resource's)."""
    events = result.all_events
    errors = [event.event_specific_data.error for event in events if event.is_step_failure] or [
        error for event in events if (error := getattr(event.event_specific_data, "error", None))
    ]
    if not errors:
        return None
    error = errors[0]
    # Dagster wraps what a step or resource raised ("Error occurred while executing op ..."):
    # the error it wraps is the one that says what went wrong.
    while error.cause is not None and error.cls_name.startswith("Dagster"):
        error = error.cause
    return error.message.strip()


def cmd_pause(args: argparse.Namespace) -> int:
    """Pause an integration: its schedule skips and its queued runs are canceled."""
    from hermes_orchestration.switch import pause

    _, integration = _integration(args)
    with _instance() as instance:
        change = pause(instance, integration, reason=args.reason)
    print(change.message)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Switch an integration back on once verify passes (or anyway, with --force)."""
    from hermes_orchestration.switch import resume

    _, integration = _integration(args)
    with _instance() as instance:
        change = resume(instance, integration, force=args.force)
    print(change.message, file=sys.stdout if change.ok else sys.stderr)
    return 0 if change.ok else 1


def cmd_status(args: argparse.Namespace) -> int:
    """Every integration's card, from the Dagster instance's run history."""
    import time

    from hermes_orchestration.health import integration_cards, iso, render_cards

    config = _load(args.file)
    now = time.time()
    with _instance() as instance:
        cards = integration_cards(instance, config.integrations, now=now)
    if args.json:
        document = {
            "generated_at": iso(now),
            "integrations": [card.as_json(now) for card in cards],
        }
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(render_cards(cards, now))
    return 0


def _summary(result: dg.ExecuteInProcessResult, integration: Integration) -> str:
    from hermes_orchestration.assets import MASTER_DATA, asset_key

    for event in result.get_asset_materialization_events():
        materialization = event.event_specific_data.materialization
        if materialization.asset_key == asset_key(integration, MASTER_DATA):
            meta = {key: value.value for key, value in materialization.metadata.items()}
            keys = (
                "rows",
                "contacts_inserted",
                "contacts_updated",
                "contacts_unchanged",
                "rejected",
                "partitions_unchanged",
            )
            return ", ".join(f"{key} {meta[key]}" for key in keys if key in meta)
    return "no master data materialized"


def _add_file_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--file",
        "-f",
        default=None,
        help="integrations file (default: $HERMES_INTEGRATIONS_FILE, else ./integrations.yaml)",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    from hermes_orchestration.simulator import add_cli_arguments

    parser = argparse.ArgumentParser(
        prog="hermes-orchestration",
        description="Keeps icomm master data in step with Hermes e-commerce sites.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    validate = sub.add_parser("validate", help="check integrations.yaml; exit 1 on any problem")
    validate.add_argument("file", nargs="?", default=None, help="the file (default as --file)")
    validate.set_defaults(func=cmd_validate)

    schema = sub.add_parser("schema", help="print the JSON Schema of integrations.yaml")
    schema.set_defaults(func=cmd_schema)

    verify = sub.add_parser("verify", help="check an integration's App Token (Verificar)")
    verify.add_argument("name", help="integration name")
    _add_file_argument(verify)
    verify.set_defaults(func=cmd_verify)

    sync = sub.add_parser("sync", help="sync an integration now, recorded in $DAGSTER_HOME")
    sync.add_argument("name", help="integration name")
    sync.add_argument("--partition", default=None, help="partition key (default: the current one)")
    sync.add_argument("--to", default=None, help="last partition key of a range (one run)")
    sync.add_argument(
        "--full",
        action="store_true",
        help="validate and load every partition again, even those unchanged since their last sync",
    )
    _add_file_argument(sync)
    sync.set_defaults(func=cmd_sync)

    pause = sub.add_parser("pause", help="pause an integration (state kept in $DAGSTER_HOME)")
    pause.add_argument("name", help="integration name")
    pause.add_argument("--reason", default="", help="why; shown on its status card")
    _add_file_argument(pause)
    pause.set_defaults(func=cmd_pause)

    resume = sub.add_parser("resume", help="switch an integration back on once verify passes")
    resume.add_argument("name", help="integration name")
    resume.add_argument("--force", action="store_true", help="resume even while verify fails")
    _add_file_argument(resume)
    resume.set_defaults(func=cmd_resume)

    status = sub.add_parser("status", help="every integration's health, from $DAGSTER_HOME")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    _add_file_argument(status)
    status.set_defaults(func=cmd_status)

    simulate = sub.add_parser("simulate", help="serve the bundled Hermes simulator")
    add_cli_arguments(simulate)
    simulate.set_defaults(func=cmd_simulate)

    for register in _EXTRA_COMMANDS:
        register(sub)
    return parser


# Further subcommands register themselves here: (subparsers) -> None.
_EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = []


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status."""
    # Our own messages at INFO; libraries' (Alembic migrating a new instance...) only as warnings.
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except _CommandError as err:
        print(err, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def run() -> NoReturn:
    """The console script: ``main``, then ``exit_without_teardown``."""
    exit_without_teardown(main())


def exit_without_teardown(code: int) -> NoReturn:
    """End the process with ``code`` without tearing the interpreter down.

    Freeing the objects of Dagster and its libraries one by one at exit takes 0.5 to 1 s, longer
    than ``status`` or a small ``sync`` themselves. Once a command is done, its exit handlers
    run (logging's among them) and its output flushed, nothing needs that teardown: the
    operating system takes the memory back at once. A process that still runs a thread of its
    own exits the usual way, which waits for it.
    """
    if any(
        thread.is_alive() and not thread.daemon
        for thread in threading.enumerate()
        if thread is not threading.main_thread()
    ):
        sys.exit(code)
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe: nothing more can be said
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
