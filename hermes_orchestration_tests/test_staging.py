"""Staged partitions: whole or absent, in bounded row groups, with what they were made from."""

from __future__ import annotations

import fcntl
import threading
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from hermes_orchestration import staging as staging_module
from hermes_orchestration import sync
from hermes_orchestration.fingerprints import CONTENT_KEY, ContentDigest
from hermes_orchestration.records import records_to_batch
from hermes_orchestration.staging import ROW_GROUP_ROWS, MissingStagedDataError, PartitionStaging
from hermes_orchestration.sync import _RawPartitions


@pytest.fixture
def staging(tmp_path: Path) -> PartitionStaging:
    return PartitionStaging(tmp_path, "tienda_test")


def numbers(start: int, count: int) -> pa.RecordBatch:
    return pa.record_batch({"n": pa.array(range(start, start + count), pa.int64())})


def row_groups(path: Path) -> list[int]:
    metadata = pq.read_metadata(path)
    return [metadata.row_group(index).num_rows for index in range(metadata.num_row_groups)]


def test_pages_are_gathered_into_full_row_groups_in_their_order(staging) -> None:
    with staging.transaction() as writes:
        for page in range(100):
            writes.write("raw_clients", "2026-11-02", numbers(page * 1000, 1000))
    path = staging.path("raw_clients", "2026-11-02")
    groups = row_groups(path)
    assert sum(groups) == 100_000
    assert groups[:-1] == [ROW_GROUP_ROWS] * (len(groups) - 1)
    assert staging.read("raw_clients", "2026-11-02").column("n").to_pylist() == list(range(100_000))


def test_a_partition_is_read_back_one_row_group_at_a_time(staging) -> None:
    rows = 3 * ROW_GROUP_ROWS + 5
    with staging.transaction() as writes:
        writes.write("validated_clients", "2026-11-02", pa.Table.from_batches([numbers(0, rows)]))
    batches = list(staging.batches("validated_clients", "2026-11-02"))
    assert [batch.num_rows for batch in batches] == [ROW_GROUP_ROWS] * 3 + [5]
    assert pa.Table.from_batches(batches).column("n").to_pylist() == list(range(rows))


def test_reading_a_partition_back_holds_one_row_group_at_a_time_however_many_it_has(
    staging,
) -> None:
    groups = 24
    text = pa.array([f"{row:08d}" * 16 for row in range(ROW_GROUP_ROWS)], pa.string())
    group_bytes = text.nbytes
    with staging.transaction() as writes:
        for _ in range(groups):
            writes.write("raw_clients", "2026-11-02", pa.record_batch({"text": text}))
    del text
    before = pa.total_allocated_bytes()
    most = rows = 0
    for batch in staging.batches("raw_clients", "2026-11-02"):
        rows += batch.num_rows
        most = max(most, pa.total_allocated_bytes() - before)
    assert rows == groups * ROW_GROUP_ROWS
    # Held while reading: about one row group, not a growing share of the 24.
    assert most < 3 * group_bytes, (most, group_bytes)


def open_files() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


def test_a_step_through_many_partitions_keeps_only_unfinished_files_open(staging) -> None:
    before = open_files()
    with staging.transaction() as writes:
        for day in range(300):
            key = (date(2026, 1, 1) + timedelta(days=day)).isoformat()
            writes.write("validated_clients", key, numbers(day, 3))
            writes.finish("validated_clients", key, {"day": str(day)})
            assert open_files() <= before + 1
    assert staging.read("validated_clients", "2026-10-27").column("n").to_pylist() == [
        299,
        300,
        301,
    ]
    assert staging.metadata("validated_clients", "2026-10-27") == {"day": "299"}


def test_the_batches_of_many_partitions_hold_one_open_file_at_a_time(staging) -> None:
    # A load merges the partitions of a range together: thousands of small hourly ones.
    keys = [
        (datetime(2026, 1, 1, tzinfo=UTC) + timedelta(hours=hour)).strftime("%Y-%m-%d-%H:%M")
        for hour in range(1500)
    ]
    with staging.transaction() as writes:
        for hour, key in enumerate(keys):
            writes.write("validated_clients", key, numbers(hour, 2))
            writes.finish("validated_clients", key)
    before = open_files()
    streams = [staging.batches("validated_clients", key) for key in keys]
    assert open_files() == before
    most = before
    numbers_read = []
    for stream in streams:
        for batch in stream:
            most = max(most, open_files())
            numbers_read.extend(batch.column("n").to_pylist())
    assert most <= before + 1
    assert open_files() == before
    assert numbers_read == [n for hour in range(1500) for n in (hour, hour + 1)]


