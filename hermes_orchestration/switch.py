"""The on/off switch of an integration, kept in the Dagster instance.

The state lives in the instance's key-value store, one JSON value per integration, so that it
survives restarts of the webserver and the daemon and needs no storage of its own. The switch
that wins is the YAML: ``enabled: false`` pauses an integration until a pull request switches it
back on, whatever the stored state says. Otherwise an integration is paused by hand (the
``pause`` command or the ``hermes_switch`` job) or automatically (the guard sensor, after
repeated credential failures), and switched back on by ``resume``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import dagster as dg

from hermes_orchestration.config import Integration

if TYPE_CHECKING:
    from hermes_orchestration.verification import VerifyOutcome

logger = logging.getLogger(__name__)

SWITCH_KEY_PREFIX = "hermes/switch/"
# Keys read per query: far below every backend's limit on bound parameters.
_READ_CHUNK = 500


class PausedBy(StrEnum):
    """Who paused an integration."""

    HAND = "hand"  # a person: the pause command or the hermes_switch job
    AUTO = "auto"  # the guard sensor, after repeated credential failures
    YAML = "yaml"  # enabled: false in integrations.yaml


@dataclass(frozen=True)
class SwitchState:
    """Whether an integration is paused, by whom, why and since when.

    Attributes:
        paused: True when the integration must not sync automatically.
        by: who paused it (None while it is on).
        reason: why it was paused, or how it was last switched back on.
        changed_at: when it was last paused or resumed (epoch seconds; 0 if never).
        verified_at: when the guard sensor last re-verified it while auto-paused.
        last_verify: the message of that verification.
    """

    paused: bool = False
    by: PausedBy | None = None
    reason: str = ""
    changed_at: float = 0.0
    verified_at: float | None = None
    last_verify: str | None = field(default=None, compare=False)

    @property
    def label(self) -> str:
        """``on``, or ``paused`` and who paused it: ``paused by hand``, ``paused automatically``."""
        return f"paused {_BY_LABEL[self.by]}" if self.paused and self.by else "on"

    @property
    def by_label(self) -> str:
        """``by hand``, ``automatically`` or ``by integrations.yaml``; empty while on."""
        return _BY_LABEL[self.by] if self.paused and self.by else ""

    def to_json(self) -> str:
        """The stored form."""
        return json.dumps(asdict(self), ensure_ascii=False, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SwitchState:
        """Read a stored value; raises ValueError when it is not one this module wrote."""
        data: Any = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        by = data.get("by")
        return cls(
            paused=bool(data.get("paused", False)),
            by=PausedBy(by) if by else None,
            reason=str(data.get("reason") or ""),
            changed_at=float(data.get("changed_at") or 0.0),
            verified_at=float(data["verified_at"]) if data.get("verified_at") else None,
            last_verify=str(data["last_verify"]) if data.get("last_verify") else None,
        )


ON = SwitchState()

_BY_LABEL = {
    PausedBy.HAND: "by hand",
    PausedBy.AUTO: "automatically",
    PausedBy.YAML: "by integrations.yaml",
}


def switch_key(name: str) -> str:
    """The key-value store key of an integration's switch."""
    return SWITCH_KEY_PREFIX + name


def read_switches(instance: dg.DagsterInstance, names: Iterable[str]) -> dict[str, SwitchState]:
    """The stored switch of every integration in ``names`` (on when nothing is stored)."""
    wanted = list(dict.fromkeys(names))
    stored: dict[str, str] = {}
    for start in range(0, len(wanted), _READ_CHUNK):
        keys = {switch_key(name) for name in wanted[start : start + _READ_CHUNK]}
        stored.update(instance.run_storage.get_cursor_values(keys))
    states = {}
    for name in wanted:
        text = stored.get(switch_key(name))
        states[name] = ON if text is None else _parse(name, text)
    return states


def _parse(name: str, text: str) -> SwitchState:
    try:
        return SwitchState.from_json(text)
    except (ValueError, TypeError) as err:
        # Only this module writes these values; an unreadable one must not stop every sync, and
        # must not silently switch an integration on either.
        logger.warning(
            "the stored switch of %s is unreadable (%s); treating it as paused", name, err
        )
        return SwitchState(
            paused=True,
            by=PausedBy.HAND,
            reason=(
                f"the stored switch state is unreadable ({err}); run "
                f"`hermes-orchestration resume {name}` to reset it"
            ),
        )


def read_switch(instance: dg.DagsterInstance, name: str) -> SwitchState:
    """The stored switch of one integration."""
    return read_switches(instance, [name])[name]


