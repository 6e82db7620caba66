"""Per-partition Parquet files that carry clients from one asset to the next.

Each asset of an integration stages each partition key's rows atomically: a partition's staged
rows are either the complete output of a finished step or absent, never half-written. A step
that fails leaves the previous version of its files in place.

A partition of a row group of rows or more has a file of its own. The small partitions of a step
that stages several (a range run's days or hours) share one file instead, a bundle, in which each
one's rows follow the previous one's, and whose footer says where each partition's rows are: a
file costs about a millisecond to create, write and read back whatever its size, which a year of
daily partitions would pay a thousand times a step. A stage's manifest, one file replaced at
once, names the bundle of each partition that has one; a partition it does not name has a file of
its own or none. Bundles the manifest no longer names are deleted when it is next replaced.
"""

from __future__ import annotations

import bisect
import fcntl
import functools
import json
import os
import shutil
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

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

# Rejected rows come a few hundred per row group validated, each with its whole raw record: they
# are written in smaller row groups, so that a large partition's are not all held until the end
# (23,000 rows, about 20 MB, at 1,000,000 clients).
_REJECTED_ROW_GROUP_ROWS = 4_096

# Row groups of fewer rows are decoded on the reading thread alone (see ``_threaded``).
_THREADED_READ_ROWS = 8_192

# Bundles live in this folder of a stage's folder, with the manifest; a bundle's footer holds,
# under ``_BUNDLE_INDEX``, each partition's first row, row count and metadata. A step publishes
# its files of a stage holding the lock file of the stage's folder.
BUNDLES = ".bundles"
_MANIFEST = "manifest.json"
_LOCK = ".lock"
_BUNDLE_INDEX = "hermes.bundle"
# The key of a stage's bundle among the files being written: no partition key holds a "/".
_BUNDLE = "/bundle"


class MissingStagedDataError(Exception):
    """An upstream partition has not been materialized yet."""


@dataclass(frozen=True)
class PartitionStaging:
    """The staged files of one integration under ``root``."""

    root: Path
    integration: str
    # The row groups of bundles decoded last: a bundle's partitions read one after another
    # decode each of its row groups once.
    _decoded: _DecodedGroups = field(
        default_factory=lambda: _DecodedGroups(), init=False, compare=False, repr=False
    )

    def path(self, stage: str, partition_key: str) -> Path:
        """The file of its own of ``partition_key`` in ``stage`` (e.g. ``raw_clients``); the rows
        of a small partition staged with others are in a bundle instead (see ``version``)."""
        return self.stage_folder(stage) / f"{_safe(partition_key)}.parquet"

    def read(self, stage: str, partition_key: str, columns: list[str] | None = None) -> pa.Table:
        """The whole staged table of a partition (only ``columns`` if given); raises
        MissingStagedDataError when absent."""
        path, footer, member = self._located(stage, partition_key)
        if member is not None:
            return self._decoded.member(path, footer, member, columns)
        # ParquetFile rather than read_table: no dataset to discover, half the cost of reading
        # a small file.
        with pq.ParquetFile(path) as file:
            return file.read(columns=columns, use_threads=_threaded(file.metadata.num_rows))

    def batches(
        self, stage: str, partition_key: str, columns: list[str] | None = None
    ) -> Iterator[pa.RecordBatch]:
        """The staged rows of a partition (only ``columns`` if given), one row group at a time
        (MissingStagedDataError when absent), so that a reader holds a row group, not the
        partition. The file is opened when the reading starts and closed when it ends: a load
        holds the batches of a thousand partitions, not a thousand open files."""
        path, footer, member = self._located(stage, partition_key)
        if member is not None:
            return self._decoded.member_batches(path, footer, member, columns)
        return _read_row_groups(path, columns)

    def _located(self, stage: str, partition_key: str) -> tuple[Path, _Footer, _Member | None]:
        """A partition's file, its footer, and where its rows are if the file is a bundle."""
        folder = self.stage_folder(stage)
        bundle = _manifest(folder).get(partition_key)
        if bundle is None:
            path = self.path(stage, partition_key)
            footer = _footer(path)
            if footer is None:
                raise self._missing(stage, partition_key)
            return path, footer, None
        path = folder / BUNDLES / bundle
        footer = _footer(path)
        if footer is None or footer.members is None or partition_key not in footer.members:
            raise MissingStagedDataError(  # deleted since the manifest was read
                f"{stage} of integration '{self.integration}' for partition {partition_key} was "
                "staged again while it was read: run the step again."
            )
        return path, footer, footer.members[partition_key]

    def _missing(self, stage: str, partition_key: str) -> MissingStagedDataError:
        return MissingStagedDataError(
            f"{stage} of integration '{self.integration}' has no data for partition "
            f"{partition_key}: materialize the upstream asset for that partition first."
        )

    def metadata(self, stage: str, partition_key: str) -> dict[str, str]:
        """The key-value metadata a partition's rows were staged with ({} when absent)."""
        try:
            _, footer, member = self._located(stage, partition_key)
        except MissingStagedDataError:
            return {}
        return dict(footer.metadata if member is None else member.metadata)

    def rows(self, stage: str, partition_key: str) -> int:
        """How many rows a partition's staged file holds (MissingStagedDataError when absent)."""
        _, footer, member = self._located(stage, partition_key)
        return footer.rows if member is None else member.rows

    def exists(self, stage: str, partition_key: str) -> bool:
        """Whether a partition's rows of ``stage`` have been staged."""
        return self.version(stage, partition_key) is not None

    def version(self, stage: str, partition_key: str) -> tuple[object, ...] | None:
        """What identifies a partition's staged rows as they were last staged (None when
        absent): it changes whenever they are staged again, and only then."""
        try:
            _, footer, member = self._located(stage, partition_key)
        except MissingStagedDataError:
            return None
        return footer.identity if member is None else (*footer.identity, partition_key)

    def stage_folder(self, stage: str) -> Path:
        """The folder of a stage's files."""
        return self.root / self.integration / stage

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


