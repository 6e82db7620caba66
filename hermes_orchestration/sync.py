"""What each step of a sync does: fetch, validate and load the partitions of one run.

A run covers one partition or, for a single-run backfill, a range of them. The fetch lists the
whole range in one paged window and files each row under its partition; validation and loading
then work partition by partition, so a range run equals partition-by-partition runs.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from hermes_orchestration.config import Integration
from hermes_orchestration.hermes_client import (
    AuthError,
    CursorExpiredError,
    HermesError,
    ScopeError,
)
from hermes_orchestration.partitions import partitions_def_for
from hermes_orchestration.records import RAW_SCHEMA, records_to_batch
from hermes_orchestration.staging import RAW, REJECTED, VALID
from hermes_orchestration.validation import validate_partition

# A cursor that expires mid-window restarts the window from its first page, this many times.
MAX_WINDOW_RESTARTS = 3

# Run tags of a sync that failed talking to Hermes: the guard sensor counts consecutive
# credential failures from them, and the UI's run list filters on them.
FAILURE_TAG = "hermes/failure"
HTTP_STATUS_TAG = "hermes/http_status"
CREDENTIALS_FAILURE = "credentials"  # the site refused the App Token (401) or its scope (403)


def tag_run(context: dg.AssetExecutionContext, integration: Integration) -> None:
    """Make sure the run carries the integration's tags, whoever launched it.

    Schedules and sensors set them when they request a run; a run launched from the UI's
    Materialize button or the CLI gets them here, so the run list filters per integration.
    """
    wanted = {"integration": integration.name, "master_database": integration.master_database}
    missing = {key: value for key, value in wanted.items() if context.run.tags.get(key) != value}
    if missing:
        context.instance.add_run_tags(context.run.run_id, missing)


def _instant(value: Any) -> float | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.strip())
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return None
    return parsed.timestamp()


def fetch_raw_clients(
    context: dg.AssetExecutionContext, integration: Integration
) -> dg.MaterializeResult:
    """Fetch the run's window page by page and stage each row under its partition."""
    tag_run(context, integration)
    partitions_def = partitions_def_for(integration)
    keys = list(context.partition_keys)
    windows = [partitions_def.time_window_for_partition_key(key) for key in keys]
    since, until = windows[0].start, windows[-1].end
    starts = [window.start.timestamp() for window in windows[1:]]
    staging = context.resources.staging.for_integration(integration)

    for attempt in range(1, MAX_WINDOW_RESTARTS + 1):
        counts = [0] * len(keys)
        pages = 0
        try:
            with (
                context.resources.hermes_api.client(integration, logger=context.log) as client,
                staging.transaction() as writes,
            ):
                current = 0
                for page in client.iter_pages(since, until):
                    pages += 1
                    buckets: dict[int, list[Any]] = {}
                    for record in page.records:
                        instant = (
                            _instant(record.get("updated_at")) if isinstance(record, dict) else None
                        )
                        if instant is not None:
                            current = min(bisect.bisect_right(starts, instant), len(keys) - 1)
                        # A row without a usable updated_at stays with its neighbours (the listing
                        # is ordered by updated_at); validation rejects it visibly.
                        buckets.setdefault(current, []).append(record)
                    for index, records in buckets.items():
                        writes.write(RAW, keys[index], records_to_batch(records))
                        counts[index] += len(records)
                    context.log.info(
                        f"page {page.number}: {len(page.records)} clients of window "
                        f"[{since.isoformat()}, {until.isoformat()}) "
                        f"(request id {page.request_id})"
                    )
                for index, key in enumerate(keys):
                    if counts[index] == 0:
                        writes.write(RAW, key, RAW_SCHEMA.empty_table())
            break
        except CursorExpiredError as err:
            if attempt == MAX_WINDOW_RESTARTS:
                _tag_failure(context, err)
                raise _failure(integration, err) from err
            context.log.warning(
                f"the listing cursor expired on page {pages + 1}; restarting the window from "
                f"its first page (attempt {attempt + 1} of {MAX_WINDOW_RESTARTS}); "
                f"request id {err.request_id}"
            )
        except HermesError as err:
            _tag_failure(context, err)
            raise _failure(integration, err) from err

    total = sum(counts)
    return dg.MaterializeResult(
        metadata={
            "rows_fetched": total,
            "pages": pages,
            "window_start": since.isoformat(),
            "window_end": until.isoformat(),
            "partitions": len(keys),
        }
    )


def failure_kind(err: HermesError) -> str:
    """``credentials`` for a refused App Token, else the error's name: ``unreachable``, ..."""
    if isinstance(err, AuthError | ScopeError):
        return CREDENTIALS_FAILURE
    name = type(err).__name__.removesuffix("Error")  # CursorExpiredError -> cursor_expired
    return re.sub(r"(?<!^)(?=[A-Z][a-z])", "_", name).lower()


def _tag_failure(context: dg.AssetExecutionContext, err: HermesError) -> None:
    tags = {FAILURE_TAG: failure_kind(err)}
    if err.status is not None:
        tags[HTTP_STATUS_TAG] = str(err.status)
    context.instance.add_run_tags(context.run.run_id, tags)