def write_switch(instance: dg.DagsterInstance, name: str, state: SwitchState) -> None:
    """Store the switch of one integration."""
    # One key per call: Dagster's upsert of several keys at once skips the new ones.
    instance.run_storage.set_cursor_values({switch_key(name): state.to_json()})


def effective_switch(integration: Integration, stored: SwitchState) -> SwitchState:
    """The switch in force: ``enabled: false`` in the YAML wins over the stored state."""
    if not integration.enabled:
        return SwitchState(
            paused=True,
            by=PausedBy.YAML,
            reason=("enabled: false; set enabled: true in a pull request to switch it back on"),
            changed_at=stored.changed_at,
        )
    return stored


def pause_message(name: str, state: SwitchState) -> str:
    """One line saying that ``name`` is paused, by whom and why."""
    return f"integration '{name}' is {state.label}: {state.reason}"


@dataclass(frozen=True)
class SwitchChange:
    """The outcome of a pause or resume request, ready to print."""

    ok: bool
    message: str
    state: SwitchState


def pause(
    instance: dg.DagsterInstance,
    integration: Integration,
    *,
    reason: str = "",
    by: PausedBy = PausedBy.HAND,
    now: float | None = None,
) -> SwitchChange:
    """Pause ``integration``: its schedule skips and the guard sensor cancels its queued runs."""
    if by == PausedBy.YAML:
        raise ValueError("the YAML pauses an integration through enabled: false, not here")
    name = integration.name
    reason = " ".join(reason.split()) or "no reason given"
    state = SwitchState(
        paused=True, by=by, reason=reason, changed_at=time.time() if now is None else now
    )
    write_switch(instance, name, state)
    logger.info("paused %s (%s): %s", name, by.value, reason)
    note = (
        " It is also disabled in integrations.yaml (enabled: false)."
        if not integration.enabled
        else ""
    )
    return SwitchChange(
        ok=True,
        message=(
            f"PAUSED {name} ({_BY_LABEL[by]}): {reason}. Its schedule skips and its queued "
            f"runs are canceled; `hermes-orchestration resume {name}` switches it back on.{note}"
        ),
        state=state,
    )


def resume(
    instance: dg.DagsterInstance,
    integration: Integration,
    *,
    force: bool = False,
    by: PausedBy = PausedBy.HAND,
    verify: Callable[[Integration], VerifyOutcome] | None = None,
    now: float | None = None,
) -> SwitchChange:
    """Switch ``integration`` back on, once its credentials verify (unless ``force``).

    ``verify`` checks the credentials (default: ``verification.verify_integration``, imported
    only then: reading switches, as ``status`` does, needs no HTTP client).
    """
    name = integration.name
    stored = read_switch(instance, name)
    if not integration.enabled:
        return SwitchChange(
            ok=False,
            message=(
                f"NOT RESUMED {name}: it is disabled in integrations.yaml (enabled: false), "
                "which a resume cannot override; set enabled: true in a pull request."
            ),
            state=effective_switch(integration, stored),
        )
    if not stored.paused:
        return SwitchChange(ok=True, message=f"{name} is already on; nothing to do.", state=stored)
    was = f"was {stored.label}: {stored.reason}"
    if force:
        checked = "without verifying its credentials (forced)"
    else:
        if verify is None:
            from hermes_orchestration.verification import verify_integration

            verify = verify_integration
        outcome = verify(integration)
        if not outcome.ok:
            return SwitchChange(
                ok=False,
                message=(
                    f"NOT RESUMED {name} ({was}): verify failed.\n{outcome.message}\n"
                    f"Fix the App Token, then run `hermes-orchestration resume {name}` again, "
                    f"or `hermes-orchestration resume {name} --force` to switch it on anyway."
                ),
                state=stored,
            )
        checked = "after verify passed"
    state = SwitchState(
        paused=False,
        by=None,
        reason=f"resumed {_BY_LABEL[by]} {checked}",
        changed_at=time.time() if now is None else now,
    )
    write_switch(instance, name, state)
    logger.info("resumed %s (%s) %s", name, by.value, checked)
    return SwitchChange(ok=True, message=f"RESUMED {name} {checked} ({was}).", state=state)


def record_verification(
    instance: dg.DagsterInstance, name: str, state: SwitchState, message: str, now: float
) -> SwitchState:
    """Remember that an auto-paused integration was re-verified, and what verify said."""
    updated = replace(state, verified_at=now, last_verify=message)
    write_switch(instance, name, updated)
    return updated