@dataclass
class _Small:
    """A finished partition of fewer rows than a row group, none of them written yet."""

    key: str
    rows: pa.Table
    metadata: dict[str, str] | None


class _Bundle:
    """The file being written of a stage's small partitions, one after another."""

    def __init__(self, stage: str, path: Path, schema: pa.Schema) -> None:
        self.stage = stage
        self.file = _StagedFile(path, schema, stage)
        self.members: dict[str, _Member] = {}
        self.rows = 0

    def index(self) -> dict[str, str]:
        """The footer metadata that says where each partition's rows are."""
        members = {
            key: [member.start, member.rows, dict(member.metadata)]
            for key, member in self.members.items()
        }
        return {_BUNDLE_INDEX: json.dumps(members, separators=(",", ":"))}


class StagedWrites:
    """Files being written by one step; see ``PartitionStaging.transaction``.

    Rows are encoded and written by a thread of the step's own, in the order they were handed
    over, while the step goes on (Arrow works without Python's lock): a row group of a large
    partition while the next one is gathered, a bundle's row group of small partitions while the
    step prepares the next partitions. What waits for the thread is bounded by rows, so a step
    holds about two row groups at most, the ones being written and the one being gathered; a
    failure in the thread is raised by the step's next write, finish or close, and fails the
    step.

    A file is opened when the thread writes its first rows and closed when it is finished, so a
    step that works through many partitions holds one or two open files, not one per partition.
    A partition finished with fewer rows than a row group, none of them written yet, goes into
    its stage's bundle once a second such partition is finished; one alone gets its own file.
    """

    def __init__(self, staging: PartitionStaging, scratch: Path) -> None:
        self._staging = staging
        self._scratch = scratch
        self._open_files: dict[tuple[str, str], _StagedFile] = {}  # not finished yet
        self._pending: dict[tuple[str, str], list[pa.RecordBatch]] = {}
        # Where each partition's rows go: its own file, a bundle, or held until it is known.
        self._files: dict[tuple[str, str], Path | _Bundle | _Small] = {}
        self._alone: dict[str, _Small] = {}  # by stage: the one small partition finished so far
        self._bundles: dict[str, _Bundle] = {}  # by stage: the bundle being written
        self._writer_thread = ThreadPoolExecutor(1, thread_name_prefix="staged-writes")
        self._queued: deque[tuple[Future[None], int]] = deque()  # handed over, with their rows

    def write(self, stage: str, partition_key: str, data: pa.Table | pa.RecordBatch) -> None:
        """Append a table or batch to a partition's file, in row groups of ``ROW_GROUP_ROWS``
        (rejected rows: ``_REJECTED_ROW_GROUP_ROWS``).

        Writing to a finished file opens it again (its rows are copied into a new file, which
        drops its metadata): it must be finished again.
        """
        key = (stage, partition_key)
        file = self._open_files.get(key)
        if file is None:
            file = self._open(key, data.schema)
        self._gather(key, file, data)

    def _gather(
        self, key: tuple[str, str], file: _StagedFile, data: pa.Table | pa.RecordBatch
    ) -> None:
        """Add rows to those waiting for ``file``; hand whole row groups to the writer thread."""
        pending = self._pending.setdefault(key, [])
        pending.extend([data] if isinstance(data, pa.RecordBatch) else data.to_batches())
        gathered = sum(batch.num_rows for batch in pending)
        if gathered >= file.group_rows:
            table = pa.Table.from_batches(pending)
            whole = gathered - gathered % file.group_rows
            file.started = True
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
        if file.started:
            self._hand_over(rows.num_rows, file.complete, rows, metadata)
        else:
            self._small(stage, _Small(partition_key, rows, metadata))

    def _small(self, stage: str, small: _Small) -> None:
        """A small partition goes into the stage's bundle; the first one waits for a second."""
        bundle = self._bundles.get(stage)
        if bundle is None:
            first = self._alone.pop(stage, None)
            if first is None:
                self._alone[stage] = self._files[(stage, small.key)] = small
                return
            path = self._scratch / stage / f"{uuid.uuid4().hex}.parquet"
            bundle = self._bundles[stage] = _Bundle(stage, path, first.rows.schema)
            self._into_bundle(bundle, first)
        if small.rows.schema.equals(bundle.file.schema):
            self._into_bundle(bundle, small)
        else:
            self._alone_in_file(stage, small)

    def _into_bundle(self, bundle: _Bundle, small: _Small) -> None:
        metadata = tuple((small.metadata or {}).items())
        bundle.members[small.key] = _Member(bundle.rows, small.rows.num_rows, metadata)
        bundle.rows += small.rows.num_rows
        self._files[(bundle.stage, small.key)] = bundle
        self._gather((bundle.stage, _BUNDLE), bundle.file, small.rows)

    def _alone_in_file(self, stage: str, small: _Small) -> None:
        del self._files[(stage, small.key)]
        file = self._open((stage, small.key), small.rows.schema)
        del self._open_files[(stage, small.key)]
        self._hand_over(small.rows.num_rows, file.complete, small.rows, small.metadata)

    def _finish_bundle(self, stage: str) -> None:
        bundle = self._bundles.pop(stage)
        pending = self._pending.pop((stage, _BUNDLE), [])
        rows = pa.Table.from_batches(pending, bundle.file.schema)
        self._hand_over(rows.num_rows, bundle.file.complete, rows, bundle.index())

    def _open(self, key: tuple[str, str], schema: pa.Schema) -> _StagedFile:
        stage, partition_key = key
        finished = self._files.get(key)
        path = self._scratch / stage / f"{_safe(partition_key)}.{uuid.uuid4().hex}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        file = self._open_files[key] = _StagedFile(path, schema, stage)
        self._files[key] = path
        # Written again after it was finished: carry its rows over.
        if isinstance(finished, Path):
            self._wait(-1)  # (the thread may not have completed it yet)
            self._pending.setdefault(key, []).extend(_read_row_groups(finished, None))
            finished.unlink()
        elif isinstance(finished, _Small):
            del self._alone[stage]
            self._pending.setdefault(key, []).extend(finished.rows.to_batches())
        elif isinstance(finished, _Bundle):  # its rows stay there, unread by anyone
            if self._bundles.get(stage) is finished:
                self._finish_bundle(stage)
            self._wait(-1)
            footer = _footer(finished.file.path)
            assert footer is not None and footer.members is not None
            member = footer.members[partition_key]
            batches = _DecodedGroups().member_batches(finished.file.path, footer, member, None)
            self._pending.setdefault(key, []).extend(batches)
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
                for stage in list(self._alone):
                    self._alone_in_file(stage, self._alone.pop(stage))
                for stage in list(self._bundles):
                    self._finish_bundle(stage)
                self._wait(-1)
        finally:
            for done, _ in self._queued:
                done.exception()  # written or failed, never left running
            self._queued.clear()
            for file in self._open_files.values():
                file.close()
            for bundle in self._bundles.values():
                bundle.file.close()
            self._open_files.clear()
            self._bundles.clear()
            self._alone.clear()
            self._pending.clear()
            self._writer_thread.shutdown()

    def publish(self) -> None:
        """Put the finished files in place: each file of its own with one atomic rename, the
        partitions of bundles with one replacement of their stage's manifest. A stage's files
        are published under its lock, so that of two steps staging the same partition at once,
        the one that publishes last is the one read."""
        for stage in sorted({stage for stage, _ in self._files}):
            files = {key: where for (at, key), where in self._files.items() if at == stage}
            folder = self._staging.stage_folder(stage)
            folder.mkdir(parents=True, exist_ok=True)
            with _locked(folder / _LOCK):
                self._publish_stage(stage, files)
        self._files.clear()

    def _publish_stage(self, stage: str, files: dict[str, Path | _Bundle | _Small]) -> None:
        # A file of its own is put in place before the manifest stops naming a bundle for its
        # partition, a bundle before the manifest names it: readers see one version or the
        # other, never none.
        folder = self._staging.stage_folder(stage)
        before = _manifest(folder)
        manifest = dict(before)
        for bundle in {id(where): where for where in files.values()}.values():
            if isinstance(bundle, _Bundle):
                (folder / BUNDLES).mkdir(exist_ok=True)
                os.replace(bundle.file.path, folder / BUNDLES / bundle.file.path.name)
        for key, where in files.items():
            if isinstance(where, _Bundle):
                manifest[key] = where.file.path.name
            else:
                assert isinstance(where, Path)  # a small partition alone has a file by now
                os.replace(where, self._staging.path(stage, key))
                manifest.pop(key, None)
        if manifest == before:
            return
        written = folder / BUNDLES / f"{uuid.uuid4().hex}.json"
        written.write_text(json.dumps(manifest, separators=(",", ":")))
        os.replace(written, folder / BUNDLES / _MANIFEST)
        for key, where in files.items():
            if isinstance(where, _Bundle):  # the file it had of its own, if any
                self._staging.path(stage, key).unlink(missing_ok=True)
        named = set(manifest.values())
        with os.scandir(folder / BUNDLES) as entries:
            for entry in entries:
                if entry.name.endswith(".parquet") and entry.name not in named:
                    os.unlink(entry.path)


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold the lock of a stage: one step at a time publishes its files."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _manifest(folder: Path) -> Mapping[str, str]:
    """The bundle of each partition of a stage that has one, read once per version of the
    manifest."""
    path = folder / BUNDLES / _MANIFEST
    try:
        stat = path.stat()
    except FileNotFoundError:
        return {}
    return _read_manifest(str(path), _identity(stat))