def test_a_finished_file_written_again_keeps_its_rows_and_must_be_finished_again(staging) -> None:
    # A listing that is not ordered by updated_at sends a row to a partition already finished.
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, ROW_GROUP_ROWS + 10))
        writes.finish("raw_clients", "2026-11-02", {"hermes.content": "first"})
        writes.write("raw_clients", "2026-11-03", numbers(0, 5))
        writes.write("raw_clients", "2026-11-02", numbers(ROW_GROUP_ROWS + 10, 7))
        writes.finish("raw_clients", "2026-11-02", {"hermes.content": "second"})
    rows = staging.read("raw_clients", "2026-11-02").column("n").to_pylist()
    assert rows == list(range(ROW_GROUP_ROWS + 17))
    assert staging.metadata("raw_clients", "2026-11-02") == {"hermes.content": "second"}
    assert staging.read("raw_clients", "2026-11-03").num_rows == 5
    folder = staging.root / "tienda_test" / "raw_clients"
    assert sorted(path.name for path in folder.glob("*.parquet")) == [
        "2026-11-02.parquet",
        "2026-11-03.parquet",
    ]


def test_a_file_written_again_after_it_was_finished_loses_its_old_metadata(staging) -> None:
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 3))
        writes.finish("raw_clients", "2026-11-02", {"hermes.content": "of three rows"})
        writes.write("raw_clients", "2026-11-02", numbers(3, 1))
    assert staging.read("raw_clients", "2026-11-02").num_rows == 4
    assert staging.metadata("raw_clients", "2026-11-02") == {}


def test_a_failed_step_publishes_nothing_and_keeps_the_previous_files(staging) -> None:
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 10))
    with pytest.raises(RuntimeError), staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(100, 50_000))
        writes.write("raw_clients", "2026-11-03", numbers(0, 10))
        raise RuntimeError("the site went away")
    assert staging.read("raw_clients", "2026-11-02").column("n").to_pylist() == list(range(10))
    assert not staging.exists("raw_clients", "2026-11-03")
    assert not any((staging.root / "tienda_test" / ".incoming").iterdir())


def test_a_row_group_that_cannot_be_written_fails_the_step_and_publishes_nothing(staging) -> None:
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 10))
    text = pa.record_batch({"n": pa.array(["not a number"] * ROW_GROUP_ROWS)})
    # Row groups are written by a thread of the step's: its failure is the step's.
    with pytest.raises(ValueError, match="schema"), staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(100, ROW_GROUP_ROWS))
        writes.write("raw_clients", "2026-11-02", text)
        writes.write("raw_clients", "2026-11-03", numbers(0, 10))
    assert staging.read("raw_clients", "2026-11-02").column("n").to_pylist() == list(range(10))
    assert not staging.exists("raw_clients", "2026-11-03")
    assert not any((staging.root / "tienda_test" / ".incoming").iterdir())


def test_a_file_that_cannot_be_completed_fails_the_step_and_publishes_nothing(staging) -> None:
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 10))
    text = pa.record_batch({"n": pa.array(["not a number"] * 3)})
    # A file's last rows are written by the writer thread when the file is finished.
    with pytest.raises(ValueError, match="schema"), staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(100, ROW_GROUP_ROWS))
        writes.write("raw_clients", "2026-11-02", text)
        writes.finish("raw_clients", "2026-11-02", {"hermes.content": "never"})
        writes.write("raw_clients", "2026-11-03", numbers(0, 10))
    assert staging.read("raw_clients", "2026-11-02").column("n").to_pylist() == list(range(10))
    assert not staging.exists("raw_clients", "2026-11-03")
    assert not any((staging.root / "tienda_test" / ".incoming").iterdir())


