"""Staged partitions: whole or absent, in bounded row groups, with what they were made from."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hermes_orchestration.staging import ROW_GROUP_ROWS, MissingStagedDataError, PartitionStaging


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


def test_metadata_written_with_a_file_is_read_back_with_it(staging) -> None:
    assert staging.metadata("raw_clients", "2026-11-02") == {}
    with staging.transaction() as writes:
        writes.write("raw_clients", "2026-11-02", numbers(0, 10))
        writes.annotate("raw_clients", "2026-11-02", {"hermes.content": "abc"})
    assert staging.metadata("raw_clients", "2026-11-02") == {"hermes.content": "abc"}


@pytest.mark.parametrize("read", ["read", "batches"])
def test_reading_a_partition_never_staged_says_what_to_materialize(staging, read) -> None:
    with pytest.raises(MissingStagedDataError) as error:
        getattr(staging, read)("validated_clients", "2026-11-09")
    assert str(error.value) == (
        "validated_clients of integration 'tienda_test' has no data for partition 2026-11-09: "
        "materialize the upstream asset for that partition first."
    )