@functools.lru_cache(maxsize=64)
def _read_manifest(path: str, identity: tuple[int, int, int, int]) -> Mapping[str, str]:
    try:
        manifest = json.loads(Path(path).read_bytes())
    except FileNotFoundError:  # replaced since its identity was read: the newer one
        return _manifest(Path(path).parent.parent)
    except ValueError as error:
        raise _unreadable_manifest(path, f"not JSON: {error}") from None
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        raise _unreadable_manifest(path, "not a map of partition keys to bundle names")
    return MappingProxyType(manifest)


def _unreadable_manifest(path: str, why: str) -> MissingStagedDataError:
    folder = Path(path).parent.parent
    return MissingStagedDataError(
        f"{path} cannot be read ({why}): delete the folder {folder} and materialize the stage's "
        "partitions again."
    )


class _StagedFile:
    """A staged file as the writer thread writes it: created with its first rows."""

    def __init__(self, path: Path, schema: pa.Schema, stage: str) -> None:
        self.path = path
        self.schema = schema
        self.group_rows = ROW_GROUP_ROWS  # rows gathered per row group
        if stage == REJECTED:
            self.group_rows = min(ROW_GROUP_ROWS, _REJECTED_ROW_GROUP_ROWS)
        self.started = False  # rows handed to the writer thread before the file was finished
        self._writer: pq.ParquetWriter | None = None

    def write(self, rows: pa.Table) -> None:
        if self._writer is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = pq.ParquetWriter(self.path, self.schema, **_WRITE_OPTIONS)
        self._writer.write_table(rows, row_group_size=self.group_rows)

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
class _Member:
    """Where a partition's rows are in a bundle, and the metadata they were staged with."""

    start: int
    rows: int
    metadata: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class _Footer:
    identity: tuple[int, int, int, int]  # see ``_identity``
    rows: int
    metadata: tuple[tuple[str, str], ...]
    members: Mapping[str, _Member] | None = None  # a bundle's partitions
    group_starts: tuple[int, ...] = ()  # a bundle's first row of each row group, then its rows
    schema: pa.Schema | None = None  # a bundle's


