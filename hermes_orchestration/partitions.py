"""Partitions definitions of integrations, shared by every integration with the same calendar.

Integrations whose partitions agree (granularity, first partition, time zone) get the very same
``PartitionsDefinition`` object, so that they can share one asset job: one job per calendar keeps
the cost of loading the code location flat as integrations are added.
"""

from __future__ import annotations

from datetime import datetime
from functools import cache

import dagster as dg

from hermes_orchestration.config import Granularity, Integration

# The partition of the current day (or hour) exists while it is still open, so that a schedule
# tick can sync today's changes as they happen instead of waiting for the window to close.
OPEN_PARTITIONS = 1


@cache
def _partitions_def(
    granularity: Granularity, start: datetime, timezone: str
) -> dg.TimeWindowPartitionsDefinition:
    if granularity == Granularity.HOURLY:
        return dg.HourlyPartitionsDefinition(
            start_date=start.strftime("%Y-%m-%d-%H:%M"),
            timezone=timezone,
            end_offset=OPEN_PARTITIONS,
        )
    return dg.DailyPartitionsDefinition(
        start_date=start.strftime("%Y-%m-%d"), timezone=timezone, end_offset=OPEN_PARTITIONS
    )


def partitions_def_for(integration: Integration) -> dg.TimeWindowPartitionsDefinition:
    """The partitions definition of an integration, shared with every identical calendar."""
    return _partitions_def(*integration.partitions_key)


def calendar_name(integration: Integration) -> str:
    """A stable, readable name for an integration's calendar, used to name its shared job."""
    granularity, start, timezone = integration.partitions_key
    zone = "".join(ch if ch.isalnum() else "_" for ch in timezone.lower())
    return f"{granularity.value}_{zone}_from_{start.strftime('%Y%m%d%H')}"
