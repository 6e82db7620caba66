"""What each step of a sync does: fetch, validate and load the partitions of one run.

A run covers one partition or, for a single-run backfill, a range of them. The fetch lists the
whole range in one paged window and files each row under its partition; validation and loading
then work partition by partition, so a range run equals partition-by-partition runs.
"""

from __future__ import annotations

import functools
import re
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import dagster as dg
import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from hermes_orchestration import listings, memory, storage_connections
from hermes_orchestration.config import Integration
from hermes_orchestration.fingerprints import (
    CONTENT_KEY,
    SUMMARY_KEY,
    ContentDigest,
    loaded_from,
    validated_from,
)
from hermes_orchestration.hermes_client import (
    AuthError,
    CursorExpiredError,
    HermesError,
    ScopeError,
)
from hermes_orchestration.masterdata import LoadResult, PartitionRows
from hermes_orchestration.partitions import partitions_def_for
from hermes_orchestration.records import (
    CLEAN_SCHEMA,
    RAW_SCHEMA,
    REJECTED_SCHEMA,
    encode_each,
    records_to_batch,
)
from hermes_orchestration.staging import (
    RAW,
    REJECTED,
    ROW_GROUP_ROWS,
    VALID,
    PartitionStaging,
    StagedWrites,
)
from hermes_orchestration.tags import (
    CREDENTIALS_FAILURE,
    FAILURE_TAG,
    FULL_SYNC_TAG,
    HTTP_STATUS_TAG,
    run_tags,
)
from hermes_orchestration.validation import (
    ValidationResult,
    latest_versions,
    updated_instants,
    validate_partitions,
    validate_row_groups,
)

# A range run has PostgreSQL measure the master tables again once this many rows were inserted,
# then each time they double (see MasterDataStore.refresh_statistics).
REFRESH_STATISTICS_ROWS = 20_000

# A range run merges consecutive partitions into the master data together, up to this many rows:
# each transaction has a fixed cost (working tables, indexes built again on first loads), and
# holds its master database's lock for a few seconds at most.
LOAD_GROUP_ROWS = 250_000

# A cursor that expires mid-window restarts the window from its first page, this many times.
MAX_WINDOW_RESTARTS = 3

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def tag_run(context: dg.AssetExecutionContext, integration: Integration) -> None:
    """Make sure the run carries the integration's tags, whoever launched it.

    Schedules and sensors set them when they request a run; a run launched from the UI's
    Materialize button or the CLI gets them here, so the run list filters per integration.
    """
    wanted = run_tags(integration)
    missing = {key: value for key, value in wanted.items() if context.run.tags.get(key) != value}
    if missing:
        context.instance.add_run_tags(context.run.run_id, missing)


def _begin_step(context: dg.AssetExecutionContext, integration: Integration) -> None:
    """What every step does first: tag the run, and set up the process that runs it (it keeps
    its connections to Dagster's storage and gives freed memory back)."""
    tag_run(context, integration)
    storage_connections.keep_connections(context.instance)
    memory.map_large_blocks()
    memory.exempt_long_lived_objects()


def fetch_raw_clients(
    context: dg.AssetExecutionContext, integration: Integration
) -> dg.MaterializeResult:
    """Fetch the run's window page by page and stage each row under its partition."""
    _begin_step(context, integration)
    partitions_def = partitions_def_for(integration)
    keys = list(context.partition_keys)
    windows = [partitions_def.time_window_for_partition_key(key) for key in keys]
    since, until = windows[0].start, windows[-1].end
    span = f"[{since.isoformat()}, {until.isoformat()})"
    starts = [window.start for window in windows[1:]]
    staging = context.resources.staging.for_integration(integration)
    # A full sync stages every page again; others only the pages that changed.
    previous = None if full_sync(context) else listings.previous_listing(staging, keys, span)

    for attempt in range(1, MAX_WINDOW_RESTARTS + 1):
        progress = _Progress(context.log, span)
        try:
            with (
                context.resources.hermes_api.client(integration, logger=context.log) as client,
                staging.transaction() as writes,
            ):
                staged = _RawPartitions(writes, staging, keys, starts, previous)
                for page in client.iter_pages(since, until):
                    staged.page(page.records)
                    progress.page(page)
                staged.complete()
            break
        except CursorExpiredError as err:
            if attempt == MAX_WINDOW_RESTARTS:
                _tag_failure(context, err)
                raise _failure(integration, err) from err
            context.log.warning(
                f"the listing cursor expired on page {progress.pages + 1}; restarting the window "
                f"from its first page (attempt {attempt + 1} of {MAX_WINDOW_RESTARTS}); "
                f"request id {err.request_id}"
            )
        except HermesError as err:
            _tag_failure(context, err)
            raise _failure(integration, err) from err
    progress.done()
    if staged.pages_as_before:
        context.log.info(
            f"{staged.pages_as_before} of {progress.pages} pages as in the last fetch of this "
            "window: their rows, already staged, were not staged again"
        )
    try:
        staged.record(span)
    except OSError as err:  # only a shortcut for the next fetch is lost
        context.log.warning(f"could not record the listing of window {span}: {err}")
    return dg.MaterializeResult(
        metadata={
            "rows_fetched": sum(staged.counts),
            "pages": progress.pages,
            "pages_as_before": staged.pages_as_before,
            "window_start": since.isoformat(),
            "window_end": until.isoformat(),
            "partitions": len(keys),
        }
    )