def _footer(path: Path) -> _Footer | None:
    """The row count and key-value metadata of a staged file (None when absent), read once for
    each version of the file: a range run asks a thousand partitions for both, step after step,
    and a bundle's partitions share its footer."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return _read_footer(str(path), _identity(stat))


def _identity(stat: os.stat_result) -> tuple[int, int, int, int]:
    """What tells one version of a file from another: device, inode, modification time, size."""
    return (stat.st_dev, stat.st_ino, stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4096)
def _read_footer(path: str, identity: tuple[int, int, int, int]) -> _Footer:
    with pq.ParquetFile(path) as file:
        footer = file.metadata
        stored = footer.metadata or {}
        index = stored.get(_BUNDLE_INDEX.encode())
        metadata = tuple(
            (key.decode(), value.decode())
            for key, value in stored.items()
            if not key.startswith(b"ARROW:")  # Arrow's own copy of the schema
        )
        if index is None:
            return _Footer(identity, footer.num_rows, metadata)
        members = {
            key: _Member(start, rows, tuple(values.items()))
            for key, (start, rows, values) in json.loads(index).items()
        }
        starts = [0]
        for group in range(footer.num_row_groups):
            starts.append(starts[-1] + footer.row_group(group).num_rows)
        schema = file.schema_arrow.remove_metadata()
        return _Footer(identity, footer.num_rows, (), members, tuple(starts), schema)


class _DecodedGroups:
    """The row group decoded last of each of a few bundles (a load reads a partition's valid and
    rejected rows in turn), so that reading a bundle's partitions one after another decodes
    each of its row groups once."""

    _KEPT = 2

    def __init__(self) -> None:
        self._groups: OrderedDict[tuple[object, ...], tuple[int, pa.Table]] = OrderedDict()

    def member(
        self, path: Path, footer: _Footer, member: _Member, columns: list[str] | None
    ) -> pa.Table:
        """A bundle's partition's rows (only ``columns`` if given)."""
        tables = list(self._slices(path, footer, member, columns))
        if not tables:
            assert footer.schema is not None
            schema = footer.schema
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return tables[0] if len(tables) == 1 else pa.concat_tables(tables)

    def member_batches(
        self, path: Path, footer: _Footer, member: _Member, columns: list[str] | None
    ) -> Iterator[pa.RecordBatch]:
        """A bundle's partition's rows, a row group's share at a time."""
        for table in self._slices(path, footer, member, columns):
            yield from table.to_batches()

    def _slices(
        self, path: Path, footer: _Footer, member: _Member, columns: list[str] | None
    ) -> Iterator[pa.Table]:
        end = member.start + member.rows
        starts = footer.group_starts
        for index in range(max(bisect.bisect_right(starts, member.start) - 1, 0), len(starts) - 1):
            low, high = starts[index], starts[index + 1]
            if low >= end:
                break
            table = self._group(path, footer, index, columns)
            at = max(member.start, low)
            yield table.slice(at - low, min(end, high) - at)

    def _group(
        self, path: Path, footer: _Footer, index: int, columns: list[str] | None
    ) -> pa.Table:
        key = (footer.identity, None if columns is None else tuple(columns))
        kept = self._groups.get(key)
        if kept is not None and kept[0] == index:
            self._groups.move_to_end(key)
            return kept[1]
        changed = MissingStagedDataError(
            f"{path} was staged again while it was read: run the step again."
        )
        try:
            with open(path, "rb") as source:
                if _identity(os.fstat(source.fileno())) != footer.identity:
                    raise changed
                with pq.ParquetFile(source) as file:
                    rows = footer.group_starts[index + 1] - footer.group_starts[index]
                    threads = _threaded(rows)
                    table = file.read_row_group(index, columns=columns, use_threads=threads)
        except FileNotFoundError:  # deleted since: another run staged the partition again
            raise changed from None
        table = table.replace_schema_metadata(None)  # not the bundle's index
        self._groups[key] = (index, table)
        self._groups.move_to_end(key)
        while len(self._groups) > self._KEPT:
            self._groups.popitem(last=False)
        return table


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
