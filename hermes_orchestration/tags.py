"""The run tags this code location writes and reads.

Every run of an integration carries ``integration`` and ``master_database`` (the UI's run list
filters on them; the guard sensor and the health view group runs by them). A sync that failed
talking to Hermes says why in ``hermes/failure``; the guard sensor counts consecutive credential
failures from it.
"""

from __future__ import annotations

from hermes_orchestration.config import Integration

FAILURE_TAG = "hermes/failure"
HTTP_STATUS_TAG = "hermes/http_status"
CREDENTIALS_FAILURE = "credentials"  # the site refused the App Token (401) or its scope (403)
# What went wrong in a failed run, in a few lines (its first step failure), for the health view.
FAILURE_SUMMARY_TAG = "hermes/failure_summary"
# A run tagged ``hermes/full_sync: true`` validates and loads every partition again, even those
# whose content has not changed since they were last validated and loaded.
FULL_SYNC_TAG = "hermes/full_sync"


def run_tags(integration: Integration) -> dict[str, str]:
    """The tags that every run of an integration carries, however it was launched."""
    return {"integration": integration.name, "master_database": integration.master_database}
