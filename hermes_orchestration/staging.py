"""Per-partition Parquet files that carry clients from one asset to the next.

Each asset of an integration writes one file per partition key, atomically: a file is either the
complete output of a finished step or absent, never half-written. A step that fails leaves the
previous version of its files in place.
"""

from __future__ import annotations

import functools
import os
import shutil
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

RAW = "raw_clients"
VALID = "validated_clients"
REJECTED = "rejected_clients"

# Rows gathered before they are written as one Parquet row group: pages of a thousand rows each
# as a row group of their own would make files slow to write and slower to read.
ROW_GROUP_ROWS = 32_768
# LZ4 decompresses several times faster than zstd; staged files are short-lived scratch data.
# They are read whole, row group by row group: column statistics and dictionaries (most columns
# hold distinct values) would cost a quarter of the writing time and save nothing.
_WRITE_OPTIONS = {"compression": "lz4", "use_dictionary": False, "write_statistics": False}


# Row groups of fewer rows are decoded on the reading thread alone (see ``_threaded``).
_THREADED_READ_ROWS = 8_192


class MissingStagedDataError(Exception):
    """An upstream partition has not been materialized yet."""


@dataclass(frozen=True)
class PartitionStaging:
    """The staged files of one integration under ``root``."""

    root: Path
    integration: str

    def path(self, stage: str, partition_key: str) -> Path:
        """The file of ``stage`` (e.g. ``raw_clients``) for ``partition_key``."""
        return self.root / self.integration / stage / f"{_safe(partition_key)}.parquet"

    def read(self, stage: str, partition_key: str, columns: list[str] | None = None) -> pa.Table:
        """The whole staged table of a partition (only ``columns`` if given); raises
        MissingStagedDataError when absent."""
        # ParquetFile rather than read_table: no dataset to discover, half the cost of reading
        # a small file (a range run reads a thousand).
        with pq.ParquetFile(self._existing(stage, partition_key)) as file:
            return file.read(columns=columns, use_threads=_threaded(file.metadata.num_rows))

    def batches(
        self, stage: str, partition_key: str, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """The staged rows of a partition (only ``columns`` if given), one row group at a time
        (MissingStagedDataError when absent), so that a reader holds a row group, not the
        partition. The file is opened when the reading starts and closed when it ends: a load
        holds the batches of a thousand partitions, not a thousand open files."""
        return _read_row_groups(self._existing(stage, partition_key), columns)

    def _existing(self, stage: str, partition_key: str) -> Path:
        path = self.path(stage, partition_key)
        if not path.exists():
            raise self._missing(stage, partition_key)
        return path

    def _missing(self, stage: str, partition_key: str) -> MissingStagedDataError:
        return MissingStagedDataError(
            f"{stage} of integration '{self.integration}' has no data for partition "
            f"{partition_key}: materialize the upstream asset for that partition first."
        )

    def metadata(self, stage: str, partition_key: str) -> dict[str, str]:
        """The key-value metadata a staged file was written with ({} when absent)."""
        footer = _footer(self.path(stage, partition_key))
        return {} if footer is None else dict(footer.metadata)

    def rows(self, stage: str, partition_key: str) -> int:
        """How many rows a partition's staged file holds (MissingStagedDataError when absent)."""
        footer = _footer(self.path(stage, partition_key))
        if footer is None:
            raise self._missing(stage, partition_key)
        return footer.rows

    def exists(self, stage: str, partition_key: str) -> bool:
        """Whether a partition's file of ``stage`` has been written."""
        return self.path(stage, partition_key).exists()

    @contextmanager
    def transaction(self) -> Iterator[StagedWrites]:
        """Stage files in a private folder; publish them all only when the block succeeds."""
        scratch = self.root / self.integration / ".incoming" / uuid.uuid4().hex
        scratch.mkdir(parents=True, exist_ok=True)
        writes = StagedWrites(self, scratch)
        try:
            yield writes
            writes.close()
            writes.publish()
        finally:
            writes.close(discard=True)
            shutil.rmtree(scratch, ignore_errors=True)


class StagedWrites:
    """Files being written by one step; see ``PartitionStaging.transaction``.

    Rows are encoded and written by a thread of the step's own, in the order they were handed
    over, while the step goes on (Arrow works without Python's lock): a row group of a large
    partition while the next one is gathered, the small files of a range run while the step
    prepares the next partitions. What waits for the thread is bounded by rows, so a step holds
    about two row groups at most, the ones being written and the one being gathered; a failure
    in the thread is raised by the step's next write, finish or close, and fails the step.

    A file is opened when the thread writes its first rows and closed when it is finished, so a
    step that works through many partitions holds one or two open files, not one per partition.
    """

    def __init__(self, staging: PartitionStaging, scratch: Path) -> None:
        self._staging = staging
        self._scratch = scratch
        self._open_files: dict[tuple[str, str], _StagedFile] = {}  # not finished yet
        self._pending: dict[tuple[str, str], list[pa.RecordBatch]] = {}
        self._files: dict[tuple[str, str], Path] = {}
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="staged-writes")
        self._queued: deque[tuple[Future[None], int]] = deque()  # handed over, with their rows

    def write(self, stage: str, partition_key: str, data: pa.Table | pa.RecordBatch) -> None:
        """Append a table or batch to a partition's file, in row groups of ``ROW_GROUP_ROWS``.

        Writing to a finished file opens it again (its rows are copied into a new file, which
        drops its metadata): it must be finished again.
        """
        key = (stage, partition_key)
        file = self._open_files.get(key)
        if file is None:
            file = self._open(key, data.schema)
        pending = self._pending.setdefault(key, [])
        pending.extend([data] if isinstance(data, pa.RecordBatch) else data.to_batches())
        gathered = sum(batch.num_rows for batch in pending)
        if gathered >= ROW_GROUP_ROWS:
            table = pa.Table.from_batches(pending)
            whole = gathered - gathered % ROW_GROUP_ROWS
            self._hand_over(whole, file.write, table.slice(0, whole))
            self._pending[key] = table.slice(whole).to_batches()

    def finish(
        self, stage: str, partition_key: str, metadata: dict[str, str] | None = None
    ) -> None:
        """Complete a partition's file with its key-value ``metadata`` (read back by
        ``PartitionStaging.metadata``) and close it; it is published with the others."""
        key = (stage, partition_key)
        file = self._open_files.pop(key, None)
        if file is None:
            raise KeyError(f"no open file of {stage} for partition {partition_key}")
        pending = self._pending.pop(key, [])
        rows = pa.Table.from_batches(pending) if pending else file.schema.empty_table()
        self._hand_over(rows.num_rows, file.complete, rows, metadata)

    def _open(self, key: tuple[str, str], schema: pa.Schema) -> _StagedFile:
        stage, partition_key = key
        finished = self._files.get(key)
        path = self._scratch / stage / f"{_safe(partition_key)}.{uuid.uuid4().hex}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        file = self._open_files[key] = _StagedFile(path, schema)
        self._files[key] = path
        if finished is not None:  # written again after it was finished: carry its rows over
            self._wait(0)  # (the thread may not have completed it yet)
            self._pending.setdefault(key, []).extend(_read_row_groups(finished, None))
            finished.unlink()
        return file

    def _hand_over(self, rows: int, task: Callable[..., None], *args: object) -> None:
        """Have the writer thread run ``task`` once it has run those handed over before."""
        self._wait(max(ROW_GROUP_ROWS - rows, 0))
        self._queued.append((self._writer_thread.submit(task, *args), rows))

    def _wait(self, rows: int) -> None:
        """Wait until at most ``rows`` rows wait for the writer thread; raise its first error.
        (Finished tasks are let go however many rows are queued.)"""
        queued = sum(count for _, count in self._queued)
        while self._queued and (queued > rows or self._queued[0][0].done()):
            done, count = self._queued.popleft()
            queued -= count
            if (error := done.exception()) is not None:
                raise error

    def close(self, *, discard: bool = False) -> None:
        """Finish every open file without metadata (unless ``discard``: then only close them;
        idempotent)."""
        try:
            if not discard:
                for key in list(self._open_files):
                    self.finish(*key)
                self._wait(-1)
        finally:
            for done, _ in self._queued:
                done.exception()  # written or failed, never left running
            self._queued.clear()
            for file in self._open_files.values():
                file.close()
            self._open_files.clear()
            self._pending.clear()
            self._writer_thread.shutdown()

    def publish(self) -> None:
        """Move the finished files into place, each with one atomic rename."""
        for (stage, partition_key), path in self._files.items():
            target = self._staging.path(stage, partition_key)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        self._files.clear()