def _failure(integration: Integration, err: HermesError) -> dg.Failure:
    metadata: dict[str, Any] = {"error": type(err).__name__, "hint": err.hint}
    if err.request_id:
        metadata["request_id"] = err.request_id
    if err.status is not None:
        metadata["http_status"] = err.status
    return dg.Failure(
        description=(
            f"Hermes site of integration '{integration.name}': {err}\nWhat to do: {err.hint}"
        ),
        metadata=metadata,
    )


def validate_clients(
    context: dg.AssetExecutionContext, integration: Integration
) -> dg.MaterializeResult:
    """Validate each partition of the run and stage its valid and rejected rows."""
    tag_run(context, integration)
    staging = context.resources.staging.for_integration(integration)
    today = datetime.now(UTC).astimezone(integration.zone).date()
    rows_in = valid_rows = duplicates = 0
    rejected_by_reason: Counter[str] = Counter()
    cleared_by_reason: Counter[str] = Counter()
    duplicate_ids = 0
    missing_required = 0
    rejected_rows = 0
    with staging.transaction() as writes:
        for key in context.partition_keys:
            result = validate_partition(
                staging.read(RAW, key), default_country=integration.default_country, today=today
            )
            writes.write(VALID, key, result.valid)
            writes.write(REJECTED, key, result.rejected)
            rows_in += result.rows_in
            valid_rows += result.valid.num_rows
            rejected_rows += result.rejected.num_rows
            duplicates += result.duplicates_dropped
            rejected_by_reason.update(result.rejected_by_reason)
            cleared_by_reason.update(result.cleared_by_reason)
            duplicate_ids += _duplicate_ids(result.valid)
            missing_required += _missing_required(result.valid)
    if rejected_by_reason:
        context.log.info(f"rejected rows by reason: {dict(rejected_by_reason.most_common())}")

    considered = valid_rows + rejected_rows
    ratio = rejected_rows / considered if considered else 0.0
    top = ", ".join(f"{code}: {count}" for code, count in rejected_by_reason.most_common(3))
    checks = [
        dg.AssetCheckResult(
            check_name="reject_ratio_within_limit",
            passed=ratio <= integration.max_reject_ratio,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"{rejected_rows} of {considered} rows rejected ({ratio:.2%}); the limit is "
                f"{integration.max_reject_ratio:.2%}. Top reasons: {top or 'none'}."
            ),
            metadata={"reject_ratio": ratio, "rejected": rejected_rows, "rows": considered},
        ),
        dg.AssetCheckResult(
            check_name="no_duplicate_ids",
            passed=duplicate_ids == 0,
            metadata={"duplicate_ids": duplicate_ids},
        ),
        dg.AssetCheckResult(
            check_name="required_fields_present",
            passed=missing_required == 0,
            metadata={"rows_missing_required_fields": missing_required},
        ),
    ]
    return dg.MaterializeResult(
        metadata={
            "rows_fetched": rows_in,
            "rows_valid": valid_rows,
            "rows_rejected": rejected_rows,
            "duplicates_dropped": duplicates,
            "rejected_by_reason": dict(rejected_by_reason),
            "fields_cleared_by_reason": dict(cleared_by_reason),
        },
        check_results=checks,
    )


def _duplicate_ids(valid: pa.Table) -> int:
    ids = valid.column("hermes_id")
    return len(ids) - pc.count_distinct(ids).as_py()


def _missing_required(valid: pa.Table) -> int:
    missing_key = pc.or_(
        pc.is_null(valid.column("hermes_id")), pc.is_null(valid.column("updated_at"))
    )
    live_without_email = pc.and_(
        pc.is_null(valid.column("deleted_at")), pc.is_null(valid.column("email"))
    )
    return pc.sum(pc.or_(missing_key, live_without_email).cast(pa.int64())).as_py() or 0


def load_master_data(
    context: dg.AssetExecutionContext, integration: Integration
) -> dg.MaterializeResult:
    """Load each partition of the run into the master database, one transaction per partition."""
    tag_run(context, integration)
    staging = context.resources.staging.for_integration(integration)
    store = context.resources.masterdata.store
    store.ensure_schema()
    totals: Counter[str] = Counter()
    rejected_by_reason: Counter[str] = Counter()
    last = None
    for key in context.partition_keys:
        rejected = staging.read(REJECTED, key)
        rejected_by_reason.update(_reason_counts(rejected))
        result = store.load_partition(
            integration=integration.name,
            master_database=integration.master_database,
            partition_key=key,
            valid=staging.read(VALID, key),
            rejected=rejected,
        )
        for name, value in result.as_metadata().items():
            if isinstance(value, int) and not isinstance(value, bool):
                totals[name] += value
        last = result
    assert last is not None  # a run always has at least one partition
    info = store.master_database_info(integration.master_database)
    updated_at = info[1] if info else last.master_database_updated_at
    return dg.MaterializeResult(
        metadata={
            **{name: int(value) for name, value in totals.items()},
            "rejected_by_reason": dict(rejected_by_reason.most_common()),
            "master_database": integration.master_database,
            "master_database_updated_at": dg.MetadataValue.timestamp(updated_at),
        }
    )


def _reason_counts(rejected: pa.Table) -> dict[str, int]:
    """How many rejected rows carry each reason code (a row may carry several)."""
    codes = pc.list_flatten(rejected.column("reasons"))
    counts = pc.value_counts(codes).to_pylist()
    return {item["values"]: item["counts"] for item in counts}
