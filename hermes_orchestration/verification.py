"""The "Verificar" step: does an integration's App Token work, and if not, what to do.

Shared by ``hermes-orchestration verify``, the per-integration verify job in the UI and the guard
sensor that re-verifies auto-paused integrations, so that all three say the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

from hermes_orchestration.config import Integration
from hermes_orchestration.hermes_client import HermesClient, HermesError, RetryPolicy

# A person is waiting for the answer: fail fast rather than retry for minutes.
VERIFY_RETRY = RetryPolicy(max_attempts=3, base_delay=0.5, max_total_seconds=20.0, timeout=10.0)


@dataclass(frozen=True)
class VerifyOutcome:
    """The answer of one verification, ready to print."""

    ok: bool
    message: str
    site_name: str | None = None
    scopes: tuple[str, ...] = ()
    error: str | None = None  # the error type, e.g. AuthError
    hint: str | None = None
    status: int | None = None


def verify_integration(
    integration: Integration, *, retry: RetryPolicy = VERIFY_RETRY
) -> VerifyOutcome:
    """Call the site's ``/verify`` with the integration's token and explain the outcome."""
    try:
        with HermesClient.from_env(
            integration.site_url,
            integration.app_token_env,
            max_requests_per_second=integration.max_requests_per_second,
            retry=retry,
        ) as client:
            verification = client.verify()
    except HermesError as err:
        return VerifyOutcome(
            ok=False,
            message=(
                f"FAILED {integration.name} ({integration.site_url}): {err}\nWhat to do: {err.hint}"
            ),
            error=type(err).__name__,
            hint=err.hint,
            status=err.status,
        )
    scopes = ", ".join(verification.scopes) or "none"
    expires = f"; expires {verification.expires_at.isoformat()}" if verification.expires_at else ""
    return VerifyOutcome(
        ok=True,
        message=(
            f"OK {integration.name}: the App Token in ${integration.app_token_env} works for "
            f"site '{verification.site_name}' ({verification.site_url}); scopes: {scopes}{expires}"
        ),
        site_name=verification.site_name,
        scopes=verification.scopes,
    )