def test_writing_a_partition_holds_at_most_two_row_groups_however_many_it_has(
    staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_table = pq.ParquetWriter.write_table

    def slow_disk(writer: pq.ParquetWriter, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.05)  # the step gathers rows faster than they are written
        write_table(writer, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", slow_disk)
    groups = 24
    text = pa.array([f"{row:08d}" * 16 for row in range(ROW_GROUP_ROWS)], pa.string())
    group_bytes = text.nbytes
    before = pa.total_allocated_bytes()
    most = 0
    with staging.transaction() as writes:
        for _ in range(groups):
            page = pa.record_batch({"text": pc.utf8_reverse(text)})  # a new copy each time
            writes.write("raw_clients", "2026-11-02", page)
            del page
            most = max(most, pa.total_allocated_bytes() - before)
    assert staging.rows("raw_clients", "2026-11-02") == groups * ROW_GROUP_ROWS
    # The one being written and the one being gathered, not a queue of the 24.
    assert most < 3 * group_bytes, (most, group_bytes)


def test_finishing_many_files_on_a_slow_disk_holds_at_most_two_row_groups_of_rows(
    staging, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A range run's small files are completed by the writer thread while the step goes on; what
    # waits for it is bounded by rows, not by files.
    write_table = pq.ParquetWriter.write_table

    def slow_disk(writer: pq.ParquetWriter, *args: Any, **kwargs: Any) -> None:
        time.sleep(0.02)
        write_table(writer, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", slow_disk)
    rows = ROW_GROUP_ROWS // 4
    text = pa.array([f"{row:08d}" * 16 for row in range(rows)], pa.string())
    group_bytes = text.nbytes * 4
    before = pa.total_allocated_bytes()
    most = 0
    with staging.transaction() as writes:
        for day in range(40):
            key = (date(2026, 1, 1) + timedelta(days=day)).isoformat()
            writes.write("validated_clients", key, pa.record_batch({"text": pc.utf8_reverse(text)}))
            writes.finish("validated_clients", key, {"day": str(day)})
            most = max(most, pa.total_allocated_bytes() - before)
    assert staging.rows("validated_clients", "2026-02-09") == rows
    assert staging.metadata("validated_clients", "2026-02-09") == {"day": "39"}
    assert most < 3 * group_bytes, (most, group_bytes)


def test_metadata_written_with_a_file_is_read_back_with_it(staging) -> None:
    assert staging.metadata("raw_clients", "2026-11-02") == {}
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 10))
        writes.finish("raw_clients", "2026-11-02", {"hermes.content": "abc"})
    assert staging.metadata("raw_clients", "2026-11-02") == {"hermes.content": "abc"}


def test_a_file_staged_again_is_read_back_with_its_new_rows_and_metadata(staging) -> None:
    # Footers are read once per version of a file: a new version of the same size is another.
    for version in ("1", "2"):
        with staging.transaction() as writes:
            writes.write("raw_clients", "2026-11-02", numbers(int(version), 3))
            writes.finish("raw_clients", "2026-11-02", {"version": version})
        assert staging.metadata("raw_clients", "2026-11-02") == {"version": version}
        assert staging.rows("raw_clients", "2026-11-02") == 3
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 5))
    assert staging.metadata("raw_clients", "2026-11-02") == {}
    assert staging.rows("raw_clients", "2026-11-02") == 5


@pytest.mark.parametrize("read", ["read", "batches", "rows"])
def test_reading_a_partition_never_staged_says_what_to_materialize(staging, read) -> None:
    with pytest.raises(MissingStagedDataError) as error:
        getattr(staging, read)("validated_clients", "2026-11-09")
    assert str(error.value) == (
        "validated_clients of integration 'tienda_test' has no data for partition 2026-11-09: "
        "materialize the upstream asset for that partition first."
    )


