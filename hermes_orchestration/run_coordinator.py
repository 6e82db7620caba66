"""The run queue of the instance: Dagster's queued run coordinator, tagging runs as it queues them.

Schedules and sensors give their runs the ``integration`` and ``master_database`` tags, but a
run launched from the UI's Materialize button or by a backfill carries none: asset tags become
run tags only once the run executes, long after it was queued. This coordinator adds both tags
at submission, from the tags of the assets the run selects, so that a queued run is listed under
its integration in the UI's run filters, and limits on these tags in ``dagster.yaml``
(``concurrency.runs.tag_concurrency_limits``) apply to every run however it was launched.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import dagster as dg

if TYPE_CHECKING:
    from dagster._core.definitions.assets.graph.remote_asset_graph import (
        RemoteWorkspaceAssetGraph,
    )

log = logging.getLogger(__name__)

# The run tags the queue limits work on; every asset of an integration carries them as asset tags.
INTEGRATION_TAG = "integration"
MASTER_DATABASE_TAG = "master_database"
QUEUE_TAGS = (INTEGRATION_TAG, MASTER_DATABASE_TAG)

# Asset keys are hermes/<integration>/<asset>: the fallback when the workspace lacks a key's tags.
ASSET_KEY_ROOT = "hermes"


class HermesRunCoordinator(dg.QueuedRunCoordinator):
    """``QueuedRunCoordinator`` that tags each run with its integration before queueing it.

    Configured exactly like ``QueuedRunCoordinator`` (same fields, same daemon); only
    ``submit_run`` differs.
    """

    def submit_run(self, context: dg.SubmitRunContext) -> dg.DagsterRun:
        """Add the integration's tags to the run, then queue it."""
        run = context.dagster_run
        asset_graph = _asset_graph(context)
        wanted = integration_tags(selected_asset_keys(run, asset_graph), asset_graph)
        changed = {key: value for key, value in wanted.items() if run.tags.get(key) != value}
        if changed:
            self._instance.add_run_tags(run.run_id, changed)
            reloaded = self._instance.get_run_by_id(run.run_id)
            if reloaded is not None:
                context = context._replace(dagster_run=reloaded)
        return super().submit_run(context)


def selected_asset_keys(
    run: dg.DagsterRun, asset_graph: RemoteWorkspaceAssetGraph | None
) -> list[dg.AssetKey]:
    """The assets ``run`` materializes or checks; for a whole job, every asset of the job."""
    keys: set[dg.AssetKey] = set(run.asset_selection or ())
    keys.update(check.asset_key for check in run.asset_check_selection or ())
    if not keys and asset_graph is not None:
        keys.update(node.key for node in asset_graph.asset_nodes if run.job_name in node.job_names)
    return sorted(keys, key=lambda key: key.to_user_string())


def integration_tags(
    keys: Iterable[dg.AssetKey], asset_graph: RemoteWorkspaceAssetGraph | None
) -> dict[str, str]:
    """The queue tags that all of ``keys`` share; a tag on which they disagree is left out.

    A run spanning several integrations (a whole shared job launched by hand) thus gets no
    ``integration`` tag: no single integration's limit describes it.
    """
    values: dict[str, set[str]] = {tag: set() for tag in QUEUE_TAGS}
    for key in keys:
        tags = _asset_tags(key, asset_graph)
        for tag in QUEUE_TAGS:
            values[tag].add(tags.get(tag, ""))
    return {
        tag: found.pop() for tag, found in values.items() if len(found) == 1 and "" not in found
    }


def _asset_tags(key: dg.AssetKey, asset_graph: RemoteWorkspaceAssetGraph | None) -> dict[str, str]:
    if asset_graph is not None and asset_graph.has(key):
        tags = dict(asset_graph.get(key).tags)
        if tags.get(INTEGRATION_TAG):
            return tags
    path = key.path
    if len(path) == 3 and path[0] == ASSET_KEY_ROOT:
        return {INTEGRATION_TAG: path[1]}
    return {}


def _asset_graph(context: dg.SubmitRunContext) -> RemoteWorkspaceAssetGraph | None:
    try:
        return context.workspace.asset_graph
    except Exception:
        # Queueing must not fail because a code location is unreachable: the asset keys alone
        # still name the integration.
        log.warning(
            "could not read the workspace's assets while queueing run %s; tagging it from its "
            "asset keys alone",
            context.dagster_run.run_id,
            exc_info=True,
        )
        return None