class _RawPartitions:
    """The raw files of a run's partitions while the listing is read: each row is filed under
    its partition, and each file is finished, with the digest of its content, once the listing
    has moved past its partition. So a range run holds one open file, not one per partition.

    Pages equal to the first ones of the ``previous`` listing of the window are only counted:
    their rows are the first ones of the staged files. A partition that gets other rows starts
    its new file with those it keeps; one that gets none keeps its staged file as it is.
    """

    def __init__(
        self,
        writes: StagedWrites,
        staging: PartitionStaging,
        keys: list[str],
        starts: list[datetime],
        previous: listings.Listing | None,
    ) -> None:
        self._writes = writes
        self._staging = staging
        self._keys = keys
        # The start instants of the partitions but the first, in microseconds since the epoch.
        self._starts = np.array([(start - _EPOCH) // _MICROSECOND for start in starts], np.int64)
        self._previous = previous
        self._recorded = previous.pages if previous else None  # as the record holds them
        self._previous_contents = previous.contents if previous else {}
        self.counts = [0] * len(keys)
        self.pages: list[listings.PageEntry] = []
        self._hashed: dict[int, Future[str]] = {}  # digests of pages being hashed, by position
        self.pages_as_before = 0
        self._digests = [ContentDigest() for _ in keys]
        self._kept: dict[int, int] = {}  # rows of a staged file listed again, not copied yet
        self._copied: dict[int, int] = {}  # rows of a staged file copied into the new one
        self._standing: set[int] = set()  # finished by keeping the staged file as it is
        self._open: set[int] = set()
        self._current = 0  # the partition of the latest row
        self._done = 0  # the partitions before this one are finished

    def page(self, records: list[Any]) -> None:
        """File a page's rows, or count them if the page is the previous listing's next one."""
        if self._previous is None:
            # Nothing to compare with: the digest is only recorded. It is made from the records'
            # encodings that the batch needs anyway, and hashed off this thread.
            encoded = encode_each(records)
            if encoded is not None:
                self._hashed[len(self.pages)] = _hashing().submit(
                    listings.digest_of_encoded, encoded
                )
            self._file(records, None, encoded)
            return
        digest = listings.page_digest(records)
        pages = self._previous.pages
        if self.pages_as_before < len(pages):
            entry = pages[self.pages_as_before]
            if digest is not None and entry.digest == digest and entry.count == len(records):
                self.pages_as_before += 1
                self.pages.append(entry)
                for index, rows in entry.rows:
                    self.counts[index] += rows
                    self._kept[index] = self._kept.get(index, 0) + rows
                self._current = entry.last
                self._complete_before(self._current)
                return
        self._previous = None  # the listing differs from here on
        self._file(records, digest, None)

    def _file(self, records: list[Any], digest: str | None, encoded: list[bytes] | None) -> None:
        """File a page's rows under their partitions (``encoded``: their ``encode_each``)."""
        batch = records_to_batch(records, encoded)
        buckets: list[tuple[int, np.ndarray | None]] = [(0, None)]  # one partition: all its own
        if len(self._starts):
            buckets, self._current = _by_partition(batch, self._starts, self._current)
        for index, positions in buckets:
            rows = batch if positions is None else _rows_at(batch, positions)
            self._add(index, rows)
            self.counts[index] += rows.num_rows
        counts = tuple(
            (index, len(records) if positions is None else len(positions))
            for index, positions in buckets
        )
        self.pages.append(listings.PageEntry(digest, counts, self._current))
        self._complete_before(self._current)

    def complete(self) -> None:
        """The listing has ended: finish every partition not finished yet."""
        for index in sorted(self._open | set(range(self._done, len(self._keys)))):
            self._finish(index)

    def record(self, window: str) -> None:
        """Record the listing for the next fetch of ``window``, unless it is the one recorded."""
        pages = [
            replace(page, digest=self._hashed[at].result()) if at in self._hashed else page
            for at, page in enumerate(self.pages)
        ]
        if pages != self._recorded:
            listings.record_listing(self._staging, self._keys, window, pages, self._contents())

    def _contents(self) -> dict[str, str]:
        """The content digest of each partition's staged file, once complete."""
        return {
            key: (
                self._previous_contents[key]
                if index in self._standing
                else self._digests[index].hexdigest()
            )
            for index, key in enumerate(self._keys)
        }

    def _add(self, index: int, batch: pa.RecordBatch) -> None:
        if index in self._kept:
            self._copy_kept(index)
        self._writes.write(RAW, self._keys[index], batch)
        self._digests[index].update(batch)
        self._open.add(index)

    def _complete_before(self, index: int) -> None:
        """The listing is ordered by updated_at: the partitions before ``index`` are complete.
        (A row listed out of order later opens its partition's file again.)"""
        for earlier in range(self._done, index):
            self._finish(earlier)
        self._done = max(self._done, index)

    def _finish(self, index: int) -> None:
        key = self._keys[index]
        if index in self._kept and index not in self._open:
            if index not in self._copied and self._kept[index] == self._staging.rows(RAW, key):
                self._standing.add(index)  # listed again whole: the staged file stands
                return
            self._copy_kept(index)
        if self.counts[index] == 0:
            self._writes.write(RAW, key, RAW_SCHEMA.empty_table())
        self._writes.finish(RAW, key, {CONTENT_KEY: self._digests[index].hexdigest()})
        self._open.discard(index)

    def _copy_kept(self, index: int) -> None:
        """Write into a partition's new file the rows of its staged file listed again since the
        last copy (the staged file's rows in order: those before are copied already)."""
        key = self._keys[index]
        start = self._copied.get(index, 0)
        end = start + self._kept.pop(index)
        self._copied[index] = end
        self._standing.discard(index)
        at = 0  # the staged file's row where ``batch`` starts
        for batch in self._staging.batches(RAW, key):
            if at >= end:
                break
            if at + batch.num_rows > start:
                rows = batch.slice(max(start - at, 0), end - max(start, at))
                self._writes.write(RAW, key, rows)
                self._digests[index].update(rows)
            at += batch.num_rows
        self._open.add(index)


def _by_partition(
    batch: pa.RecordBatch, starts: np.ndarray, current: int
) -> tuple[list[tuple[int, np.ndarray | None]], int]:
    """The positions of a page's rows grouped by the index of their partition (None: the whole
    page), and the partition of its last row.

    ``starts`` are the start instants of the run's partitions but the first, in microseconds
    since the epoch; ``current`` is the partition of the previous page's last row. Instants are
    read as validation reads them.
    """
    micros, usable = updated_instants(batch.column("updated_at"))
    # A row without a usable updated_at stays with the row before it (the listing is ordered by
    # updated_at); validation rejects it visibly.
    before = np.maximum.accumulate(np.where(usable, np.arange(len(usable)), -1))
    parts = np.where(before >= 0, np.searchsorted(starts, micros[before], side="right"), current)
    if len(parts) == 0:
        return [], current
    if parts[0] == parts[-1] and (parts == parts[0]).all():
        return [(int(parts[0]), None)], int(parts[0])
    indexes, first = np.unique(parts, return_index=True)
    buckets = [(int(index), np.flatnonzero(parts == index)) for index in indexes[np.argsort(first)]]
    return buckets, int(parts[-1])


def _rows_at(batch: pa.RecordBatch, positions: np.ndarray) -> pa.RecordBatch:
    """The rows of a page at ``positions`` (ascending): a slice of the page when they follow one
    another, as a partition's rows do in a listing ordered by updated_at, else a copy."""
    first = int(positions[0])
    if int(positions[-1]) - first + 1 == len(positions):
        return batch.slice(first, len(positions))
    return batch.take(positions)


@functools.cache
def _hashing() -> ThreadPoolExecutor:
    """The thread that hashes pages' digests (hashlib lets other threads run meanwhile)."""
    return ThreadPoolExecutor(1, thread_name_prefix="page-digests")


class _Progress:
    """Logs a fetch's progress: its first page, then at most one line per ``every`` seconds.

    One Dagster event per page would cost as much as decoding the page; the request id of the
    latest page is in every line, and every failure names its own.
    """

    every = 5.0

    def __init__(self, log: Any, window: str) -> None:
        self._log = log
        self._window = window
        self._last = 0.0
        self.pages = self.clients = 0
        self._request_id: str | None = None

    def page(self, page: Any) -> None:
        self.pages += 1
        self.clients += len(page.records)
        self._request_id = page.request_id
        now = time.monotonic()
        if self.pages == 1 or now - self._last >= self.every:
            self._last = now
            self._write("so far")

    def done(self) -> None:
        self._write("in all")

    def _write(self, when: str) -> None:
        self._log.info(
            f"page {self.pages}: {self.clients} clients {when} of window {self._window} "
            f"(request id {self._request_id})"
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


@dataclass
class _Validated:
    """The counts of a partition's validation, summed over the partitions of a run."""

    rows_in: int = 0
    valid: int = 0
    rejected: int = 0
    duplicates_dropped: int = 0
    duplicate_ids: int = 0
    missing_required: int = 0
    rejected_by_reason: Counter[str] = field(default_factory=Counter)
    cleared_by_reason: Counter[str] = field(default_factory=Counter)

    @classmethod
    def of(cls, result: ValidationResult) -> _Validated:
        return cls(
            rows_in=result.rows_in,
            valid=result.valid.num_rows,
            rejected=result.rejected.num_rows,
            duplicates_dropped=result.duplicates_dropped,
            missing_required=_missing_required(result.valid),
            rejected_by_reason=Counter(result.rejected_by_reason),
            cleared_by_reason=Counter(result.cleared_by_reason),
        )

    @classmethod
    def from_json(cls, text: str) -> _Validated:
        values = orjson.loads(text)
        for name in ("rejected_by_reason", "cleared_by_reason"):
            values[name] = Counter(values[name])
        return cls(**values)

    def to_json(self) -> str:
        return orjson.dumps(vars(self)).decode()  # (asdict would mangle the Counters)

    def add(self, other: _Validated) -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)


def validate_clients(
    context: dg.AssetExecutionContext, integration: Integration
) -> dg.MaterializeResult:
    """Validate each partition of the run and stage its valid and rejected rows.

    A partition whose raw content, rules and settings are those of its staged validation is not
    validated again (unless the run is tagged for a full sync): its staged result stands.
    """
    _begin_step(context, integration)
    staging = context.resources.staging.for_integration(integration)
    today = datetime.now(UTC).astimezone(integration.zone).date()
    totals = _Validated()
    unchanged = 0
    pending: dict[str, str | None] = {}  # the partitions to validate, and their source digest
    with staging.transaction() as writes:
        for key in context.partition_keys:
            raw_content = staging.metadata(RAW, key).get(CONTENT_KEY)
            # Raw rows staged without a digest are of unknown content: never taken as unchanged.
            source = raw_content and validated_from(
                raw_content, default_country=integration.default_country, today=today
            )
            staged = staging.metadata(VALID, key)
            if (
                source
                and not full_sync(context)
                and staged.get(CONTENT_KEY) == source
                and staging.metadata(REJECTED, key).get(CONTENT_KEY) == source
                and SUMMARY_KEY in staged
            ):
                totals.add(_Validated.from_json(staged[SUMMARY_KEY]))
                unchanged += 1
                continue
            pending[key] = source or None
        for group in _validation_groups(staging, list(pending)):
            validated = _validate_group(staging, writes, group, integration.default_country, today)
            for key, counts in zip(group, validated, strict=True):
                source = pending[key]
                content = {CONTENT_KEY: source} if source else {}
                writes.finish(VALID, key, {SUMMARY_KEY: counts.to_json(), **content})
                writes.finish(REJECTED, key, content)
                totals.add(counts)
            memory.give_back_free_pages()
    if unchanged:
        context.log.info(
            f"{unchanged} of {len(context.partition_keys)} partitions unchanged since their "
            "last validation: their staged result stands"
        )
    rejected_by_reason = totals.rejected_by_reason
    if rejected_by_reason:
        context.log.info(f"rejected rows by reason: {dict(rejected_by_reason.most_common())}")

    considered = totals.valid + totals.rejected
    ratio = totals.rejected / considered if considered else 0.0
    top = ", ".join(f"{code}: {count}" for code, count in rejected_by_reason.most_common(3))
    checks = [
        dg.AssetCheckResult(
            check_name="reject_ratio_within_limit",
            passed=ratio <= integration.max_reject_ratio,
            severity=dg.AssetCheckSeverity.ERROR,
            description=(
                f"{totals.rejected} of {considered} rows rejected ({ratio:.2%}); the limit is "
                f"{integration.max_reject_ratio:.2%}. Top reasons: {top or 'none'}."
            ),
            metadata={"reject_ratio": ratio, "rejected": totals.rejected, "rows": considered},
        ),
        dg.AssetCheckResult(
            check_name="no_duplicate_ids",
            passed=totals.duplicate_ids == 0,
            metadata={"duplicate_ids": totals.duplicate_ids},
        ),
        dg.AssetCheckResult(
            check_name="required_fields_present",
            passed=totals.missing_required == 0,
            metadata={"rows_missing_required_fields": totals.missing_required},
        ),
    ]
    return dg.MaterializeResult(
        metadata={
            "rows_fetched": totals.rows_in,
            "rows_valid": totals.valid,
            "rows_rejected": totals.rejected,
            "duplicates_dropped": totals.duplicates_dropped,
            "rejected_by_reason": dict(rejected_by_reason),
            "fields_cleared_by_reason": dict(totals.cleared_by_reason),
            "partitions_unchanged": unchanged,
        },
        check_results=checks,
    )


def _validation_groups(staging: PartitionStaging, keys: list[str]) -> Iterator[list[str]]:
    """Consecutive partitions validated together: small ones, up to a row group's rows in all
    (the rules cost as much per call as for thousands of rows); a larger one alone."""
    return _consecutive(keys, lambda key: staging.rows(RAW, key), ROW_GROUP_ROWS)


def _consecutive(keys: list[str], rows_of: Callable[[str], int], limit: int) -> Iterator[list[str]]:
    """``keys`` in consecutive groups of at most ``limit`` rows in all (a larger one alone)."""
    group: list[str] = []
    rows = 0
    for key in keys:
        count = rows_of(key)
        if group and rows + count > limit:
            yield group
            group, rows = [], 0
        group.append(key)
        rows += count
    if group:
        yield group


def _validate_group(
    staging: PartitionStaging,
    writes: StagedWrites,
    keys: list[str],
    default_country: str,
    today: date,
) -> list[_Validated]:
    """Validate staged partitions; stage each one's results; the counts of each."""
    if len(keys) == 1:
        return [_validate(staging, writes, keys[0], default_country, today)]
    tables = [staging.read(RAW, key) for key in keys]
    results = validate_partitions(  # each judges the latest version of an id in its partition
        pa.concat_tables(tables),
        [table.num_rows for table in tables],
        default_country=default_country,
        today=today,
    )
    validated = []
    for key, result in zip(keys, results, strict=True):
        writes.write(VALID, key, result.valid)
        writes.write(REJECTED, key, result.rejected)
        counts = _Validated.of(result)
        counts.duplicate_ids = _repeated(result.valid.column("hermes_id"))
        validated.append(counts)
    return validated


def _validate(
    staging: PartitionStaging, writes: StagedWrites, key: str, default_country: str, today: date
) -> _Validated:
    """Validate a staged partition one row group at a time; stage the results; their counts.

    Which version of each client is judged is settled first, from the ids and instants of the
    whole partition; then only one row group of the raw rows is held at a time.
    """
    latest = latest_versions(staging.batches(RAW, key, columns=["id", "updated_at"]))
    counts = _Validated()
    valid_ids: list[pa.Array] = []
    writes.write(VALID, key, CLEAN_SCHEMA.empty_table())  # a partition may have no rows
    writes.write(REJECTED, key, REJECTED_SCHEMA.empty_table())
    results = validate_row_groups(
        staging.batches(RAW, key), latest, default_country=default_country, today=today
    )
    for result in results:
        writes.write(VALID, key, result.valid)
        writes.write(REJECTED, key, result.rejected)
        counts.add(_Validated.of(result))
        valid_ids.extend(result.valid.column("hermes_id").chunks)
        del result  # the row group's result is freed before the heap is trimmed
        memory.give_back_free_pages()
    counts.duplicate_ids = _repeated(pa.chunked_array(valid_ids, pa.string()))
    return counts


def _repeated(ids: pa.ChunkedArray) -> int:
    """How many of ``ids`` repeat one before them."""
    return len(ids) - pc.count_distinct(ids).as_py()


def full_sync(context: dg.AssetExecutionContext) -> bool:
    """Whether the run is tagged to validate and load every partition, changed or not."""
    return context.run.tags.get(FULL_SYNC_TAG, "").lower() == "true"


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
    """Load each partition of the run into the master database.

    A partition whose validated content is what its latest load loaded into the same master
    database is not merged again (unless the run is tagged for a full sync): nothing would change.
    The others are merged in order; a range run merges consecutive ones together (see
    ``_load_groups``), which gives the master data of merging them one by one.
    """
    _begin_step(context, integration)
    staging = context.resources.staging.for_integration(integration)
    store = context.resources.masterdata.store
    store.ensure_schema()
    names = {"integration": integration.name, "master_database": integration.master_database}
    rejected_by_reason: Counter[str] = Counter()
    contents: dict[str, str | None] = {}
    for key in context.partition_keys:
        validated = staging.metadata(VALID, key).get(CONTENT_KEY)
        contents[key] = loaded_from(validated) if validated else None
    known = {key: content for key, content in contents.items() if content is not None}
    loaded = {} if full_sync(context) else store.unchanged(**names, contents=known)
    results: list[LoadResult] = []
    for key in [key for key in contents if key in loaded]:  # in the run's order
        rejected_by_reason.update(_staged_reason_counts(staging, key))
        results.append(loaded[key])
        del contents[key]
    unchanged = len(results)
    inserted, refresh_at = 0, REFRESH_STATISTICS_ROWS
    for group in _load_groups(staging, list(contents)):
        if inserted >= refresh_at:  # the tables have doubled since the planner last looked
            store.refresh_statistics()
            refresh_at = 2 * inserted
        partitions = []
        for key in group:
            rejected = staging.read(REJECTED, key)
            rejected_by_reason.update(_reason_counts(rejected))
            valid = staging.batches(VALID, key)
            summary = _validation_summary(staging, key)
            unique = summary is not None and summary.duplicate_ids == 0
            partitions.append(PartitionRows(key, valid, rejected, contents[key], unique))
        result = store.load_partitions(**names, partitions=partitions)
        inserted += result.sources_inserted
        results.append(result)
        memory.give_back_free_pages()
    if unchanged:
        context.log.info(
            f"{unchanged} of {len(context.partition_keys)} partitions already loaded with the "
            f"same content into master database '{integration.master_database}': not merged again"
        )
    totals = LoadResult.combined(results)  # a run always has at least one partition
    info = store.master_database_info(integration.master_database)
    updated_at = info[1] if info else totals.master_database_updated_at
    counts = {
        name: value
        for name, value in totals.as_metadata().items()
        if isinstance(value, int) and not isinstance(value, bool)
    }
    return dg.MaterializeResult(
        metadata={
            **counts,
            "partitions_unchanged": unchanged,
            "rejected_by_reason": dict(rejected_by_reason.most_common()),
            "master_database": integration.master_database,
            "master_database_updated_at": dg.MetadataValue.timestamp(updated_at),
        }
    )


def _load_groups(staging: PartitionStaging, keys: list[str]) -> Iterator[list[str]]:
    """Consecutive partitions to merge in one transaction: at most ``LOAD_GROUP_ROWS`` valid
    rows together (a larger partition alone)."""
    return _consecutive(keys, lambda key: staging.rows(VALID, key), LOAD_GROUP_ROWS)


def _validation_summary(staging: PartitionStaging, key: str) -> _Validated | None:
    """What a partition's validation counted, as written with its valid rows (None: not
    written)."""
    summary = staging.metadata(VALID, key).get(SUMMARY_KEY)
    return None if summary is None else _Validated.from_json(summary)


def _staged_reason_counts(staging: PartitionStaging, key: str) -> dict[str, int]:
    """How many of a partition's staged rejected rows carry each reason code: from the summary
    its validation wrote with them (no need to read a year's thousand files), else counted."""
    summary = _validation_summary(staging, key)
    if summary is not None:
        return summary.rejected_by_reason
    return _reason_counts(staging.read(REJECTED, key))


def _reason_counts(rejected: pa.Table) -> dict[str, int]:
    """How many rejected rows carry each reason code (a row may carry several)."""
    codes = pc.list_flatten(rejected.column("reasons"))
    counts = pc.value_counts(codes).to_pylist()
    return {item["values"]: item["counts"] for item in counts}