def test_a_range_files_late_rows_under_their_partition_with_the_digest_of_all_its_rows(
    staging,
) -> None:
    # Partitions are finished as the listing moves past them; a row listed out of order still
    # lands in its own partition, whose digest then covers it.
    def client(client_id: str, day: int) -> dict[str, str]:
        return {"id": client_id, "updated_at": f"2026-11-0{day}T10:00:00Z", "email": "a@b.cl"}

    keys = ["2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]
    starts = [datetime(2026, 11, day, tzinfo=UTC) for day in (3, 4, 5)]
    with staging.transaction() as writes:
        staged = _RawPartitions(writes, staging, keys, starts, previous=None)
        staged.page([client("1", 2), client("2", 2), client("3", 3)])
        staged.page([client("late", 2), client("4", 4)])
        staged.complete()

    expected = {
        "2026-11-02": [("1", 2), ("2", 2), ("late", 2)],
        "2026-11-03": [("3", 3)],
        "2026-11-04": [("4", 4)],
        "2026-11-05": [],
    }
    for key, rows in expected.items():
        assert staging.read("raw_clients", key).column("id").to_pylist() == [i for i, _ in rows]
        digest = ContentDigest()
        digest.update(records_to_batch([client(*row) for row in rows]))
        assert staging.metadata("raw_clients", key) == {CONTENT_KEY: digest.hexdigest()}
    assert staged.counts == [3, 1, 1, 0]


def test_a_range_files_rows_by_their_instant_and_unreadable_ones_with_the_row_before(
    staging,
) -> None:
    # Offsets are read as instants (10:30-03:00 on the 2nd is 01:30 UTC on the 3rd); a row whose
    # updated_at cannot be read, or that is no object at all, stays with the row before it, and
    # on a page's first row with the last row of the page before.
    keys = ["2026-11-02", "2026-11-03", "2026-11-04"]
    starts = [datetime(2026, 11, day, tzinfo=UTC) for day in (3, 4)]
    pages = [
        [
            {"id": "a", "updated_at": "2026-11-02T23:59:59.999999Z"},
            {"id": "b", "updated_at": "2026-11-02T22:30:00-03:00"},
            {"id": "c", "updated_at": "yesterday"},
            {"id": "d", "updated_at": " 2026-11-03T00:00:00+00:00 "},
        ],
        [
            {"id": "e"},
            "not an object",
            {"id": "f", "updated_at": "2026-11-04T01:59:59.9999999+02:00"},
            {"id": "g", "updated_at": "2026-11-04T02:00:00+02:00"},
            {"id": "h", "updated_at": 20261104},
        ],
    ]
    with staging.transaction() as writes:
        staged = _RawPartitions(writes, staging, keys, starts, previous=None)
        for page in pages:
            staged.page(page)
        staged.complete()

    def ids(key: str) -> list[str | None]:
        return staging.read("raw_clients", key).column("id").to_pylist()

    assert ids("2026-11-02") == ["a"]
    assert ids("2026-11-03") == ["b", "c", "d", "e", None, "f"]
    assert ids("2026-11-04") == ["g", "h"]
    assert staged.counts == [1, 6, 2]
    assert [page.rows for page in staged.pages] == [((0, 1), (1, 3)), ((1, 3), (2, 2))]


def test_a_page_out_of_order_files_each_row_under_its_own_partition_in_listing_order(
    staging,
) -> None:
    # A partition's rows follow one another in a listing ordered by updated_at; in one that is
    # not, they are picked out of the page one by one.
    keys = ["2026-11-02", "2026-11-03", "2026-11-04"]
    starts = [datetime(2026, 11, day, tzinfo=UTC) for day in (3, 4)]
    page = [
        {"id": client_id, "updated_at": f"2026-11-0{day}T10:00:00Z"}
        for client_id, day in (("a", 2), ("b", 3), ("c", 2), ("d", 3), ("e", 4), ("f", 4))
    ]
    with staging.transaction() as writes:
        staged = _RawPartitions(writes, staging, keys, starts, previous=None)
        staged.page(page)
        staged.complete()
    read = [staging.read("raw_clients", key).column("id").to_pylist() for key in keys]
    assert read == [["a", "c"], ["b", "d"], ["e", "f"]]
    assert staged.counts == [2, 2, 2]


def test_a_range_loads_consecutive_partitions_together_up_to_a_number_of_rows(
    staging, monkeypatch
) -> None:
    monkeypatch.setattr(sync, "LOAD_GROUP_ROWS", 6)
    rows = {"2026-11-01": 2, "2026-11-02": 2, "2026-11-03": 2, "2026-11-04": 1}
    rows["2026-11-05"] = 7  # more than 6: alone
    rows["2026-11-06"] = 0
    rows["2026-11-07"] = 6
    with staging.transaction() as writes:
        for key, count in rows.items():
            writes.write("validated_clients", key, numbers(0, count))
    assert list(sync._load_groups(staging, list(rows))) == [
        ["2026-11-01", "2026-11-02", "2026-11-03"],
        ["2026-11-04"],
        ["2026-11-05"],
        ["2026-11-06", "2026-11-07"],
    ]


def test_a_range_validates_small_partitions_together_up_to_a_row_group(staging) -> None:
    rows = {"2026-11-01": 3, "2026-11-02": 0, "2026-11-03": ROW_GROUP_ROWS - 3, "2026-11-04": 1}
    rows["2026-11-05"] = ROW_GROUP_ROWS + 1  # alone
    rows["2026-11-06"] = 2
    with staging.transaction() as writes:
        for key, count in rows.items():
            writes.write("raw_clients", key, numbers(0, count))
    assert list(sync._validation_groups(staging, list(rows))) == [
        ["2026-11-01", "2026-11-02", "2026-11-03"],
        ["2026-11-04"],
        ["2026-11-05"],
        ["2026-11-06"],
    ]


# Small partitions staged together: one bundle per stage and step, named by the stage's manifest.


def days(count: int, first: date = date(2026, 1, 1)) -> list[str]:
    return [(first + timedelta(days=day)).isoformat() for day in range(count)]


def stage_days(staging: PartitionStaging, keys: list[str], start: int = 0, rows: int = 3) -> None:
    """Stage ``rows`` rows for each of ``keys`` in one step, the n-th from ``start + n``."""
    with staging.transaction() as writes:
        for offset, key in enumerate(keys):
            writes.write("validated_clients", key, numbers(start + offset, rows))
            writes.finish("validated_clients", key, {"first": str(start + offset)})


def stage_folder(staging: PartitionStaging) -> list[str]:
    """What the stage's folder holds beside the lock taken to publish into it."""
    folder = staging.root / "tienda_test" / "validated_clients"
    return sorted(path.name for path in folder.iterdir() if path.name != ".lock")


def bundles(staging: PartitionStaging) -> list[str]:
    folder = staging.root / "tienda_test" / "validated_clients" / ".bundles"
    return sorted(path.name for path in folder.glob("*.parquet"))


@pytest.fixture(params=[None, 4], ids=["row-groups-of-32768", "row-groups-of-4"])
def row_groups_of(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """With row groups of 4 rows, most partitions of a bundle straddle two of its row groups."""
    if request.param:
        monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", request.param)


def test_the_small_partitions_of_a_step_share_one_file_and_read_back_as_their_own(
    staging, row_groups_of
) -> None:
    keys = days(365)
    stage_days(staging, keys)
    assert stage_folder(staging) == [".bundles"]  # not 365 files
    assert len(bundles(staging)) == 1
    for offset, key in enumerate(keys):
        expected = [offset, offset + 1, offset + 2]
        assert staging.read("validated_clients", key).column("n").to_pylist() == expected
        batches = staging.batches("validated_clients", key, columns=["n"])
        assert pa.Table.from_batches(list(batches)).column("n").to_pylist() == expected
        assert staging.rows("validated_clients", key) == 3
        assert staging.metadata("validated_clients", key) == {"first": str(offset)}
        assert staging.exists("validated_clients", key)
    assert not staging.exists("validated_clients", "2027-01-01")
    with pytest.raises(MissingStagedDataError, match="no data for partition 2027-01-01"):
        staging.read("validated_clients", "2027-01-01")


def test_an_empty_partition_of_a_bundle_reads_back_empty_with_its_columns(staging) -> None:
    with staging.transaction() as writes:
        writes.write("validated_clients", "2026-01-01", numbers(0, 2))
        writes.finish("validated_clients", "2026-01-01")
        writes.write("validated_clients", "2026-01-02", numbers(0, 0))
        writes.finish("validated_clients", "2026-01-02", {"empty": "yes"})
    assert len(bundles(staging)) == 1
    empty = staging.read("validated_clients", "2026-01-02")
    assert (empty.num_rows, empty.schema.names) == (0, ["n"])
    assert list(staging.batches("validated_clients", "2026-01-02")) == []
    assert staging.metadata("validated_clients", "2026-01-02") == {"empty": "yes"}


def test_a_small_partition_staged_alone_has_a_file_of_its_own(staging) -> None:
    stage_days(staging, ["2026-01-01"])
    assert stage_folder(staging) == ["2026-01-01.parquet"]
    assert staging.read("validated_clients", "2026-01-01").column("n").to_pylist() == [0, 1, 2]


def test_a_partition_of_a_row_group_or_more_keeps_a_file_of_its_own_beside_a_bundle(
    staging,
) -> None:
    with staging.transaction() as writes:
        for key, rows in (("2026-01-01", 2), ("2026-01-02", ROW_GROUP_ROWS), ("2026-01-03", 2)):
            writes.write("validated_clients", key, numbers(0, rows))
            writes.finish("validated_clients", key)
    assert stage_folder(staging) == [".bundles", "2026-01-02.parquet"]
    assert staging.rows("validated_clients", "2026-01-02") == ROW_GROUP_ROWS
    assert staging.rows("validated_clients", "2026-01-03") == 2


def test_a_partition_staged_again_alone_replaces_its_rows_in_the_bundle_and_the_others_stay(
    staging,
) -> None:
    keys = days(3)
    stage_days(staging, keys, start=0)
    versions = {key: staging.version("validated_clients", key) for key in keys}
    stage_days(staging, [keys[1]], start=100)  # a run of one partition: a file of its own
    assert staging.read("validated_clients", keys[1]).column("n").to_pylist() == [100, 101, 102]
    assert staging.metadata("validated_clients", keys[1]) == {"first": "100"}
    assert staging.version("validated_clients", keys[1]) != versions[keys[1]]
    for key in (keys[0], keys[2]):
        assert staging.version("validated_clients", key) == versions[key]  # not written again
    assert staging.read("validated_clients", keys[2]).column("n").to_pylist() == [2, 3, 4]
    stage_days(staging, keys, start=200)  # the range again: its file of its own goes
    assert stage_folder(staging) == [".bundles"]
    assert staging.read("validated_clients", keys[1]).column("n").to_pylist() == [201, 202, 203]


def test_a_bundle_is_deleted_once_none_of_its_partitions_are_read_from_it(staging) -> None:
    stage_days(staging, days(4), start=0)
    first = bundles(staging)
    stage_days(staging, days(2), start=10)  # the first two again: the first bundle still serves
    assert len(bundles(staging)) == 2 and first[0] in bundles(staging)
    stage_days(staging, days(4)[2:], start=20)  # and the other two: nothing left in it
    assert len(bundles(staging)) == 2 and first[0] not in bundles(staging)
    read = [staging.read("validated_clients", key).column("n")[0].as_py() for key in days(4)]
    assert read == [10, 11, 20, 21]


def test_a_failed_step_keeps_the_bundle_of_the_one_before(staging) -> None:
    keys = days(30)
    stage_days(staging, keys, start=0)
    before = bundles(staging)
    with pytest.raises(RuntimeError), staging.transaction() as writes:
        for key in keys:
            writes.write("validated_clients", key, numbers(1000, 3))
            writes.finish("validated_clients", key)
        raise RuntimeError("the database went away")
    assert bundles(staging) == before
    assert staging.read("validated_clients", keys[29]).column("n").to_pylist() == [29, 30, 31]
    assert not any((staging.root / "tienda_test" / ".incoming").iterdir())


@pytest.mark.parametrize(
    ("finished", "group_rows"),
    [(1, None), (2, None), (40, 4)],
    ids=["held-alone", "in-a-bundle-not-written-yet", "in-a-bundle-written"],
)
def test_a_small_partition_written_again_keeps_its_rows_and_must_be_finished_again(
    staging, monkeypatch: pytest.MonkeyPatch, finished: int, group_rows: int | None
) -> None:
    # A listing not ordered by updated_at sends a row to a partition finished already: alone so
    # far, in a bundle whose rows wait to be written, or in one whose rows have been written
    # (40 partitions, row groups of 4 rows) before the row comes.
    if group_rows:
        monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", group_rows)
    keys = days(finished + 1)
    with staging.transaction() as writes:
        for offset, key in enumerate(keys[:finished]):
            writes.write("validated_clients", key, numbers(offset * 10, 3))
            writes.finish("validated_clients", key, {"version": "first"})
        writes.write("validated_clients", keys[0], numbers(3, 2))
        writes.write("validated_clients", keys[finished], numbers(0, 1))
        writes.finish("validated_clients", keys[finished])
        writes.finish("validated_clients", keys[0], {"version": "second"})
    assert staging.read("validated_clients", keys[0]).column("n").to_pylist() == [0, 1, 2, 3, 4]
    assert staging.metadata("validated_clients", keys[0]) == {"version": "second"}
    for offset, key in enumerate(keys[1:finished], start=1):
        assert staging.read("validated_clients", key).column("n")[0].as_py() == offset * 10
        assert staging.metadata("validated_clients", key) == {"version": "first"}


def test_a_small_partition_of_other_columns_gets_a_file_of_its_own(staging) -> None:
    with staging.transaction() as writes:
        for key in days(2):
            writes.write("validated_clients", key, numbers(0, 2))
            writes.finish("validated_clients", key)
        writes.write("validated_clients", "2026-02-01", pa.record_batch({"text": ["a"]}))
        writes.finish("validated_clients", "2026-02-01")
    assert stage_folder(staging) == [".bundles", "2026-02-01.parquet"]
    assert staging.read("validated_clients", "2026-02-01").column("text").to_pylist() == ["a"]


def test_a_partition_staged_again_while_it_is_read_says_so(staging) -> None:
    # A step reads a bundle's rows after it found where they are; meanwhile another run of the
    # range replaced them and the bundle went away.
    keys = days(3)
    stage_days(staging, keys, start=0)
    reading = staging.batches("validated_clients", keys[1])
    stage_days(staging, keys, start=100)
    with pytest.raises(MissingStagedDataError, match="was staged again while it was read"):
        list(reading)
    assert staging.read("validated_clients", keys[1]).column("n").to_pylist() == [101, 102, 103]


def test_a_step_publishes_into_a_stage_only_while_no_other_step_does(staging) -> None:
    # Of two steps staging the same partition at once, the one that publishes last is read: the
    # manifest and the files of their own are replaced by one step at a time.
    keys = days(2)
    stage_days(staging, keys, start=0)
    lock = staging.root / "tienda_test" / "validated_clients" / ".lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # another step is publishing
        publishing = threading.Thread(target=stage_days, args=(staging, keys, 10))
        publishing.start()
        publishing.join(0.3)
        assert publishing.is_alive()
        assert staging.read("validated_clients", keys[0]).column("n").to_pylist() == [0, 1, 2]
        fcntl.flock(held, fcntl.LOCK_UN)
    publishing.join(10)
    assert not publishing.is_alive()
    assert staging.read("validated_clients", keys[0]).column("n").to_pylist() == [10, 11, 12]


@pytest.mark.parametrize("text", ["{not json", '["2026-01-01"]'], ids=["not-json", "not-a-map"])
def test_a_manifest_that_cannot_be_read_says_what_to_delete_and_do(staging, text: str) -> None:
    stage_days(staging, days(2))
    folder = staging.root / "tienda_test" / "validated_clients"
    (folder / ".bundles" / "manifest.json").write_text(text)
    with pytest.raises(MissingStagedDataError) as error:
        staging.read("validated_clients", "2026-01-01")
    assert str(error.value).startswith(f"{folder / '.bundles' / 'manifest.json'} cannot be read (")
    assert str(error.value).endswith(
        f"delete the folder {folder} and materialize the stage's partitions again."
    )
    with pytest.raises(MissingStagedDataError, match="cannot be read"):
        stage_days(staging, days(2))  # nor replaced: which partitions it named is unknown


def test_rejected_rows_are_written_in_row_groups_of_a_few_thousand_as_they_come(staging) -> None:
    # Each carries its whole raw record, and a large partition's come a few hundred per row group
    # validated: they are handed to the writer in smaller row groups, not held until the end.
    with staging.transaction() as writes:
        for start in range(0, 10_000, 500):
            writes.write("rejected_clients", "2026-11-02", numbers(start, 500))
    path = staging.path("rejected_clients", "2026-11-02")
    assert row_groups(path) == [4096, 4096, 1808]
    rows = staging.read("rejected_clients", "2026-11-02").column("n").to_pylist()
    assert rows == list(range(10_000))
