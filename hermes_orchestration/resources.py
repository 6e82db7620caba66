"""Dagster resources: the Hermes API, the master database and the staged files.

Secrets never pass through run config: the App Token of an integration is read, when a run needs
it, from the environment variable that ``integrations.yaml`` names, and the master database URL
(which may hold a password) from ``HERMES_MASTERDATA_URL``.

What a resource works with (the HTTP client, Arrow, the database drivers) is imported when a run
uses it: the code server, the daemon and ``hermes-orchestration status`` load the definitions
without them.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import dagster as dg
from pydantic import Field, PrivateAttr

from hermes_orchestration import settings
from hermes_orchestration.config import Integration

if TYPE_CHECKING:
    from hermes_orchestration.hermes_client import HermesClient
    from hermes_orchestration.masterdata import MasterDataStore
    from hermes_orchestration.staging import PartitionStaging


class HermesApiResource(dg.ConfigurableResource):
    """Opens HTTP clients towards Hermes sites, with one retry policy for all of them."""

    timeout_seconds: float = Field(default=30.0, description="Timeout of one HTTP request.")
    max_attempts: int = Field(default=6, description="Attempts of one request before giving up.")
    max_total_seconds: float = Field(
        default=300.0, description="Time budget of one request, retries and waits included."
    )
    base_delay_seconds: float = Field(default=0.5, description="First backoff delay.")

    def client(self, integration: Integration, *, logger: Any | None = None) -> HermesClient:
        """A client for ``integration``; its token is read now from the env var the YAML names.

        Raises:
            MissingTokenError: the environment variable is not set, before any request is made.
        """
        from hermes_orchestration.hermes_client import HermesClient, RetryPolicy

        return HermesClient.from_env(
            integration.site_url,
            integration.app_token_env,
            page_size=integration.page_size,
            max_requests_per_second=integration.max_requests_per_second,
            retry=RetryPolicy(
                max_attempts=self.max_attempts,
                base_delay=self.base_delay_seconds,
                max_total_seconds=self.max_total_seconds,
                timeout=self.timeout_seconds,
            ),
            logger=logger,
        )


class MasterDataResource(dg.ConfigurableResource):
    """The icomm master databases, at the SQLAlchemy URL held by an environment variable."""

    url_env: str = Field(
        default=settings.MASTERDATA_URL_ENV,
        description="Name of the env var with the master database URL; unset: a local SQLite file.",
    )
    _store: Any = PrivateAttr(default=None)  # a MasterDataStore while a run executes

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        from hermes_orchestration.masterdata import MasterDataStore

        self._store = MasterDataStore(settings.masterdata_url(self.url_env))

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._store is not None:
            self._store.dispose()
            self._store = None

    @property
    def store(self) -> MasterDataStore:
        """The open store (schema created on first use)."""
        if self._store is None:
            raise RuntimeError("MasterDataResource used outside of a Dagster execution")
        return self._store


class StagingResource(dg.ConfigurableResource):
    """The folder of per-partition Parquet files passed between the assets."""

    root: str | None = Field(
        default=None, description="Folder of staged files; default: staging/ in HERMES_STATE_DIR."
    )

    def for_integration(self, integration: Integration) -> PartitionStaging:
        """The staged files of one integration."""
        from hermes_orchestration.staging import PartitionStaging

        root = Path(self.root) if self.root else settings.staging_dir()
        return PartitionStaging(root=root, integration=integration.name)