class _StagedFile:
    """A staged file as the writer thread writes it: created with its first rows."""

    def __init__(self, path: Path, schema: pa.Schema) -> None:
        self.path = path
        self.schema = schema
        self._writer: pq.ParquetWriter | None = None

    def write(self, rows: pa.Table) -> None:
        if self._writer is None:
            self._writer = pq.ParquetWriter(self.path, self.schema, **_WRITE_OPTIONS)
        self._writer.write_table(rows, row_group_size=ROW_GROUP_ROWS)

    def complete(self, rows: pa.Table, metadata: dict[str, str] | None) -> None:
        """Write the last ``rows`` (a file is written even if it has none) and ``metadata``."""
        try:
            if rows.num_rows or self._writer is None:
                self.write(rows)
            if metadata:
                self._writer.add_key_value_metadata(metadata)  # type: ignore[union-attr]
        finally:
            self.close()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@dataclass(frozen=True)
class _Footer:
    rows: int
    metadata: tuple[tuple[str, str], ...]


def _footer(path: Path) -> _Footer | None:
    """The row count and key-value metadata of a staged file (None when absent), read once for
    each version of the file: a range run asks a thousand files for both, step after step."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _read_footer(str(path), stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _read_footer(path: str, inode: int, mtime_ns: int, size: int) -> _Footer:
    footer = pq.read_metadata(path)
    stored = footer.metadata or {}
    return _Footer(
        footer.num_rows,
        tuple(
            (key.decode(), value.decode())
            for key, value in stored.items()
            if not key.startswith(b"ARROW:")  # Arrow's own copy of the schema
        ),
    )


def _read_row_groups(path: Path, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    with pq.ParquetFile(path) as file:
        yield from _row_groups(file, columns)


def _row_groups(file: pq.ParquetFile, columns: list[str] | None) -> Iterator[pa.RecordBatch]:
    # Row group by row group: ``iter_batches`` over the whole file keeps every row group it has
    # decoded until the file is closed, so reading a partition that way would end up holding all
    # of it (1,000,000 clients: 230 MB of Arrow memory more than one row group).
    for index in range(file.num_row_groups):
        threads = _threaded(file.metadata.row_group(index).num_rows)
        yield from file.read_row_group(index, columns=columns, use_threads=threads).to_batches()


def _threaded(rows: int) -> bool:
    """Whether to decode ``rows`` rows' columns on Arrow's threads: for a small partition's few
    hundred rows, handing the columns out costs more than decoding them (a year's thousand small
    files are read a quarter faster on one thread)."""
    return rows >= _THREADED_READ_ROWS


def _safe(partition_key: str) -> str:
    # Hourly keys look like 2024-01-01-13:00; a colon is not welcome in every file system.
    return partition_key.replace(":", "")
